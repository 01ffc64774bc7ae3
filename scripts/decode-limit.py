"""The per-core limit of the CPU image pipeline: decode + random-resized-crop + flip of JPEG files (warm
in the page cache) to a uint8 tensor, one core, one thread, per decoder. Each decoder runs in a fresh
process pinned to one core, the decoders' order reversed on even trials; medians and spread.

    python scripts/decode-limit.py [--data SPLIT] [--images 400] [--trials 3] [--size 224] [--out DIR]

Decoders (each the backend's own per-sample code):
  pil-pil  PIL decode + torchvision v2 crop/flip on the PIL image + PILToTensor (torch's previous path)
  pil      PIL decode + the tensor crop/flip (torch/wds decode='pil')
  cpu      torchvision.io's libjpeg-turbo + the tensor crop/flip (torch/wds default)
  spdl     FFmpeg decode with crop/scale/flip in its filter graph (the spdl backend's _load)
  cpu+batch  cpu, then every 64 images the collate a DataLoader worker runs: the float32 batch
           allocated in shared memory, filled and normalised (what a loader must also pay to
           hand over normalised batches; not a decoder, so never the limit)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DECODERS = ("pil-pil", "pil", "cpu", "spdl", "cpu+batch")
NOT_A_DECODER = ("cpu+batch",)


def per_sample(decoder: str, split: Path, size: int):
    """(callable(i) -> uint8 CHW or HWC tensor, paths) for ``decoder``."""
    from torchvision.transforms import v2

    from loaders.contract import LoaderConfig, scan_imagefolder
    from loaders.images import sample, transform_for

    index = scan_imagefolder(split)
    cfg = LoaderConfig(data=split, batch_size=1, train=True, image_size=size)
    if decoder == "pil-pil":
        from loaders.images import decode_rgb

        ops = v2.Compose(
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]
        )
        return (lambda i: ops(decode_rgb(str(index.paths[i])))), index
    if decoder in ("pil", "cpu"):
        t = transform_for(cfg, float_in_workers=False, decoder=decoder)
        return (lambda i: sample(t, str(index.paths[i]), "", 0, 0, 0, i)[0]), index
    if decoder == "cpu+batch":
        import torch.utils.data

        from loaders.images import collate_checked

        torch.utils.data.get_worker_info = lambda: object()  # collate as in a worker: into shared memory
        t = transform_for(cfg, float_in_workers=True)
        pending = []

        def with_batch(i):
            pending.append(sample(t, str(index.paths[i]), "", 0, 0, 0, i))
            image = pending[-1][0]
            if len(pending) == 64:
                collate_checked(pending, normalize=True)
                pending.clear()
            return image

        return with_batch, index
    if decoder == "spdl":
        from loaders.spdl import Options, SpdlLoader

        loader = SpdlLoader(cfg, Options(num_threads=1, decode="ffmpeg"), index)
        return (lambda i: loader._load(i)[0]), index
    raise SystemExit(f"unknown decoder {decoder!r}; known: {', '.join(DECODERS)}")


def one(decoder: str, split: Path, images: int, size: int) -> dict:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy as np
    import torch

    torch.set_num_threads(1)
    fn, index = per_sample(decoder, split, size)
    keys = np.random.default_rng(0).choice(len(index), size=min(images, len(index)), replace=False)
    for i in keys[:20]:  # imports, first-call costs
        fn(int(i))
    for i in keys:  # the files into the page cache
        Path(index.paths[i]).read_bytes()
    start = time.perf_counter()
    for i in keys:
        out = fn(int(i))
    took = time.perf_counter() - start
    assert out.dtype == torch.uint8 and size in out.shape
    return {"decoder": decoder, "images": len(keys), "seconds": took, "ips": len(keys) / took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="an ImageFolder split; default: the generated set's train/")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--decoders", default=",".join(DECODERS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.data is None:
        from bench.data.synth import default_dataset

        a.data = default_dataset() / "train"
    if a.one:
        print(json.dumps(one(a.one, a.data, a.images, a.size)))
        return
    decoders = a.decoders.split(",")
    runs: dict[str, list[float]] = {d: [] for d in decoders}
    for t in range(a.trials):
        for d in decoders if t % 2 == 0 else decoders[::-1]:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                d,
                "--data",
                str(a.data),
                "--images",
                str(a.images),
                "--size",
                str(a.size),
            ]
            r = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            runs[d].append(r["ips"])
            print(f"trial {t + 1}: {d:8s} {r['ips']:7.0f} img/s", file=sys.stderr)
    from bench.harness.envinfo import collect as environment

    doc = {
        "command": " ".join(["python", "scripts/decode-limit.py", *sys.argv[1:]]),
        "data": str(a.data),
        "image_size": a.size,
        "images": a.images,
        "environment": environment(),
        "per_core_ips": {
            d: {"median": statistics.median(v), "min": min(v), "max": max(v), "trials": v}
            for d, v in runs.items()
        },
    }
    decoders_only = [d for d in doc["per_core_ips"] if d not in NOT_A_DECODER]
    best = max(decoders_only, key=lambda d: doc["per_core_ips"][d]["median"])
    doc["limit"] = {"decoder": best, "per_core_ips": doc["per_core_ips"][best]["median"]}
    for d, s in doc["per_core_ips"].items():
        print(
            f"{d:8s} median {s['median']:7.0f} img/s per core ({s['min']:.0f}-{s['max']:.0f}, {len(s['trials'])} trials)"
        )
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "limit.json").write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
