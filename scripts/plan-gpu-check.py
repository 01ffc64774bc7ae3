"""How close `bench plan`'s GPU model comes to measured GPU runs: per loader variant and core count,
the loader-only rate and the model's GPU cost (GPU time per step over synthetic's) read from the
same folder's results, the prediction (docs/plan.md), and what the end-to-end runs measured.

    .venv/bin/python scripts/plan-gpu-check.py FOLDER [FOLDER ...] > reports/plan-gpu-h100/README.md
"""

from __future__ import annotations

import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.plan import Curve, Measured, Target, gpu_costs, predict, variant_of  # noqa: E402
from bench.harness.report import results_in  # noqa: E402
from loaders import get_backend  # noqa: E402


def main(folders: list[str]) -> None:
    every = {f: list(results_in(Path(f)).values()) for f in folders}
    runs = [r for rs in every.values() for r in rs]
    commits = sorted({(r.environment.get("git_commit") or "?")[:10] for r in runs})
    machines = sorted(
        {
            f"{(r.environment.get('gpus') or [{}])[0].get('name')}, {r.environment.get('cpu_count')} cores"
            for r in runs
        }
    )
    lines = [
        "# The planner's GPU model against measured GPU runs",
        "",
        f"Inputs measured at commit {', '.join(commits)} on the machine(s) {'; '.join(machines)} (their "
        "JSON); the predictions are the planner's (bench/harness/plan.py) at the commit that last wrote this file.",
        "",
        f"Produced by: `.venv/bin/python scripts/plan-gpu-check.py {' '.join(folders)}` (no GPU needed: it "
        "reads the results). Per folder (one machine, one core count), per loader variant: loader-only "
        "images/s (median), the GPU cost (the model's GPU ms per step with it over synthetic's), the "
        "prediction and the measured end-to-end images/s (median, min-max, runs). Model: docs/plan.md.",
        "",
        "| results | cores | loader | loader only | GPU cost | how it shares the GPU | predicted | measured | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gpu_of = lambda r: (r.environment.get("gpus") or [{}])[0].get("name")  # noqa: E731
    for folder in folders:
        res = every[folder]
        env = res[0].environment
        if not any(r.config["loader"] == "synthetic" for r in res):  # the GPU's rate does not need cores:
            res = res + [  # take the ceiling measured on the same GPU in another folder
                r
                for f in folders
                for r in every[f]
                if r.config["loader"] == "synthetic" and gpu_of(r) == gpu_of(res[0])
            ]
        cores = {r.config.get("cpus") or env["cpu_count"] for r in res if r.config["loader"] != "synthetic"}
        assert len(cores) == 1, f"{folder}: one core count per folder"
        (cores,) = cores
        shapes = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in res:
            shapes[r.config["model"] if not r.loader_only else "loader"][variant_of(r)].append(r)
        trained = [m for m in shapes if m != "loader"]
        for model in trained:
            synth = [r.ips for r in shapes[model].get("synthetic", [])]
            if not synth:
                continue
            rate = statistics.median(synth)
            costs = gpu_costs(res, model)
            for key, runs in sorted(shapes[model].items()):
                only = shapes["loader"].get(key)
                if key == "synthetic" or not only or key not in costs:
                    continue
                name = runs[0].config["loader"]
                serial = get_backend(name, installed=False).gpu_work_between_steps(runs[0].options)
                load = statistics.median(r.ips for r in only)
                m = Measured(loaders={key: Curve([cores], [load])})
                t = Target(
                    gpus=1,
                    cores_per_node=cores,
                    gpu_rate=rate,
                    gpu_cost={key: costs[key]["cost"]},
                    serial={key: serial},
                )
                p = predict(m, t, key)
                got = [r.ips for r in runs]
                med = statistics.median(got)
                lines.append(
                    f"| {folder} | {cores} | {key} | {load:,.0f} | {costs[key]['cost']:.2f} | "
                    f"{'between steps (times add)' if serial else 'beside training (min)'} | "
                    f"{p['per_gpu_ips']:,.0f} | {med:,.0f} ({min(got):,.0f}-{max(got):,.0f}, {len(got)}) | "
                    f"{p['per_gpu_ips'] / med - 1:+.0%} |"
                )
            lines.append(
                f"| {folder} | {cores} | synthetic (the GPU rate) | - | 1.00 | - | - | {rate:,.0f} | - |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main(
        sys.argv[1:]
        or [
            "reports/gpu-decode-h100/h100-16cores-before-fix/runs",
            "reports/gpu-decode-h100/h100-16cores/runs",
            "reports/gpu-decode-h100/h100-4cores/runs",
        ]
    )
