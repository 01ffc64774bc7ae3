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
    st = r["data"]["storage"]
    res = (st.get("backend_storage") or {}).get("max_resolution") or st.get("max_resolution") or "original"
    loader = c["loader"] + (f" (reader={opts['reader']})" if opts.get("reader") else "")
    groups[(what, loader, str(res), workers, c["world_size"])].append((m, r["loader"].get("first_batch_seconds")))
env, data, c = r["environment"], r["data"], r["config"]
gpus = ", ".join(g["name"] for g in env["gpus"]) or "no GPU"
lines = [
    f"# Figures: {title}", "",
    f"Machine: {env['cpu']}, {env['cpu_count']} cores, {gpus}; torch {env['libraries']['torch']}. "
    f"Data: {data['train_samples']} training images (storage resolution per row), {c['image_size']} px "
    f"crops, batch {c['batch_size']}, {c['epochs']} epochs; throughput after {c['warmup_steps']} warm-up steps.",
    "",
    f"Command: `{command.strip()}`", "",
    "| mode | loader | storage px | workers / threads | ranks | images/s median | min - max | trials "
    "| data-wait share | val acc | first batch s |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for (what, loader, res, workers, ranks), runs in sorted(groups.items()):
    ms = [m for m, _ in runs]
    ips = [m["images_per_second"] for m in ms]
    wait = statistics.median(m["data_wait_share"] for m in ms)
    accs = [m["final_val_accuracy"] for m in ms if m["final_val_accuracy"] is not None]
    acc = f"{statistics.median(accs):.3f}" if accs else "-"
    firsts = [f for _, f in runs if f is not None]  # ffcv: includes numba's compilation
    first = f"{statistics.median(firsts):.1f}" if firsts else "-"
    lines.append(f"| {what} | {loader} | {res} | {workers} | {ranks} | {statistics.median(ips):.1f} | "
                 f"{min(ips):.1f} - {max(ips):.1f} | {len(ips)} | {wait:.0%} | {acc} | {first} |")
(out / "README.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
