"""The tar-shard stored format (WebDataset's layout), shared by the backends that read shards.

Shards (``convert_shards``): samples in a seeded random order (so a shard holds every class),
balanced (shard sizes differ by at most one sample), the original JPEG bytes as ``<key>.jpg``,
the class as webdataset's ``<key>.cls`` (ASCII digits) and as ``<key>.lbl`` (int64 little-endian,
which DALI's ``fn.readers.webdataset`` reads as INT64), the source path as ``<key>.path``. A
``manifest.json`` (written last) lists every shard with its sample count, byte size and SHA-1; DALI
index files (``wds2idx``) sit beside the shards when DALI is installed.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import objstore
from .contract import LoaderError, scan_imagefolder
from .images import shrink
from .stored import cache_dir, cached, file_entry, require_manifest, temp_output, verify_files
from .stored import read_manifest as read_own_manifest

MANIFEST = "manifest.json"
KIND = "loaderbench webdataset shards"
SHARD_PATTERN = "shard-%06d.tar"
MIN_SHARDS = 16  # by default, so that up to 16 ranks x workers each stream their own shards


@dataclass(frozen=True)
class Sharding:
    """How a split is written to shards (recorded in the manifest)."""

    shard_samples: int | None = None  # samples per shard; None: from shard_mb
    shard_mb: float = 64.0  # target shard size when shard_samples is None (at least MIN_SHARDS shards)
    max_resolution: int | None = None  # re-encode with the longest side capped; None keeps the bytes
    jpeg_quality: int = 90  # for re-encoded images only
    seed: int = 0  # the sample order written


def import_wds():
    try:
        import webdataset
    except ImportError:
        raise LoaderError("webdataset is not installed: pip install 'loaderbench[wds]'") from None
    # Shards in a bucket are streamed whole through boto3, with its bounded timeouts and retries.
    webdataset.gopen_schemes.setdefault("s3", lambda url, mode="rb", bufsize=8192, **kw: objstore.Stream(url))
    return webdataset


def shard_path(folder: Path | str, name: str) -> Path | str:
    """A file of a shard folder: a local path, or an s3:// URL when the folder is a bucket prefix."""
    return objstore.join(folder, name) if objstore.is_url(folder) else Path(folder) / name


def check_sharding(s: Sharding) -> None:
    if s.shard_samples is not None and s.shard_samples < 1:
        raise LoaderError(f"shard_samples must be >= 1, got {s.shard_samples}")
    if not s.shard_mb > 0:
        raise LoaderError(f"shard_mb must be > 0, got {s.shard_mb}")
    if s.max_resolution is not None and s.max_resolution < 8:
        raise LoaderError(f"max_resolution must be >= 8, got {s.max_resolution}")
    if not 1 <= s.jpeg_quality <= 100:
        raise LoaderError(f"jpeg_quality must be within 1..100, got {s.jpeg_quality}")


# --- Writing ---------------------------------------------------------------------------------


def _image_bytes(args) -> tuple[bytes, bool]:
    """(JPEG bytes, re-encoded?) of one file: its own bytes when it is a JPEG and no resize is asked."""
    path, max_resolution, quality = args
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and max_resolution is None:
                return Path(path).read_bytes(), False
            image = im.convert("RGB")
    except Exception as exc:
        raise LoaderError(f"cannot convert {path}: {type(exc).__name__}: {exc}") from None
    buf = io.BytesIO()
    shrink(image, max_resolution).save(buf, "JPEG", quality=quality)
    return buf.getvalue(), True


def shard_bounds(n: int, sharding: Sharding, total_bytes: int) -> np.ndarray:
    """Start of each shard and the end, so that shard sizes differ by at most one sample."""
    if sharding.shard_samples is not None:
        count = math.ceil(n / sharding.shard_samples)
    else:
        count = max(math.ceil(total_bytes / (sharding.shard_mb * 1e6)), min(MIN_SHARDS, n))
    return np.array([n * j // count for j in range(count + 1)])


def _write_index(tar: Path) -> bool:
    """DALI's index for one shard (random access for fn.readers.webdataset), if DALI is installed."""
    try:
        from wds2idx import IndexCreator  # installed with nvidia-dali
    except ImportError:
        return False
    with IndexCreator(str(tar), str(tar.with_suffix(".idx")), verbose=False) as creator:
        creator.create_index()
    return True


def convert_shards(split: Path, out: Path, sharding=Sharding(), workers=None, progress=True) -> dict:
    """Write ImageFolder ``split`` as tar shards in the new folder ``out``.

    Everything is written in a hidden sibling folder and renamed when complete, manifest last:
    an interrupted conversion leaves no ``out`` (and a folder without a manifest is refused).
    """
    wds = import_wds()
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    check_sharding(sharding)
    split, out = Path(split), Path(out)
    if out.exists():
        raise LoaderError(f"{out} exists; choose a new folder (or remove it)")
    index = scan_imagefolder(split)
    n = len(index)
    order = np.random.default_rng(sharding.seed).permutation(n)
    total = sum(os.path.getsize(p) for p in index.paths)
    bounds = shard_bounds(n, sharding, total)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = ((str(index.paths[i]), sharding.max_resolution, sharding.jpeg_quality) for i in order)
    shards, reencoded, image_bytes = [], 0, 0
    with temp_output(out) as tmp:
        tmp.mkdir()
        reencode = sharding.max_resolution is not None
        pool = ProcessPoolExecutor(max_workers=workers or os.cpu_count()) if reencode else None
        encoded = pool.map(_image_bytes, tasks, chunksize=16) if pool else map(_image_bytes, tasks)
        bar = tqdm(
            total=n, desc=f"{split.name} -> {len(bounds) - 1} shards", unit="img", disable=not progress
        )
        try:
            for j in range(len(bounds) - 1):
                name = SHARD_PATTERN % j
                # Fixed mtime: the same input writes byte-identical shards.
                with wds.TarWriter(str(tmp / name), encoder=False, mtime=0) as sink:
                    for i in order[bounds[j] : bounds[j + 1]]:
                        data, was_reencoded = next(encoded)
                        label = int(index.labels[i])
                        sink.write(
                            {
                                "__key__": f"{i:09d}",
                                "jpg": data,
                                "cls": str(label).encode(),
                                "lbl": np.int64(label).tobytes(),
                                "path": os.path.relpath(str(index.paths[i]), split).encode(),
                            }
                        )
                        reencoded += was_reencoded
                        image_bytes += len(data)
                        bar.update()
                shards.append(file_entry(tmp / name, samples=int(bounds[j + 1] - bounds[j])))
        finally:
            bar.close()
            if pool:
                pool.shutdown(cancel_futures=True)
        dali_index = all([_write_index(tmp / s["file"]) for s in shards])
        manifest = {
            "kind": KIND,
            "source": str(split.resolve()),
            "samples": n,
            "classes": list(index.classes),
            "shards": shards,
            "sharding": asdict(sharding),
            "storage": {
                "max_resolution": sharding.max_resolution,
                "jpeg_quality": sharding.jpeg_quality if sharding.max_resolution else None,
                "reencoded": reencoded,
                "mean_bytes": image_bytes / n,
            },
            "fields": {
                "jpg": "image bytes",
                "cls": "class index, ASCII",
                "lbl": "class index, int64 LE",
                "path": "source path relative to the split",
            },
            "dali_index": dali_index,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    if progress:
        size = sum(s["bytes"] for s in shards)
        print(
            f"wds: wrote {out} ({len(shards)} shards, {size / 1e6:.1f} MB, {n} samples) in "
            f"{manifest['seconds']:.1f} s"
        )
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """The manifest of a complete, undamaged set of shards, or a LoaderError naming what is wrong.
    A flipped byte inside a JPEG's bytes can still decode (to garbage), so each shard's checksum,
    recorded at conversion, is checked (``verify_files``); manifests without checksums get the size
    checks only."""
    folder = Path(folder)
    m_path = folder / MANIFEST
    require_manifest(folder, m_path, "wds shard folder", "wds")
    manifest = read_own_manifest(m_path, KIND)
    verify_files(folder, manifest["shards"], "shard", verify)
    return manifest


def read_remote_manifest(url: str) -> dict:
    """The manifest of a shard folder in a bucket, every shard it lists present at its size (their
    checksums are not read back: a shard cut short is found when it is streamed)."""
    listed = objstore.listing(url)
    if MANIFEST not in listed:
        raise LoaderError(
            f"{url} has no {MANIFEST}: not a shard folder, or its upload did not finish "
            "(`bench data upload` writes it last)"
        )
    try:
        manifest = json.loads(objstore.get(objstore.join(url, MANIFEST)))
        assert manifest["kind"] == KIND
    except (ValueError, KeyError, AssertionError, TypeError):
        raise LoaderError(f"{objstore.join(url, MANIFEST)} is damaged or not ours; upload again") from None
    for e in manifest["shards"]:
        if e["file"] not in listed:
            raise LoaderError(f"shard {objstore.join(url, e['file'])} is missing (listed in its manifest)")
        if listed[e["file"]] != e["bytes"]:
            raise LoaderError(
                f"shard {objstore.join(url, e['file'])} is {listed[e['file']]} bytes, its manifest says "
                f"{e['bytes']}: upload again"
            )
    return manifest


def is_shard_folder(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def cached_shards(split: Path, sharding: Sharding, progress: bool = True) -> Path:
    """The shards of an ImageFolder split under these choices, converted on first use."""
    return cached(
        cache_dir("wds", split, asdict(sharding)) / split.name,
        read_manifest,
        lambda out: convert_shards(split, out, sharding, progress=progress),
    )


def resolve_shards(data: Path, sharding: Sharding, progress: bool) -> tuple[Path, dict]:
    """(shard folder, manifest) for ``data``: a shard folder (local or in a bucket), or an ImageFolder
    split to convert."""
    if objstore.is_url(data):
        return data, read_remote_manifest(data)
    if not is_shard_folder(data) and data.is_dir() and not list(data.glob("*.tar")):
        data = cached_shards(data, sharding, progress=progress)
        return data, read_manifest(data, verify=False)  # checked (or just written) there
    return data, read_manifest(data)


def storage_stats(manifest: dict) -> dict:
    return {
        "source": manifest["source"],
        "mean_width": None,
        "mean_height": None,
        "mean_bytes": manifest["storage"]["mean_bytes"],
        "jpeg_quality": manifest["storage"]["jpeg_quality"],
    }


def summary(out: Path, m: dict) -> str:
    sizes, counts = [s["bytes"] for s in m["shards"]], [s["samples"] for s in m["shards"]]
    return (
        f"{out}: {len(sizes)} shards of {min(counts)}-{max(counts)} samples, {min(sizes) / 1e6:.1f}-"
        f"{max(sizes) / 1e6:.1f} MB, in {m['seconds']:.1f} s"
        + ("" if m["dali_index"] else " (no DALI index: DALI not installed)")
    )
