"""Streaming formats' shared layer (the ``litdata`` and ``mosaic`` backends): an ImageFolder split
written once with the library's own writer, read back through the library's own dataset.

Written (``convert``): every sample's original JPEG bytes, its label and its ImageFolder index, in
a seeded random order (so that a chunk holds every class), in chunks or shards of ``chunk_mb``,
under a temporary sibling renamed into place when complete, with our manifest (``loaderbench.json``:
classes, source paths, the written order, every file's size and SHA-1) written last.

Read: the library's ``StreamingDataset`` over the folder, or over its ``s3://`` URL, which the library
downloads chunk by chunk with its own S3 client into a private local cache (what it fetched is
reported as staging, as FFCV's copy is). Samples are taken by index in the contract's order (the
permutation of seed + epoch, strided by rank, padded as every index-order backend pads), so ranks
read every sample exactly once and a state continues on any number of ranks and workers; the
libraries' own shuffles are not used (docs/backends.md says what that changes). DataLoader workers
decode and augment as the torch backend does; batches reach the device as torch's do.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import objstore
from .backend import Backend
from .contract import BaseLoader, LoaderConfig, LoaderError, StateError, rank_share, scan_imagefolder
from .feed import DeviceFeed
from .images import check_decoder, collate_checked, describe_pipeline, sample, transform_for
from .samples import EpochKeys
from .stored import (
    _alive,
    cache_dir,
    cached,
    file_entry,
    read_manifest,
    require_manifest,
    temp_output,
    verify_files,
    write_json,
)
from .workers import check_worker_options, worker_loader

MANIFEST = "loaderbench.json"


@dataclass(frozen=True)
class Options:
    num_workers: int = 0
    pin_memory: bool = False
    non_blocking: bool | None = None  # None: follow pin_memory
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    device_normalize: bool = False  # uint8 batches, normalised on the device
    timeout: float = 0  # seconds to wait for one batch from the workers; 0 waits forever
    decode: str = "cpu"  # cpu (torchvision.io, PIL fallback) | pil
    chunk_mb: float = 64.0  # chunk (litdata) or shard (mosaic) size when an ImageFolder is converted
    order: str = "random"  # random: the contract's permutation | chunks: windows within a chunk


ORDERS = ("random", "chunks")
WINDOW = 256  # samples a chunk-local window holds: LitData's item_shuffle_window and Arrow batch


class Format:
    """What a streaming library adds to this layer: its writer, its dataset and its record."""

    kind: str  # the manifest's kind, e.g. "loaderbench litdata"
    backend: str  # the backend's name, which is also `bench data convert --to`'s
    per_process = True  # each worker opens its own dataset; False: workers use the parent's

    def write(self, index, order, out: Path, chunk_bytes: int, workers: int, progress: bool) -> None:
        """Write every sample of ``index`` (a FolderIndex) under ``out`` with the library's writer, in
        ``order`` (ImageFolder indices), as records {"index": ImageFolder index, "jpg": the file's
        bytes, "cls": its label}."""
        raise NotImplementedError

    def open(self, location: str, cache: Path | None, cfg: LoaderConfig):
        """The library's dataset over ``location`` (a local folder, or an s3:// URL read into ``cache``)."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def chunk_samples(self, out: Path) -> list[int]:
        """Samples in each chunk (or shard) just written under ``out``, in the order written."""
        raise NotImplementedError

    def close(self, dataset) -> None:
        """Release what the library's dataset holds (a dropped reference is enough for most)."""

    def forget(self, cache: Path) -> None:
        """Free what a killed process left behind for its private cache ``cache``."""


def _item(index, i: int) -> dict:
    with open(index.paths[i], "rb") as f:
        return {"index": i, "jpg": f.read(), "cls": int(index.labels[i])}


def convert(fmt: Format, split: Path, out: Path, chunk_mb: float, workers=None, progress=True) -> dict:
    """Write ``split`` to ``out`` in ``fmt``; returns the manifest (written last)."""
    index = scan_imagefolder(split)
    out = Path(out)
    if out.exists():
        raise LoaderError(f"{out} exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, workers or min(4, len(os.sched_getaffinity(0))))
    t0 = time.perf_counter()
    # a seeded random order, as our shards are written: an ImageFolder's order is by class, so a
    # chunk (and a window of order=chunks) would otherwise hold one or two classes
    order = np.random.default_rng(0).permutation(len(index))
    with temp_output(out) as tmp:
        fmt.write(index, order, tmp, int(chunk_mb * 1e6), workers, progress)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "kind": fmt.kind,
            "library": fmt.version(),
            "samples": len(index),
            "classes": list(index.classes),
            "source": str(Path(split).resolve()),
            "sources": [str(Path(p).relative_to(index.root)) for p in index.paths],
            "chunk_mb": chunk_mb,
            "chunk_samples": fmt.chunk_samples(tmp),
            "positions": order.tolist(),  # the ImageFolder index of each record, in the order written
            "files": [file_entry(p) | {"file": str(p.relative_to(tmp))} for p in files],
            "bytes": sum(p.stat().st_size for p in files),
            "mean_bytes": round(sum(os.path.getsize(p) for p in index.paths) / len(index)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json(tmp / MANIFEST, manifest)
        os.replace(tmp, out)
    return manifest


def read_local_manifest(fmt: Format, folder: Path, verify: bool = True) -> dict:
    require_manifest(folder, folder / MANIFEST, f"{fmt.kind} folder", fmt.backend)
    manifest = read_manifest(folder / MANIFEST, fmt.kind)
    verify_files(folder, manifest["files"], f"{fmt.kind} file", verify)
    return manifest


def read_remote_manifest(fmt: Format, url: str) -> dict:
    import json

    where = objstore.join(url, MANIFEST)
    try:
        manifest = json.loads(objstore.get(where))
        assert manifest["kind"] == fmt.kind
    except objstore.MissingObject:
        raise LoaderError(
            f"{url} has no {MANIFEST}: not a {fmt.kind} folder, or an interrupted upload "
            f"(`bench data convert --to {fmt.backend}`, then `bench data upload`)"
        ) from None
    except (ValueError, KeyError, AssertionError, TypeError):
        raise LoaderError(f"{where} is damaged or not ours; convert again") from None
    return manifest


def is_folder(fmt: Format, path: Path) -> bool:
    if not (path / MANIFEST).is_file():
        return False
    try:
        return read_manifest(path / MANIFEST, fmt.kind) is not None
    except LoaderError:
        return False


class PrivateCache:
    """A local folder of this process that a library downloads a bucket's chunks into, removed at
    ``remove()``; folders of processes that are gone (killed runs) are removed when the next one is
    made, with ``forget`` called on each (mosaic frees the shared memory a killed run left)."""

    def __init__(self, kind: str, forget=None):
        root = Path(os.environ.get("LOADERBENCH_CACHE", Path.home() / ".cache" / "loaderbench")) / "streamed"
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f"{kind}-*"):
            pid = old.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                if forget is not None:
                    forget(old)
                shutil.rmtree(old, ignore_errors=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class StreamedBackend(Backend):
    """A streaming format's backend: ``fmt`` says which library; the rest is shared."""

    fmt: Format
    Options = Options
    knobs = {
        "workers": "num_workers",
        "pin_memory": "pin_memory",
        "persistent": "persistent_workers",
        "prefetch": "prefetch_factor",
        "device_normalize": "device_normalize",
    }
    prefetch_values = (2, 4, 8)
    reads_s3 = True

    def build(self, cfg: LoaderConfig, opts: Options) -> StreamedLoader:
        check_worker_options(opts)
        check_decoder(opts.decode, self.name)
        _check_chunk(opts.chunk_mb)
        if opts.order not in ORDERS:
            raise LoaderError(f"-o order={opts.order}: {self.name} reads in order {' or '.join(ORDERS)}")
        if cfg.data is None:
            raise LoaderError(
                f"the {self.name} backend needs data= (a {self.stored_format} folder, its s3:// URL, "
                "or an ImageFolder split to convert)"
            )
        if objstore.is_url(cfg.data):
            return StreamedLoader(cfg, opts, self.fmt, cfg.data, read_remote_manifest(self.fmt, cfg.data))
        data = Path(cfg.data)
        converted = not is_folder(self.fmt, data)
        if converted:
            data = self._cached(data, opts, progress=cfg.rank == 0)
        return StreamedLoader(
            cfg, opts, self.fmt, str(data), read_local_manifest(self.fmt, data, not converted)
        )

    def _cached(self, split: Path, opts: Options, progress: bool = True) -> Path:
        scan_imagefolder(split)  # names a missing or empty folder before anything is written
        out = cache_dir(self.name, split, {"chunk_mb": opts.chunk_mb}) / split.name
        return cached(
            out,
            lambda p: _current(read_local_manifest(self.fmt, p), p),
            lambda p: convert(self.fmt, split, p, opts.chunk_mb, progress=progress),
        )

    def stored(self, split: Path, opts: Options) -> Path:
        _check_chunk(opts.chunk_mb)
        split = Path(split)
        return split if is_folder(self.fmt, split) else self._cached(split, opts)

    def locate(self, root: Path, split: str, opts) -> Path | None:
        return root / split if is_folder(self.fmt, root / split) else None

    def holds(self, root: Path) -> bool:
        return is_folder(self.fmt, root / "train")

    def storage_stats(self, path: Path) -> dict | None:
        if not is_folder(self.fmt, path):
            return None
        m = read_manifest(path / MANIFEST, self.fmt.kind)
        return {"source": m["source"], "mean_width": None, "mean_height": None, "mean_bytes": m["mean_bytes"]}

    def convert(self, split: Path, out_root: Path, opts, workers: int | None = None) -> tuple[Path, str]:
        _check_chunk(opts.chunk_mb)
        out = out_root / split.name
        if out.exists():
            raise LoaderError(f"--out {out_root}: {out} exists; choose a new folder")
        m = convert(self.fmt, split, out, opts.chunk_mb, workers=workers)
        return out, (
            f"{self.name}: wrote {out} ({m['bytes'] / 1e6:.1f} MB, {m['samples']} samples, "
            f"{len(m['files'])} files) in {m['seconds']:.1f} s"
        )


def chunk_windows(chunk_samples: list[int]) -> list[tuple[int, int]]:
    """(start, end) positions of each window of WINDOW records, none across a chunk."""
    windows, start = [], 0
    for count in chunk_samples:
        windows += [(s, min(s + WINDOW, start + count)) for s in range(start, start + count, WINDOW)]
        start += count
    return windows


def _current(manifest: dict, folder: Path) -> dict:
    """A cached conversion from before the manifest recorded its chunks' sizes and its records'
    order (written in ImageFolder order) is converted again."""
    if "chunk_samples" not in manifest or "positions" not in manifest:
        raise LoaderError(f"{folder}: converted by an older loaderbench")
    return manifest


def _check_chunk(chunk_mb: float) -> None:
    if not chunk_mb > 0:
        raise LoaderError(f"chunk_mb must be > 0, got {chunk_mb}")


class Records(Dataset):
    """One sample by key (epoch, index): the record the library's dataset holds at ``index``,
    decoded and augmented. The library's dataset is opened in each process that reads (a forked
    worker opens its own: LitData's reader holds file handles and threads), or, where the library
    coordinates its workers itself (Mosaic's shared memory), handed to the workers."""

    def __init__(self, loader: StreamedLoader):
        self.fmt, self.location, self.cache = loader.fmt, loader.location, loader.cache
        self.cfg, self.sources = loader.config, loader.manifest["sources"]
        self.root = loader.manifest["source"]  # where the split was converted from: errors name its files
        self.transform = loader.transform
        self.position = np.empty_like(loader.positions)  # ImageFolder index -> record position
        self.position[loader.positions] = np.arange(len(loader.positions))
        self._ds = None  # (pid, the library's dataset)

    def __getstate__(self):
        return {**self.__dict__, "_ds": self._ds if not self.fmt.per_process else None}

    def dataset(self):
        if self._ds is None or (self.fmt.per_process and self._ds[0] != os.getpid()):
            folder = None if self.cache is None else self.cache.folder
            self._ds = (os.getpid(), self.fmt.open(self.location, folder, self.cfg))
        return self._ds[1]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key):
        epoch, i = key
        at = int(self.position[i])
        try:
            record = self.dataset()[at]
        except Exception as exc:  # a chunk that cannot be read or fetched: not a bad sample, a bad store
            raise LoaderError(
                f"{self.fmt.backend}: cannot read sample {at} of {self.location}: {type(exc).__name__}: "
                f"{str(exc)[:300]}"
            ) from None
        if int(record["index"]) != i:
            raise LoaderError(
                f"{self.fmt.backend}: sample {at} of {self.location} is ImageFolder sample "
                f"{int(record['index'])}, its manifest says {i}: not the manifest of these chunks"
            )
        where = os.path.join(self.root, self.sources[i])
        data = record["jpg"]
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)
        return sample(self.transform, data, where, int(record["cls"]), self.cfg.seed, epoch, int(i))


class StreamedLoader(BaseLoader):
    index_order = True  # reads epoch_indices(): loader.sampler iterates them

    def __init__(self, cfg: LoaderConfig, opts: Options, fmt: Format, location: str, manifest: dict):
        n = manifest["samples"]
        super().__init__(cfg, *rank_share(n, cfg, location), tuple(manifest["classes"]), split_size=n)
        self.name = fmt.backend
        self.options, self.fmt, self.location, self.manifest = opts, fmt, location, manifest
        # ImageFolder index of each record; folders written before the order was recorded hold
        # their records in ImageFolder order
        self.positions = np.asarray(manifest.get("positions") or range(n), dtype=np.int64)
        if not np.array_equal(np.sort(self.positions), np.arange(n)):
            raise LoaderError(
                f"{location}: its manifest's positions are not a permutation of its {n} samples"
            )
        if opts.order == "chunks" and sum(manifest.get("chunk_samples") or [0]) != n:
            raise LoaderError(
                f"-o order=chunks: {location} was converted before its chunks' sample counts were "
                f"recorded; convert it again (`bench data convert --to {fmt.backend}`)"
            )
        self.cache = PrivateCache(fmt.backend, fmt.forget) if objstore.is_url(location) else None
        self._staged_bytes = None  # what the cache held when it was removed
        self.transform = transform_for(cfg, float_in_workers=not opts.device_normalize, decoder=opts.decode)
        self._feed = DeviceFeed.for_options(cfg, opts)
        self._records = Records(self)
        try:
            if self.cache is None or not opts.num_workers or not fmt.per_process:
                # opened here, so a bad folder is named before any batch; a bucket's manifest was read
                # already, and a client made here would be forked into the workers (LitData's S3
                # client then answers them with empty reads)
                self._records.dataset()
            self._loader = worker_loader(
                self._records,
                opts,
                self.name,
                cfg.device.type == "cuda",
                batch_size=cfg.batch_size,
                sampler=EpochKeys(self),
                collate_fn=functools.partial(collate_checked, normalize=self.transform.normalize),
                drop_last=cfg.drop_last,
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        except BaseException:
            self.close()
            raise

    def epoch_order(self) -> np.ndarray:
        """ImageFolder indices in this epoch's order. Training, ``random``: the contract's permutation
        of seed + epoch; ``chunks``: windows of WINDOW records that never cross a chunk, the windows
        and the records in each permuted by seed + epoch, so that consecutive reads stay in one
        window, as the libraries' own iterations read (LitData converts a 256-row Arrow batch to
        return one row of it). Evaluation: the records' written order."""
        if not self.config.train:
            return self.positions  # evaluation: the records' own order, each chunk front to back
        if self.options.order != "chunks":
            return super().epoch_order()
        g = torch.Generator().manual_seed(self.config.seed + self.epoch)
        windows = chunk_windows(self.manifest["chunk_samples"])
        picks = torch.randperm(len(windows), generator=g).tolist()
        at = np.concatenate(
            [a + torch.randperm(b - a, generator=g).numpy() for a, b in (windows[k] for k in picks)]
        )
        return self.positions[at]  # the records' ImageFolder indices, as every epoch order is

    def _own_state(self) -> dict:
        return {"order": self.options.order}

    def _check_geometry(self, state: dict) -> None:
        super()._check_geometry(state)
        if state.get("order", "random") != self.options.order:
            raise StateError(
                f"loader state: read in order {state.get('order', 'random')!r}, this loader reads in "
                f"order {self.options.order!r}"
            )

    def split_fingerprint(self) -> str:
        if self._fingerprint is None:
            import hashlib

            h = hashlib.blake2b(digest_size=8)
            h.update(repr((self.split_size, self.classes, self.manifest["sources"])).encode())
            if "positions" in self.manifest:  # order=chunks reads the records' order
                h.update(self.positions.tobytes())
            h.update(repr([(f["file"], f["bytes"]) for f in self.manifest["files"]]).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        d = {**super().describe(), **describe_pipeline(self.options, self.config)}
        d.update(
            format=f"{self.fmt.kind} ({self.fmt.version()})",
            location=self.location,
            order=(
                "the contract's: permutation of seed + epoch, strided by rank (the library's shuffle is not used)"
                if self.options.order == "random"
                else f"chunks: windows of {WINDOW} samples within a chunk, the windows and their samples "
                "permuted by seed + epoch, strided by rank (the library's shuffle is not used)"
            ),
            storage={
                **{k: self.manifest[k] for k in ("samples", "bytes", "mean_bytes", "chunk_mb", "source")},
                "files": len(self.manifest["files"]),
            },
        )
        if self.cache is not None:
            d["staged"] = {
                "staged_to": str(self.cache.folder),
                "staged_bytes": self._staged_bytes if self._staged_bytes is not None else self.cache.bytes(),
                "staging_s": None,  # inside the reads: the library fetches a chunk when a sample in it is read
                "staging": f"on demand, by {self.fmt.version()}'s own S3 client, into a private cache",
            }
        return d

    def _batches(self):
        for images, labels, bad in self._loader:
            self._skip_or_raise(bad, batch_empty=images is None)
            if images is not None:
                yield images, labels

    def _epoch_batches(self):
        return self._feed(self._batches())

    def close(self) -> None:
        loader = getattr(self, "_loader", None)
        if loader is not None:
            loader.close()
        records = getattr(self, "_records", None)
        if records is not None and records._ds is not None:
            ds, records._ds = records._ds[1], None
            self.fmt.close(ds)
        if self.cache is not None and self._staged_bytes is None:
            self._staged_bytes = self.cache.bytes()
            self.cache.remove()
