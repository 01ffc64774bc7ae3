"""The planner's validation table: each folder under OUT holds a CPU-target `bench plan` (plan.json)
and `bench run --cpus K` results (runs/); prediction against the median measurement, with the error
of each, written to OUT/README.md, and the crossover maps redrawn with the measured points.
    python scripts/plan-validation.py OUT "the command that produced OUT"
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.harness import plan
from bench.harness.report import results_in


def main(out: Path, command: str) -> None:
    lines, errors, env = [], [], None
    for folder in sorted(p.parent for p in out.glob("*/plan.json")):
        doc = json.loads((folder / "plan.json").read_text())
        env = env or doc["environment"]
        m = plan.measured_from(doc)
        t = plan.Target(**doc["target"])
        runs: dict[tuple, list[float]] = {}
        for r in results_in(folder / "runs").values():
            runs.setdefault((r.config["loader"], r.config["cpus"]), []).append(r.ips)
        spec = doc["spec"]
        lines += [
            f"### {spec['model']}, batch {spec['batch_size']}, {spec['image_size']} px",
            "",
            "| loader | cores | loader alone (measured by plan) | model alone (plan) | predicted img/s "
            "| measured img/s (median, min-max, n) | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for (loader, k), v in sorted(runs.items()):
            p = plan.predict(m, t, loader, cores=k)
            med = statistics.median(v)
            err = (p["per_gpu_ips"] - med) / med
            errors.append(abs(err))
            lines.append(
                f"| {loader} | {k} | {m.loaders[loader].at(k):,.0f} | {m.model.at(k):,.0f} | "
                f"{p['per_gpu_ips']:,.0f} | {med:,.0f} ({min(v):,.0f}-{max(v):,.0f}, {len(v)}) | {err:+.0%} |"
            )
        lines.append("")
        points = [{"loader": lo, "cpus": k, "ips": statistics.median(v)} for (lo, k), v in runs.items()]
        plan.draw(doc, m, t, folder / "plan.png", points)
        lines += [f"![{spec['model']}]({folder.name}/plan.png)", ""]
    within = sum(e <= 0.15 for e in errors)
    head = [
        "# The planner against measurement (2-core CPU box)",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, no GPU; torch {env['libraries']['torch']}, commit {env['git_commit'][:10]}.",
        "",
        f"Produced by: `{command}`.",
        "",
        "Each `bench plan` measured its own per-core rates (loader alone at 1 and 2 cores with as many "
        "workers or threads; the model alone on the synthetic loader), then predicted end-to-end images/s "
        "at K cores as 1 / (1 / loader(K) + 1 / model(K)): the loader and the model take turns on the same "
        "cores. Measured: `bench run --cpus K --workers K --no-eval`, fresh processes, the backends' order "
        "reversed on even trials. Error = (predicted - measured) / measured.",
        "",
        f"**{within} of {len(errors)} predictions within 15 %**; median |error| "
        f"{statistics.median(errors):.0%}, largest {max(errors):.0%}.",
        "",
    ]
    (out / "README.md").write_text("\n".join(head + lines))
    print(out / "README.md")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "bash scripts/measure-plan.sh")
