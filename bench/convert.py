"""`bench data convert`: an ImageFolder root (train/, val/) to another storage format.

``--to ffcv`` writes ``train.beton`` and ``val.beton`` (each with its manifest); ``--to wds`` writes
``train/`` and ``val/`` folders of tar shards (each with its manifest); ``--to folder``
writes a resized copy of the ImageFolder, so that every backend can read images stored at the
same resolution and quality (storage resolution dominates decode cost: compare like with like).
Every output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from loaders.contract import LoaderError, scan_imagefolder, temp_output

SPLITS = ("train", "val")
FOLDER_MANIFEST = "storage.json"
WDS_MANIFEST = "manifest.json"  # loaders.wds.MANIFEST (kept here so the harness need not import webdataset)


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


def to_ffcv(root: Path, out: Path, storage, workers: int | None = None) -> list[dict]:
    from loaders.ffcv import convert_beton

    splits = splits_of(root)
    with _tidy_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        return [convert_beton(root / s, out / f"{s}.beton", storage, workers=workers) for s in splits]


def to_wds(root: Path, out: Path, sharding, workers: int | None = None) -> list[dict]:
    """``out/train`` and ``out/val``: tar shards and their manifests (each split written atomically)."""
    from loaders.wds import convert_shards

    splits = splits_of(root)
    taken = [out / s for s in splits if (out / s).exists()]
    if taken:
        raise LoaderError(f"--out {out}: {taken[0]} exists; choose a new folder")
    with _tidy_on_failure(out):
        return [convert_shards(root / s, out / s, sharding, workers=workers) for s in splits]


def _resize_one(args) -> tuple[int, int, int]:
    src, dst, max_resolution, quality = args
    from PIL import Image

    try:
        with Image.open(src) as im:
            image = im.convert("RGB")
    except Exception as exc:
        raise LoaderError(f"cannot convert {src}: {type(exc).__name__}: {exc}") from None
    scale = max_resolution / max(image.size)
    if scale < 1:  # never upscale
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    image.save(dst, "JPEG", quality=quality)
    return os.path.getsize(dst), image.width, image.height


def to_folder(root: Path, out: Path, max_resolution: int, quality: int, workers: int | None = None) -> dict:
    """A copy of the ImageFolder with the longest side at most ``max_resolution``, re-encoded."""
    from tqdm import tqdm

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
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            stats = list(tqdm(pool.map(_resize_one, tasks, chunksize=16), total=len(tasks),
                              desc=f"resizing to {max_resolution} px", unit="img"))
        n = len(stats)
        manifest = {"kind": "loaderbench resized ImageFolder", "source": str(root.resolve()),
                    "max_resolution": max_resolution, "jpeg_quality": quality, "images": n,
                    "mean_bytes": sum(s[0] for s in stats) / n, "mean_width": sum(s[1] for s in stats) / n,
                    "mean_height": sum(s[2] for s in stats) / n, "seconds": round(time.perf_counter() - start, 2)}
        (tmp / FOLDER_MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    return manifest
