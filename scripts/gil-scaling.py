"""How much of each stage of a thread pipeline holds the GIL: the stage's work run by 1 and by N threads
of one process on N cores (a fresh process per stage and thread count, alternating), images/s, and
Amdahl's serial share f = (N / speed-up - 1) / (N - 1): 0 when the threads never wait for each other,
1 when only one runs at a time. Stages: the spdl backend's decode stage with each decoder (`_load`:
FFmpeg's filter graph, torchvision.io + tensor crop, PIL + tensor crop) and the collate stage (64
decoded images into a normalised float32 batch).

    python scripts/gil-scaling.py [--threads 2] [--images 320] [--trials 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STAGES = ("decode=ffmpeg", "decode=cpu", "decode=pil", "collate")


def work(stage: str, split: Path, size: int):
    """(callable(i), item count per call) for ``stage``."""
    from loaders.contract import LoaderConfig, scan_imagefolder
    from loaders.spdl import Options, SpdlLoader

    index = scan_imagefolder(split)
    cfg = LoaderConfig(data=split, batch_size=64, train=True, image_size=size)
    if stage == "collate":
        from loaders.images import collate_checked

        loader = SpdlLoader(cfg, Options(num_threads=1, decode="cpu"), index)
        decoded = [loader._load(i) for i in range(64)]
        return (lambda i: collate_checked(decoded, normalize=True)), 64
    loader = SpdlLoader(cfg, Options(num_threads=1, decode=stage.split("=")[1]), index)
    return loader._load, 1


def one(stage: str, threads: int, split: Path, images: int, size: int) -> dict:
    import torch

    torch.set_num_threads(1)  # the threads of the pipeline are the parallelism, as in SPDL
    fn, per_call = work(stage, split, size)
    calls = max(threads * 4, images // per_call)
    keys = [i % 1000 for i in range(calls)]
    for i in keys[:8]:  # imports, first-call costs, the page cache
        fn(i)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, keys[: threads * 2]))
        start = time.perf_counter()
        list(pool.map(fn, keys))
        took = time.perf_counter() - start
    return {"stage": stage, "threads": threads, "ips": calls * per_call / took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="an ImageFolder split; default: the generated set's train/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.data is None:
        from bench.data.synth import default_dataset

        a.data = default_dataset() / "train"
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.data, a.images, a.size)))
        return
    if len(os.sched_getaffinity(0)) < a.threads:
        raise SystemExit(
            f"gil-scaling: --threads {a.threads} needs as many cores; this process may use "
            f"{len(os.sched_getaffinity(0))}"
        )
    runs: dict[tuple, list[float]] = {}
    plan = [(s, n) for s in STAGES for n in (1, a.threads)]
    for t in range(a.trials):
        for stage, n in plan if t % 2 == 0 else plan[::-1]:
            cmd = [sys.executable, __file__, "--one", stage, str(n), "--data", str(a.data),
                   "--images", str(a.images), "--size", str(a.size)]  # fmt: skip
            r = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            runs.setdefault((stage, n), []).append(r["ips"])
            print(f"trial {t + 1}: {stage:14s} {n} thread(s) {r['ips']:8.0f} img/s", file=sys.stderr)
    rows = []
    for stage in STAGES:
        one_t, many = statistics.median(runs[(stage, 1)]), statistics.median(runs[(stage, a.threads)])
        speedup = many / one_t
        serial = min(1.0, max(0.0, (a.threads / speedup - 1) / (a.threads - 1)))
        rows.append({"stage": stage, "ips_1": one_t, "ips_n": many, "speedup": speedup, "serial_share": serial,
                     "trials_1": runs[(stage, 1)], "trials_n": runs[(stage, a.threads)]})  # fmt: skip
        print(
            f"{stage:14s} 1 thread {one_t:7.0f}  {a.threads} threads {many:7.0f} img/s  "
            f"speed-up {speedup:.2f}  serial share {serial:.2f}"
        )
    if a.out:
        from bench.harness.envinfo import collect as environment

        doc = {"command": " ".join(["python", "scripts/gil-scaling.py", *sys.argv[1:]]), "threads": a.threads,
               "images": a.images, "image_size": a.size, "environment": environment(), "stages": rows}  # fmt: skip
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
