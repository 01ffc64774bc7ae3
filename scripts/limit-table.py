"""The table of scripts/measure-limit.sh (and measure-spdl.sh): each backend's (each label's)
loader-only and end-to-end images/s at 1 and 2 cores, as a ratio to the per-core limit x cores
(OUT/limit.json) and to `synthetic` end to end; with OUT/gil.json (scripts/gil-scaling.py), how much
of each thread-pipeline stage holds the GIL.
    python scripts/limit-table.py OUT "the command that produced OUT" ["the title"]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.harness.report import results_in


def cell(v: list[float]) -> str:
    return f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f}, {len(v)})" if v else "-"


def main(
    out: Path, command: str, title: str = "Every backend against the CPU pipeline's per-core limit"
) -> None:
    limit = json.loads((out / "limit.json").read_text())
    runs: dict[tuple, list[float]] = {}
    env = None
    for r in results_in(out / "runs").values():
        env = env or r.environment
        mode = "loader" if r.loader_only else "e2e"
        runs.setdefault((r.label or r.config["loader"], r.config["cpus"], mode), []).append(r.ips)
    per_core = limit["limit"]["per_core_ips"]
    handover = limit["per_core_ips"].get("cpu+batch", {}).get("median")
    lines = [
        f"# {title} (2-core CPU box)",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, no GPU; torch {env['libraries']['torch']}, "
        f"commit {env['git_commit'][:10]}.",
        "",
        f"Produced by: `{command}`.",
        "",
        "## The per-core limit",
        "",
        f"Decode + random-resized-crop + flip of the generated set's JPEGs (about 450x350, q90, warm page "
        f"cache) to a {limit['image_size']} px uint8 tensor, {limit['images']} images, one core, one thread, "
        "a fresh process per decoder and trial (`scripts/decode-limit.py`; medians, min-max, trials):",
        "",
        "| decoder | what | images/s per core |",
        "|---|---|---|",
    ]
    what = {
        "pil-pil": "PIL decode + v2 crop/flip on the PIL image (torch's previous default)",
        "pil": "PIL decode + tensor crop/flip (torch/wds `decode=pil`)",
        "cpu": "torchvision.io libjpeg-turbo + tensor crop/flip (torch/wds default)",
        "spdl": "FFmpeg decode + crop/scale/flip filter graph (the spdl backend)",
        "cpu+batch": "cpu + the worker's collate: a float32 batch of 64 in shared memory, filled and normalised",
    }
    for d, s in limit["per_core_ips"].items():
        lines.append(f"| {d} | {what.get(d, d)} | {cell(s['trials'])} |")
    lines += [
        "",
        f"The limit: **{per_core:,.0f} images/s per core** ({limit['limit']['decoder']})"
        + (
            f"; with the hand-over of normalised float batches a DataLoader worker also pays, "
            f"**{handover:,.0f}** (cpu+batch)."
            if handover
            else "."
        ),
        "",
        "## Backends",
        "",
        "`bench run --cpus K --workers K --batch-size 64 --steps 30 --warmup-steps 5 --no-eval`, "
        "`--loader-only` or `--model small` (a small CNN trained on the same cores); images/s as median "
        "(min-max, trials). Loader only: the ratio to the limit x K. End to end: the ratio to `synthetic` "
        "end to end (the model's ceiling on these cores, no input cost)."
        + (
            " `torch-before`: the torch backend of the commit before this change (PIL decode and crop, "
            "per-sample float normalisation)."
            if any(n == "torch-before" for n, _, _ in runs)
            else ""
        ),
        "",
        "| loader | cores | loader only | / limit x cores | / (cpu+batch) x cores | end to end | / synthetic |",
        "|---|---|---|---|---|---|---|",
    ]
    names = sorted({n for n, _, _ in runs if n != "synthetic"}, key=lambda n: (n.startswith("torch-"), n))
    for k in (1, 2):
        ceiling = runs.get(("synthetic", k, "e2e"), [])
        for n in names:
            lo, e2e = runs.get((n, k, "loader"), []), runs.get((n, k, "e2e"), [])
            r_lim = f"{statistics.median(lo) / (per_core * k):.2f}" if lo else "-"
            r_hand = f"{statistics.median(lo) / (handover * k):.2f}" if lo and handover else "-"
            r_syn = f"{statistics.median(e2e) / statistics.median(ceiling):.2f}" if e2e and ceiling else "-"
            lines.append(f"| {n} | {k} | {cell(lo)} | {r_lim} | {r_hand} | {cell(e2e)} | {r_syn} |")
        lines.append(f"| synthetic | {k} | - | - | - | {cell(ceiling)} | 1.00 |")
    if (out / "gil.json").is_file():
        lines += gil_section(json.loads((out / "gil.json").read_text()))
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def gil_section(doc: dict) -> list[str]:
    n = doc["threads"]
    lines = [
        "",
        "## How much of each thread-pipeline stage holds the GIL",
        "",
        f"`{doc['command']}`: each stage's work on 1 and on {n} threads of one process ({n} cores, a fresh "
        "process per stage and count, alternating), images/s median (min-max, trials); the serial share is "
        f"Amdahl's f = ({n} / speed-up - 1) / ({n} - 1): 0 when the threads never wait for each other, 1 "
        "when one runs at a time (the GIL, or anything else they share).",
        "",
        f"| stage | 1 thread | {n} threads | speed-up | serial share |",
        "|---|---|---|---|---|",
    ]
    for r in doc["stages"]:
        lines.append(
            f"| {r['stage']} | {cell(r['trials_1'])} | {cell(r['trials_n'])} | {r['speedup']:.2f} | "
            f"{r['serial_share']:.2f} |"
        )
    return lines


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:4])
