"""The table of scripts/measure-ray.sh: `ray` against `torch` at equal cores and a disaggregated Ray
pool against local-only at one trainer core, loader only and end to end; the costs per image that
`bench plan --cpu-nodes` measured (OUT/plan/plan.json) and its predictions against the runs.
    python scripts/ray-table.py OUT "the command that produced OUT"
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.harness import plan
from bench.harness.report import results_in

# label -> (loader, trainer cores, Ray pool cores apart from the trainer's: 0 = local only)
CONFIGS = {
    "torch 2 workers, 2 cores": ("torch", 2, 0),
    "ray local 2 CPUs, 2 cores": ("ray", 2, 0),
    "torch 1 worker, 1 core": ("torch", 1, 0),
    "ray local 1 CPU, 1 core": ("ray", 1, 0),
    "ray pool on core 1, trainer on core 0": ("ray", 1, 1),
}


def cell(v: list[float]) -> str:
    return f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f}, {len(v)})" if v else "-"


def predicted(m: plan.Measured, t: plan.Target, label: str, mode: str) -> float:
    loader, cores, pool = CONFIGS[label]
    if pool:
        limits = plan.pool_limits(m, t, cores, pool / t.cores_per_cpu_node, loader_only=mode == "loader")
        return min(limits.values())
    if mode == "loader":
        return m.loaders[loader].at(cores)
    return plan.predict(m, t, loader, cores=cores)["per_gpu_ips"]


def main(out: Path, command: str) -> None:
    runs: dict[tuple, list[float]] = {}
    env, dirty = None, False
    for r in results_in(out / "runs").values():
        env, dirty = env or r.environment, dirty or bool(r.environment.get("git_dirty"))
        runs.setdefault((r.label, "loader" if r.loader_only else "e2e"), []).append(r.ips)
    doc = json.loads((out / "plan" / "plan.json").read_text())
    m, t = plan.measured_from(doc), plan.Target(**doc["target"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    spread = max((max(v) - min(v)) / statistics.median(v) for v in runs.values())
    lines = [
        "# Ray Data (`ray`) against `torch`, local and with a pool on another core (2-core CPU box)",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, no GPU; torch {env['libraries']['torch']}, "
        f"ray {doc['environment']['libraries'].get('ray', '?')}. Runs: commit {env['git_commit'][:10]}"
        f"{' with uncommitted changes' if dirty else ''}; plan: commit "
        f"{doc['environment']['git_commit'][:10]}{' with uncommitted changes' if doc['environment'].get('git_dirty') else ''}.",
        "",
        f"Produced by: `{command}`.",
        "",
        "The default generated set (1,600 training JPEGs), 224 px, batch 64, 2 epochs, the small CNN end to "
        "end (bf16 off, evaluation on); images/s after warm-up, fresh processes, the configurations "
        "alternating in each trial; median (min-max, trials). The pool: a Ray cluster on loopback, its "
        "head (no CPUs) on core 0 beside the trainer (`--cpus 1`, core 0), one 1-CPU worker node under "
        "`taskset -c 1`: the decode runs on the other core, as it would on another machine, and the "
        "batches move between the two nodes' object stores through this machine's own network stack "
        f"(no wire, no latency). Largest spread in one configuration: {spread:.0%}.",
        "",
        "| configuration | loader only, img/s | end to end (small CNN), img/s |",
        "|---|---|---|",
    ]
    for label in CONFIGS:
        lines.append(
            f"| {label} | {cell(runs.get((label, 'loader'), []))} | {cell(runs.get((label, 'e2e'), []))} |"
        )

    def ratio(a: str, b: str, mode: str) -> str:
        return f"{med[(a, mode)] / med[(b, mode)]:.2f}x" if (a, mode) in med and (b, mode) in med else "-"

    def overhead(ray: str, torch: str) -> str:
        if (ray, "loader") not in med or (torch, "loader") not in med:
            return "-"
        return f"{(1 / med[(ray, 'loader')] - 1 / med[(torch, 'loader')]) * 1e3:+.2f} ms"

    pool = doc["measured"]["ray_pool"]
    lines += [
        "",
        "## What the figures say",
        "",
        f"- **Equal cores**: `ray` / `torch` loader only {ratio('ray local 2 CPUs, 2 cores', 'torch 2 workers, 2 cores', 'loader')} "
        f"at 2 cores and {ratio('ray local 1 CPU, 1 core', 'torch 1 worker, 1 core', 'loader')} at 1; end to end "
        f"{ratio('ray local 2 CPUs, 2 cores', 'torch 2 workers, 2 cores', 'e2e')} and "
        f"{ratio('ray local 1 CPU, 1 core', 'torch 1 worker, 1 core', 'e2e')}. Ray's overhead per image against "
        f"torch's workers, loader only (1 / ray's rate - 1 / torch's): {overhead('ray local 2 CPUs, 2 cores', 'torch 2 workers, 2 cores')} "
        f"of wall time at 2 cores, {overhead('ray local 1 CPU, 1 core', 'torch 1 worker, 1 core')} at 1.",
        f"- **Disaggregated**: the trainer on one core with its decode on the other against everything on that "
        f"one core: {ratio('ray pool on core 1, trainer on core 0', 'ray local 1 CPU, 1 core', 'e2e')} end to end "
        f"over local `ray`, {ratio('ray pool on core 1, trainer on core 0', 'torch 1 worker, 1 core', 'e2e')} over "
        f"local `torch`; loader only {ratio('ray pool on core 1, trainer on core 0', 'ray local 1 CPU, 1 core', 'loader')} "
        "and "
        f"{ratio('ray pool on core 1, trainer on core 0', 'torch 1 worker, 1 core', 'loader')}.",
        f"- **Costs** (`bench plan --cpu-nodes`: a two-node Ray cluster of this box, the trainer and a head "
        "without CPUs on one core, a worker node on the other; CPU time of each side's processes over two "
        f"epochs of {pool['images']} images after one to start the workers, the second with a pause after "
        "each batch, which splits each side's CPU into a part per image and cores busy whatever the rate): "
        f"**{pool['pool_cpu_s'] * 1e3:.2f} ms of pool CPU per image** (decode, crop, flip, collate, "
        f"normalise, the task, its node's raylet and object store; +{pool.get('pool_background', 0):.2f} core) "
        f"and **{pool['trainer_cpu_s'] * 1e3:.2f} ms on the trainer's node** (its raylet pulling each batch "
        "from the pool's node, this process deserialising and copying it: the transfer cost from pool to "
        f"trainer; +{pool.get('trainer_background', 0):.2f} core), {pool['bytes_per_image'] / 1e3:,.0f} kB "
        f"per image ({pool.get('batches', 'float32')}). By process (ms per image, background cores): "
        + "; ".join(f"{k} {v[0]:.2f} ms, {v[1]:.2f}" for k, v in pool.get("detail", {}).items())
        + ".",
        "",
        "## The planner against these runs",
        "",
        "The plan above measured each loader alone at 1 and 2 cores, the model alone, and the pool's costs; "
        "it predicts local loaders as on any CPU target (the loader and the model take turns on the cores) "
        "and the pool as min((pool cores - background) / pool CPU per image, the trainer: (1 - background) / "
        "(1 / model + its CPU per image)); loader only, the trainer's term is (1 - background) / its CPU per "
        "image. Error = (predicted - measured) / measured.",
        "",
        "| configuration | mode | predicted img/s | measured (median) | error |",
        "|---|---|---|---|---|",
    ]
    errors = []
    for label in CONFIGS:
        for mode in ("loader", "e2e"):
            if (label, mode) not in med:
                continue
            p = predicted(m, t, label, mode)
            err = (p - med[(label, mode)]) / med[(label, mode)]
            errors.append((abs(err), label, mode))
            lines.append(
                f"| {label} | {'loader only' if mode == 'loader' else 'end to end'} | {p:,.0f} | "
                f"{med[(label, mode)]:,.0f} | {err:+.0%} |"
            )
    worst = max(errors)
    lines += [
        "",
        f"**{sum(e <= 0.15 for e, *_ in errors)} of {len(errors)} within 15 %**; median |error| "
        f"{statistics.median(e for e, *_ in errors):.0%}, largest {worst[0]:.0%} ({worst[1]}, "
        f"{'loader only' if worst[2] == 'loader' else 'end to end'}).",
        "",
        "The plan's own table and map (plan/plan.txt, plan/plan.png):",
        "",
        "![the crossover map with the pool, and images/s against CPU nodes](plan/plan.png)",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    print(out / "README.md")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "bash scripts/measure-ray.sh")
