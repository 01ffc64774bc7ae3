"""`bench data convert`: an ImageFolder root (train/, val/) to another storage format.

``--to BACKEND`` writes that backend's stored format (ffcv: ``train.beton``, ``val.beton``; wds:
``train/``, ``val/`` folders of tar shards; each with its manifest); ``--to folder`` writes a resized copy of the ImageFolder, so that every backend can read images stored at the
same resolution and quality (storage resolution dominates decode cost: compare like with like).
Every output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from loaders.contract import LoaderError, scan_imagefolder
from loaders.images import decode_rgb, shrink
from loaders.stored import temp_output

from .parallel import pool_map
from .synth import MANIFEST

SPLITS = ("train", "val")
FOLDER_MANIFEST = "storage.json"


def splits_of(root: Path) -> list[str]:
    if not root.is_dir():
        raise LoaderError(f"--data {root}: folder not found")
    found = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in found:
        raise LoaderError(f"--data {root}: expected an ImageFolder root with train/ (and val/)")
    return found


@contextmanager
def _tidy_on_failure(out: Path):
    """Remove ``out`` after a failed conversion if this run created it and left it empty."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def to_backend(backend, root: Path, out: Path, opts, workers: int | None = None) -> list[str]:
    """Every split of ``root`` in ``backend``'s stored format under ``out`` (each split written
    atomically by the backend); the summary line of each."""
    splits = splits_of(root)
    with _tidy_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        return [backend.convert(root / s, out, opts, workers)[1] for s in splits]


def _resize_one(args) -> tuple[int, int, int]:
    src, dst, max_resolution, quality = args
    try:
        image = shrink(decode_rgb(src), max_resolution)
    except Exception as exc:
        raise LoaderError(f"cannot convert {src}: {type(exc).__name__}: {exc}") from None
    image.save(dst, "JPEG", quality=quality)
    return os.path.getsize(dst), image.width, image.height


def to_folder(root: Path, out: Path, max_resolution: int, quality: int, workers: int | None = None) -> dict:
    """A copy of the ImageFolder with the longest side at most ``max_resolution``, re-encoded."""

    if max_resolution < 8 or not 1 <= quality <= 100:
        raise LoaderError("--max-resolution must be >= 8 and --jpeg-quality within 1..100")
    if out.exists():
        raise LoaderError(f"--out {out} exists; choose a new folder")
    with temp_output(out) as tmp:
        tasks = []
        for split in splits_of(root):
            index = scan_imagefolder(root / split)
            for path in index.paths:
                rel = Path(str(path)).relative_to(root)
                (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
                tasks.append((str(path), str((tmp / rel).with_suffix(".jpg")), max_resolution, quality))
        start = time.perf_counter()
        stats = pool_map(_resize_one, tasks, f"resizing to {max_resolution} px", workers)
        n = len(stats)
        manifest = {
            "kind": "loaderbench resized ImageFolder",
            "source": str(root.resolve()),
            "max_resolution": max_resolution,
            "jpeg_quality": quality,
            "images": n,
            "mean_bytes": sum(s[0] for s in stats) / n,
            "mean_width": sum(s[1] for s in stats) / n,
            "mean_height": sum(s[2] for s in stats) / n,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / FOLDER_MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    return manifest


def folder_storage(root: Path) -> dict:
    """An ImageFolder split's storage resolution and size, from the generator's or `--to folder`'s
    manifest, or else a sample of file headers."""
    for name, source in ((MANIFEST, "generated"), (FOLDER_MANIFEST, "bench data convert --to folder")):
        if (root.parent / name).is_file():
            m = json.loads((root.parent / name).read_text())
            sizes = {k: m[k] for k in ("mean_width", "mean_height", "mean_bytes")}
            if name == MANIFEST:
                return {"source": source, **sizes, "jpeg_quality": m["spec"]["quality"], "spec": m["spec"]}
            return {
                "source": source,
                **sizes,
                "jpeg_quality": m["jpeg_quality"],
                "max_resolution": m["max_resolution"],
            }
    from PIL import Image

    index = scan_imagefolder(root)
    picks = index.paths[:: max(1, len(index) // 32)][:32]
    sizes = []
    for p in picks:
        try:
            with Image.open(p) as im:
                sizes.append((im.width, im.height, os.path.getsize(p)))
        except Exception:
            continue
    w, h, b = (sum(col) / len(col) for col in zip(*sizes)) if sizes else (None, None, None)
    return {
        "source": "sampled headers",
        "files_sampled": len(sizes),
        "mean_width": w,
        "mean_height": h,
        "mean_bytes": b,
        "jpeg_quality": None,
    }
