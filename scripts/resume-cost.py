"""What resuming costs, per backend: the loader state's size and save time, a whole checkpoint's
save time and size, and the time from a process start to its first batch, fresh against resumed
mid-epoch (the same `bench run`, the second with --resume). Alternating backends, fresh processes,
medians of TRIALS; writes OUT/resume.json and OUT/README.md (the table docs/resume.md shows).

    python scripts/resume-cost.py OUT [TRIALS]   (bash scripts/measure-resume.sh runs it)
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = [  # (label, bench run arguments)
    ("torch", ["--loader", "torch", "--workers", "2"]),
    ("dali", ["--loader", "dali", "--workers", "2"]),
    ("dali reader=wds", ["--loader", "dali", "--workers", "2", "-o", "reader=wds"]),
    ("ffcv", ["--loader", "ffcv", "--workers", "2"]),
    ("wds", ["--loader", "wds", "--workers", "2"]),
    ("spdl", ["--loader", "spdl", "--workers", "2"]),
    ("synthetic", ["--loader", "synthetic"]),
    (
        "torch, --storage s3 (10 ms)",
        ["--loader", "torch", "--workers", "2", "--storage", "s3", "--s3-latency-ms", "10"],
    ),
]
# The default set: 25 steps of 64 per epoch; checkpoints every 12 steps, the last at step 24, so the
# resumed run starts 24 batches (1,536 samples) into its epoch and has one step left.
RUN = ["run", "--epochs", "1", "--no-eval", "--checkpoint-every", "12"]


def bench(args: list[str], out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", *args, "--out", str(out)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def state_cost(args: list[str]) -> dict:
    """The loader's state_dict() after 12 batches: JSON bytes and median microseconds of 200 calls."""
    code = (
        "import json, sys, time\n"
        "from bench.harness.spec import RunSpec\n"
        "from bench.data.synth import default_dataset\n"
        "from loaders import build_loader\n"
        "spec = RunSpec.from_argv(json.loads(sys.argv[1]))\n"
        "loader = build_loader(spec.loader, default_dataset() / 'train', batch_size=64, train=True, device='cpu', options=spec.options)\n"
        "it = iter(loader)\n"
        "for _ in range(12): next(it)\n"
        "times = []\n"
        "for _ in range(200):\n"
        "    t = time.perf_counter(); s = loader.state_dict(); times.append(time.perf_counter() - t)\n"
        "print(json.dumps({'bytes': len(json.dumps(s)), 'us': sorted(times)[100] * 1e6}))\n"
        "loader.close()\n"
    )
    flags = [a for a in args if not a.startswith("--s3") and a not in ("--storage", "s3", "10")]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(flags)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"state_dict cost for {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(out: Path, trials: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    rows = {
        label: {"fresh_s": [], "resumed_s": [], "save_s": [], "bytes": None, "resume_load_s": []}
        for label, _ in CASES
    }
    for trial in range(-1, trials):  # trial -1 is not kept: it generates the data and converts it once
        for label, args in CASES:  # alternating backends within each trial
            shutil.rmtree(work, ignore_errors=True)
            ck = work / "ck"
            fresh = bench([*RUN, *args, "--checkpoint", str(ck)], work / "fresh")
            resumed = bench(["run", "--resume", str(ck)], work / "resumed")
            assert resumed["metrics"]["checkpoint"]["resumed_from"]["step"] == 24, resumed["metrics"][
                "checkpoint"
            ]
            if trial < 0:
                continue
            r, fm, rm = rows[label], fresh["metrics"], resumed["metrics"]
            r["fresh_s"].append(fm["start_to_first_batch_seconds"])
            r["resumed_s"].append(rm["start_to_first_batch_seconds"])
            r["save_s"].append(fm["checkpoint"]["save_seconds_median"])
            r["bytes"] = fm["checkpoint"]["bytes"]
            r["resume_load_s"].append(rm["checkpoint"]["resumed_from"]["load_seconds"])
            print(
                f"trial {trial} {label}: fresh {r['fresh_s'][-1]:.2f} s, resumed {r['resumed_s'][-1]:.2f} s",
                flush=True,
            )
    for label, args in CASES:
        rows[label]["state"] = state_cost(args)
    shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    from bench.harness import envinfo, report

    # the machine and commit, so that `bench report --check` can tell when these figures go stale
    doc = {
        "trials": trials,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "environment": envinfo.collect(),
        "rows": rows,
    }
    (out / "resume.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "| backend | state (JSON bytes) | state_dict() | checkpoint save (small CNN, MB) | start to first batch: fresh | resumed 24 batches in | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        fresh, resumed = med(r["fresh_s"]), med(r["resumed_s"])
        spread = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"  # noqa: E731
        lines.append(
            f"| {label} | {r['state']['bytes']} | {r['state']['us']:.0f} µs | {med(r['save_s']) * 1e3:.0f} ms "
            f"({r['bytes'] / 1e6:.1f}) | {fresh:.2f} s ({spread(r['fresh_s'])}) | {resumed:.2f} s "
            f"({spread(r['resumed_s'])}) | {resumed - fresh:+.2f} s |"
        )
    (out / "README.md").write_text(
        "# What resuming costs\n\n"
        f"`bash scripts/measure-resume.sh` ({trials} trials, medians, min-max in brackets; {doc['created']}).\n"
        f"Machine: {report.machine_line_of(doc['environment'])}.\n"
        "Default generated set, batch 64, 2 workers/threads; the checkpoint is at step 24 of 25.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
