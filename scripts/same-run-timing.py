"""The harness's images/s over an outside clock on the same run (tests/outside_clock.py, which
imports nothing of this project, so an older checkout can be measured too: PYTHONPATH picks the tree).
  PYTHONPATH=TREE python scripts/same-run-timing.py LOADER lo|e2e|b2b DATA_ROOT OUT_DIR
lo, e2e: 40 steps, 5 warm-up, batch 64, 2 workers / threads: the run stops inside its second epoch.
b2b: loader only, 70 steps, against the clock of a loop that runs epochs back to back (BackToBack):
one window through two epoch boundaries."""

import importlib.util
import json
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "outside_clock", Path(__file__).parent.parent / "tests/outside_clock.py"
)
outside_clock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outside_clock)

name, mode, data, out = sys.argv[1:5]
opts = {"synthetic": {}, "dali": {"num_threads": 2}}.get(name, {"num_workers": 2})
stamped = []


def stamping(real):
    def build(*args, train=True, **kwargs):
        loader = real(*args, train=train, **kwargs)
        if not train:
            return loader
        stamped.append(
            outside_clock.BackToBack(loader, 5) if mode == "b2b" else outside_clock.Stamped(loader)
        )
        return stamped[-1]

    return build


common = dict(
    loader=name,
    data=data,
    steps=70 if mode == "b2b" else 40,
    warmup_steps=5,
    loader_only=mode != "e2e",
    out=out,
)
try:  # this tree
    from bench.harness import runner
    from bench.harness.spec import RunSpec

    run = RunSpec(**common).with_options(**opts)
except ImportError:  # before the run spec (commit 59e3ee6 and older)
    from bench import runner

    run = runner.RunConfig(**common, loader_options=tuple(sorted(opts.items())))
runner.build_loader = stamping(runner.build_loader)
path = runner.run(run, ["run"], log=lambda *a: None)
ips = json.loads(Path(path).read_text())["metrics"]["images_per_second"]
outside = stamped[0].images_per_second() if mode == "b2b" else stamped[0].images_per_second(5)
print(f"{name} {mode} ratio={ips / outside:.3f}")
