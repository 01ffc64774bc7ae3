"""`wds` backend: an ImageFolder split written once to WebDataset tar shards, read back with
exact epochs under DDP.

Shards (``convert_shards``): samples in a seeded random order (so a shard holds every class),
balanced (shard sizes differ by at most one sample), the original JPEG bytes as ``<key>.jpg``,
the class as webdataset's ``<key>.cls`` (ASCII digits) and as ``<key>.lbl`` (int64 little-endian,
which DALI's ``fn.readers.webdataset`` reads as INT64), the source path as ``<key>.path``. A
``manifest.json`` (written last) lists every shard with its sample count, byte size and SHA-1; DALI index
files (``wds2idx``) sit beside the shards when DALI is installed.

Reading: each epoch the shard list is permuted (the same permutation on every rank, from seed and
epoch) and seen as one sequence of N samples. Rank r reads the contiguous range
[r * ceil(N/W), (r+1) * ceil(N/W)) of it, wrapping round for the at most W - 1 padded samples in
training; evaluation splits exactly. Within a rank, DataLoader workers take contiguous runs of whole
batches, so every rank yields exactly ``len(loader)`` batches whatever the worker count: no rank
waits for another at the end of an epoch. A range may start or end inside a shard: that shard is
read from its beginning and the samples before the range are skipped (sequential reads; the cost is
at most one shard per worker and epoch). Samples are shuffled within each worker by webdataset's
shuffle buffer, then decoded and transformed by torchvision exactly as the ``torch`` backend does
(same seeded augmentation per sample and epoch), batched in the workers, and copied to the device
and normalised as ``torch`` does.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .contract import (VERIFY_MAX_BYTES, BaseLoader, LoaderConfig, LoaderError, cache_dir, file_sha1, num_batches,
                       scan_imagefolder, shard_sizes, temp_output)
from .pytorch import (BadSample, DeviceFeed, WorkerEpochs, augment, check_timeout, collate_checked, quiet_hand_over,
                      transform_for)

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


@dataclass(frozen=True)
class Options:
    num_workers: int = 0
    pin_memory: bool = False
    non_blocking: bool | None = None  # None: follow pin_memory
    prefetch_factor: int | None = None
    device_normalize: bool = False  # uint8 batches, normalised on the device
    timeout: float = 0  # seconds to wait for one batch from the workers; 0 waits forever
    shuffle_buffer: int = 1000  # samples per worker in webdataset's shuffle buffer (training)
    # storage choices when data is an ImageFolder split converted on first use
    shard_samples: int | None = None
    shard_mb: float = 64.0
    max_resolution: int | None = None
    jpeg_quality: int = 90


def _import_wds():
    try:
        import webdataset
    except ImportError:
        raise LoaderError("webdataset is not installed: pip install 'loaderbench[wds]'") from None
    return webdataset


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
            fmt = im.format
            if fmt == "JPEG" and max_resolution is None:
                return Path(path).read_bytes(), False
            image = im.convert("RGB")
    except Exception as exc:
        raise LoaderError(f"cannot convert {path}: {type(exc).__name__}: {exc}") from None
    if max_resolution is not None and max(image.size) > max_resolution:  # never upscale
        scale = max_resolution / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
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


def convert_shards(split: Path | str, out: Path | str, sharding: Sharding = Sharding(), workers: int | None = None,
                   progress: bool = True) -> dict:
    """Write ImageFolder ``split`` as tar shards in the new folder ``out``.

    Everything is written in a hidden sibling folder and renamed when complete, manifest last:
    an interrupted conversion leaves no ``out`` (and a folder without a manifest is refused).
    """
    wds = _import_wds()
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
        bar = tqdm(total=n, desc=f"{split.name} -> {len(bounds) - 1} shards", unit="img", disable=not progress)
        try:
            for j in range(len(bounds) - 1):
                name = SHARD_PATTERN % j
                # Fixed mtime: the same input writes byte-identical shards.
                with wds.TarWriter(str(tmp / name), encoder=False, mtime=0) as sink:
                    for i in order[bounds[j]:bounds[j + 1]]:
                        data, was_reencoded = next(encoded)
                        label = int(index.labels[i])
                        sink.write({"__key__": f"{i:09d}", "jpg": data, "cls": str(label).encode(),
                                    "lbl": np.int64(label).tobytes(),
                                    "path": os.path.relpath(str(index.paths[i]), split).encode()})
                        reencoded += was_reencoded
                        image_bytes += len(data)
                        bar.update()
                shards.append({"file": name, "samples": int(bounds[j + 1] - bounds[j]),
                               "bytes": (tmp / name).stat().st_size, "sha1": file_sha1(tmp / name)})
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
            "storage": {"max_resolution": sharding.max_resolution,
                        "jpeg_quality": sharding.jpeg_quality if sharding.max_resolution else None,
                        "reencoded": reencoded, "mean_bytes": image_bytes / n},
            "fields": {"jpg": "image bytes", "cls": "class index, ASCII", "lbl": "class index, int64 LE",
                       "path": "source path relative to the split"},
            "dali_index": dali_index,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    if progress:
        size = sum(s["bytes"] for s in shards)
        print(f"wds: wrote {out} ({len(shards)} shards, {size / 1e6:.1f} MB, {n} samples) in "
              f"{manifest['seconds']:.1f} s")
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """The manifest of a complete, undamaged set of shards, or a LoaderError naming what is wrong.
    A flipped byte inside a JPEG's bytes can still decode (to garbage), so each shard's checksum,
    recorded at conversion, is checked when the shards total at most VERIFY_MAX_BYTES (about 0.1 s
    per 100 MB); manifests without checksums get the size checks only."""
    folder = Path(folder)
    m_path = folder / MANIFEST
    if not folder.is_dir():
        raise LoaderError(f"wds shard folder not found: {folder}")
    if not m_path.is_file():
        raise LoaderError(f"{folder} has no {MANIFEST}: not a shard folder, or an interrupted conversion; "
                          "convert with `bench data convert --to wds`")
    try:
        manifest = json.loads(m_path.read_text())
        assert manifest["kind"] == KIND
    except (ValueError, KeyError, AssertionError):
        raise LoaderError(f"{m_path} is damaged or not ours; convert again") from None
    for s in manifest["shards"]:
        path = folder / s["file"]
        if not path.is_file():
            raise LoaderError(f"shard {path} is missing (listed in {m_path})")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise LoaderError(f"shard {path} is {'truncated' if size < s['bytes'] else 'damaged'}: {size} bytes, "
                              f"its manifest says {s['bytes']}; convert again")
    if verify and sum(s["bytes"] for s in manifest["shards"]) <= VERIFY_MAX_BYTES:
        for s in manifest["shards"]:
            if "sha1" in s and file_sha1(folder / s["file"]) != s["sha1"]:
                raise LoaderError(f"shard {folder / s['file']} is damaged: its content differs from the checksum "
                                  "recorded when it was converted; convert again")
    return manifest


def is_shard_folder(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def cached_shards(split: Path, sharding: Sharding, progress: bool = True) -> Path:
    """The shards of an ImageFolder split under these choices, converted on first use."""
    out = cache_dir("wds", split, asdict(sharding)) / split.name
    try:
        read_manifest(out)
        return out
    except LoaderError:
        shutil.rmtree(out, ignore_errors=True)  # absent or damaged: write it (again)
    try:
        convert_shards(split, out, sharding, progress=progress)
    except (LoaderError, OSError) as exc:
        try:
            read_manifest(out)  # another process (rank) finished the same conversion first: use it
        except LoaderError:
            raise exc from None
    return out


def _sharding(opts: Options) -> Sharding:
    return Sharding(opts.shard_samples, opts.shard_mb, opts.max_resolution, opts.jpeg_quality)


def resolve_shards(data: Path, sharding: Sharding, progress: bool) -> tuple[Path, dict]:
    """(shard folder, manifest) for ``data``: a shard folder, or an ImageFolder split to convert."""
    if not is_shard_folder(data) and data.is_dir() and not list(data.glob("*.tar")):
        data = cached_shards(data, sharding, progress=progress)
        return data, read_manifest(data, verify=False)  # checked (or just written) there
    return data, read_manifest(data)


def prepare(split: Path, opts: Options) -> None:
    """Convert an ImageFolder split once, before several ranks start (they then find it cached)."""
    check_sharding(_sharding(opts))
    resolve_shards(Path(split), _sharding(opts), progress=True)


# --- Reading ---------------------------------------------------------------------------------


def rank_range(n: int, rank: int, world_size: int, train: bool) -> tuple[int, int]:
    """[start, stop) of this rank in the epoch's sequence; in training the sequence is padded to
    world_size * ceil(n / world_size) by wrapping round (the same rule as every backend)."""
    if train:
        per_rank, _ = shard_sizes(n, world_size, pad=True)
        return rank * per_rank, (rank + 1) * per_rank
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def worker_range(start: int, stop: int, batch_size: int, drop_last: bool, worker: int, workers: int):
    """The worker's share of [start, stop): a contiguous run of whole batches (the last one partial)."""
    m = stop - start
    if drop_last:
        m -= m % batch_size
    nb = math.ceil(m / batch_size)
    first, last = nb * worker // workers, nb * (worker + 1) // workers
    return start + first * batch_size, start + min(last * batch_size, m)


def plan(counts: list[int], order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard, skip, take) parts covering positions [start, stop) of the concatenation of the
    shards in ``order``; positions past the end wrap round to the beginning (padding)."""
    sizes = [counts[s] for s in order]
    ends = list(itertools.accumulate(sizes))
    n = ends[-1]
    parts = []
    pos = start
    while pos < stop:
        p = pos % n
        k = next(j for j, e in enumerate(ends) if e > p)
        skip = p - (ends[k] - sizes[k])
        take = min(sizes[k] - skip, stop - pos)
        parts.append((order[k], skip, take))
        pos += take
    return parts


@dataclass(frozen=True)
class _Failed:
    message: str  # a shard that cannot be read: raised in the main process as one clear line


class _ShardStream(IterableDataset):
    """One worker's batches for one epoch (the epoch is fixed when the DataLoader iterator starts)."""

    def __init__(self, loader: "WdsLoader"):
        cfg = loader.config
        self.cfg = cfg
        self.folder = loader.folder
        self.files = [s["file"] for s in loader.manifest["shards"]]
        self.counts = [s["samples"] for s in loader.manifest["shards"]]
        self.transform = transform_for(cfg, float_in_workers=not loader.options.device_normalize)
        self.shuffle_buffer = loader.options.shuffle_buffer
        self.epoch = 0

    def _order(self) -> list[int]:
        if not self.cfg.train:
            return list(range(len(self.files)))
        g = torch.Generator().manual_seed(self.cfg.seed + self.epoch)  # the same on every rank
        return torch.randperm(len(self.files), generator=g).tolist()

    def parts(self, worker: int, workers: int) -> list[tuple[int, int, int]]:
        cfg = self.cfg
        start, stop = rank_range(sum(self.counts), cfg.rank, cfg.world_size, cfg.train)
        a, b = worker_range(start, stop, cfg.batch_size, cfg.drop_last, worker, workers)
        return plan(self.counts, self._order(), a, b) if b > a else []

    def _samples(self, parts):
        wds = _import_wds()
        for shard, skip, take in parts:
            url = str(self.folder / self.files[shard])

            def fail(exc, url=url):  # webdataset's handler: re-raise as one line naming the shard
                if isinstance(exc, LoaderError):
                    raise exc
                why = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
                raise LoaderError(f"cannot read shard {url}: {type(exc).__name__}: {why}")

            stream = wds.tarfile_samples([{"url": url}], handler=fail)
            got = 0
            for sample in itertools.islice(stream, skip, skip + take):
                got += 1
                yield sample
            stream.close()
            if got < take:
                raise LoaderError(f"shard {url} ended after {skip + got} samples, its manifest lists "
                                  f"{self.counts[shard]}: damaged; convert again")

    def _decode_batch(self, samples):
        from PIL import Image

        out = []
        for s in samples:
            where = f"{s.get('__url__')} sample {s['__key__']} ({s.get('path', b'?').decode()})"
            try:
                label = int(s["cls"])
                with Image.open(io.BytesIO(s["jpg"])) as im:
                    image = im.convert("RGB")  # the full decode: damage shows here
            except Exception as exc:
                out.append(BadSample(where, f"{type(exc).__name__}: {exc}"))
                continue
            out.append((augment(self.transform, image, self.cfg.seed, self.epoch, int(s["__key__"])), label))
        return collate_checked(out)

    def __iter__(self):
        wds = _import_wds()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        samples = self._samples(self.parts(worker, workers))
        if self.cfg.train and self.shuffle_buffer > 1:
            seed = hash((self.cfg.seed, self.epoch, self.cfg.rank, worker)) & 0x7FFF_FFFF
            # The first samples leave once a tenth of the buffer is full (webdataset's ratio), not the
            # whole of it: a full fill stalls every epoch's start by reading the worker's whole range.
            samples = wds.shuffle(self.shuffle_buffer, max(1, self.shuffle_buffer // 10), seed=seed)(samples)
        # Batches of raw samples first, decoded after: a skipped bad sample shrinks its batch but
        # never changes how many batches a rank yields.
        batches = wds.batched(self.cfg.batch_size, collation_fn=self._decode_batch, partial=True)(samples)
        try:
            yield from batches
        except LoaderError as exc:
            yield _Failed(str(exc))


def build(cfg: LoaderConfig, opts: Options) -> "WdsLoader":
    _import_wds()
    if opts.num_workers < 0:
        raise LoaderError(f"num_workers must be >= 0, got {opts.num_workers}")
    if opts.num_workers == 0 and opts.prefetch_factor is not None:
        raise LoaderError("prefetch_factor needs num_workers >= 1")
    if opts.prefetch_factor is not None and opts.prefetch_factor < 1:
        raise LoaderError(f"prefetch_factor must be >= 1, got {opts.prefetch_factor}")
    if opts.shuffle_buffer < 0:
        raise LoaderError(f"shuffle_buffer must be >= 0, got {opts.shuffle_buffer}")
    check_timeout(opts)
    sharding = _sharding(opts)
    check_sharding(sharding)
    if cfg.data is None:
        raise LoaderError("the wds backend needs data= (a shard folder, or an ImageFolder split to convert)")
    folder, manifest = resolve_shards(Path(cfg.data), sharding, progress=cfg.rank == 0)
    if manifest["samples"] < cfg.world_size:
        raise LoaderError(f"{manifest['samples']} samples in {folder} cannot be split over {cfg.world_size} ranks")
    shards, streams = len(manifest["shards"]), cfg.world_size * max(1, opts.num_workers)
    if shards < streams:
        raise LoaderError(
            f"{folder} has {shards} shards, fewer than ranks x workers = {cfg.world_size} x "
            f"{max(1, opts.num_workers)}: each worker streams its own shards; convert with more shards "
            "(bench data convert --to wds --shard-samples N) or use fewer workers")
    return WdsLoader(cfg, opts, folder, manifest)


class WdsLoader(BaseLoader):
    name = "wds"

    def __init__(self, cfg: LoaderConfig, opts: Options, folder: Path, manifest: dict):
        n = manifest["samples"]
        start, stop = rank_range(n, cfg.rank, cfg.world_size, cfg.train)
        padding = shard_sizes(n, cfg.world_size, pad=True)[1] if cfg.train else 0
        super().__init__(cfg, stop - start, padding, tuple(manifest["classes"]))
        self.options, self.folder, self.manifest = opts, folder, manifest
        self._cuda = cfg.device.type == "cuda"
        self._feed = DeviceFeed(cfg, opts.device_normalize,
                                opts.pin_memory if opts.non_blocking is None else opts.non_blocking)
        self._stream = _ShardStream(self)
        self._loader = WorkerEpochs(DataLoader(self._stream, batch_size=None, num_workers=opts.num_workers,
                                               pin_memory=opts.pin_memory and self._cuda,
                                               prefetch_factor=opts.prefetch_factor, timeout=opts.timeout,
                                               worker_init_fn=quiet_hand_over), self.name)

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            decode="cpu (PIL) in DataLoader workers" if self.options.num_workers else "cpu (PIL) in the main process",
            normalize="device" if self.options.device_normalize else "workers",
            options={k: getattr(self.options, k) for k in self.options.__dataclass_fields__},
            shards=len(self.manifest["shards"]),
            shard_folder=str(self.folder),
            storage={**self.manifest["storage"], "sharding": self.manifest["sharding"]},
        )
        return d

    def _batches(self):
        self._stream.epoch = self.epoch  # workers copy the dataset when the iterator starts
        expected = num_batches(self.num_samples, self.config.batch_size, self.config.drop_last)
        got = 0
        for item in self._loader:
            if isinstance(item, _Failed):
                raise LoaderError(item.message)
            images, labels, bad = item
            got += 1
            self._skip_or_raise(bad, batch_empty=images is None)
            if images is not None:
                yield images, labels
        if got != expected:  # cannot happen unless the plan is wrong: never let ranks disagree silently
            raise LoaderError(f"wds rank {self.config.rank} produced {got} batches, expected {expected}")

    def __iter__(self):
        return self._feed(self._batches())

    def close(self) -> None:
        self._loader.close()
