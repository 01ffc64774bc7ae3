"""Summarise a folder of `bench run` results (OUT/runs/*.json) into OUT/README.md: median, min and
max images/s per configuration over trials. A stopgap until `bench report` (issue 6).

    python scripts/summarize_runs.py OUT "COMMAND" "TITLE"
"""
import collections
import statistics
import sys
from pathlib import Path

from bench.result import load

out, command, title = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
groups = collections.defaultdict(list)
for path in sorted((out / "runs").glob("*.json")):
    r = load(path)
    c, m = r["config"], r["metrics"]
    what = "loader only" if c.get("loader_only") else f"end to end ({c['model']})"
    opts = c["loader_options"]
    workers = opts.get("num_workers", opts.get("num_threads", "-"))
    groups[(what, c["loader"], workers, c["world_size"])].append(m)
env, data, c = r["environment"], r["data"], r["config"]
gpus = ", ".join(g["name"] for g in env["gpus"]) or "no GPU"
lines = [
    f"# Figures: {title}", "",
    f"Machine: {env['cpu']}, {env['cpu_count']} cores, {gpus}; torch {env['libraries']['torch']}. "
    f"Data: {data['train_samples']} training JPEGs at {data['storage']['mean_width']:.0f} x "
    f"{data['storage']['mean_height']:.0f} px mean, {c['image_size']} px, batch {c['batch_size']}, "
    f"{c['epochs']} epochs; throughput after {c['warmup_steps']} warm-up steps.", "",
    f"Command: `{command.strip()}`", "",
    "| mode | loader | workers / threads | ranks | images/s median | min - max | trials | data-wait share | val acc |",
    "|---|---|---|---|---|---|---|---|---|",
]
for (what, loader, workers, ranks), ms in sorted(groups.items()):
    ips = [m["images_per_second"] for m in ms]
    wait = statistics.median(m["data_wait_share"] for m in ms)
    accs = [m["final_val_accuracy"] for m in ms if m["final_val_accuracy"] is not None]
    acc = f"{statistics.median(accs):.3f}" if accs else "-"
    lines.append(f"| {what} | {loader} | {workers} | {ranks} | {statistics.median(ips):.1f} | "
                 f"{min(ips):.1f} - {max(ips):.1f} | {len(ips)} | {wait:.0%} | {acc} |")
(out / "README.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
