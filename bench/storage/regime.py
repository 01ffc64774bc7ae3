"""A run's storage regime, applied and measured: what the backend reads (local or uploaded), the
page cache warmed or emptied before every epoch (and verified), and what the run read from
storage (bytes from the disk, requests and bytes from the object store, staging time)."""

from __future__ import annotations

from pathlib import Path

import psutil

from loaders import pagecache

from ..errors import UsageError
from . import store, upload


def sources(cfg, splits: list[Path | None], rank: int, barrier) -> tuple[list, list]:
    """(local, sources): the local file or folder the backend reads for each split (converted first
    where it must be), and what its loader is built on: that, or its s3:// URL (uploaded by rank 0
    when not there yet)."""
    backend = cfg.backend
    if backend.is_ceiling:  # reads no data: where it lives changes nothing
        return splits, splits
    local = [backend.stored(s, cfg.options) if s is not None else None for s in splits]
    if cfg.storage != "s3":
        return local, local
    if not backend.reads_s3:
        raise UsageError(f"--storage s3: loader {backend.name!r} cannot read from object storage")
    session = store.current()
    if session is None:
        raise UsageError("--storage s3 outside an object-store session (bench starts one per command)")
    if rank == 0:
        loopback = session["store"].startswith("moto")
        for p in local:
            if p is not None:
                upload.upload(p, cfg.s3_bucket, create_bucket=loopback)
    barrier()
    return local, [upload.remote(p, cfg.s3_bucket) if p is not None else None for p in local]


def files_of(srcs: list) -> list[Path]:
    return [f for s in srcs if isinstance(s, Path) for f in pagecache.files_under(s)]


def warm_up(files: list[Path]) -> bool:
    """Read the files once so that the page cache holds them, if they fit in half the free memory
    (a warm run over data larger than that is not warm, and the recorded fraction says so)."""
    if sum(f.stat().st_size for f in files) > psutil.virtual_memory().available / 2:
        return False
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 22):
                pass
    return True


class Evicting:
    """A loader whose files are evicted from the page cache in ``set_epoch``, before each epoch (the
    trainer calls it outside the measured window), with the resident share before and after."""

    def __init__(self, loader, files: list[Path]):
        self.loader, self.files = loader, files
        self.epochs: list[dict] = []

    def set_epoch(self, epoch: int) -> None:
        before = pagecache.resident_fraction(self.files)
        pagecache.evict(self.files)
        after = pagecache.resident_fraction(self.files)
        if after > 0.5:  # tmpfs, or a filesystem that ignores the advice: "cold" would be a lie
            raise UsageError(
                f"--storage cold: {after:.0%} of the data stayed in the page cache after eviction "
                f"({self.files[0].parent}: tmpfs, or a filesystem that ignores POSIX_FADV_DONTNEED); "
                "put the data on a disk-backed filesystem"
            )
        self.epochs.append(
            {"epoch": epoch, "resident_before": round(before, 4), "resident_after": round(after, 4)}
        )
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class Probe:
    """What the run read from storage between ``start`` (before the loaders are built) and ``finish``
    (after they are closed, so that their worker processes have been reaped and counted)."""

    def __init__(self, cfg, local: list, srcs: list):
        self.cfg = cfg
        self.files = files_of(srcs)  # local files read (none when they come from a bucket)
        self.record: dict = {"regime": cfg.storage}
        session = store.current() if cfg.storage == "s3" else None
        self.url = session["url"] if session and session.get("shaped") else None
        if session:
            self.record["object_store"] = {
                k: session[k] for k in ("store", "endpoint", "bucket", "latency_ms", "mbps")
            }
            self.record["urls"] = [s for s in srcs if isinstance(s, str)]
        self.record["dataset_bytes"] = sum(f.stat().st_size for f in files_of(local)) or None

    def start(self) -> None:
        if self.cfg.storage == "warm" and self.files:
            self.record["warmed"] = warm_up(self.files)
        if self.files:
            self.record["resident_at_start"] = round(pagecache.resident_fraction(self.files), 4)
        self.bytes0 = pagecache.read_bytes()
        self.stats0 = store.shaper_stats(self.url)

    def finish(self, loaders: list) -> dict:
        self.record["bytes_read_from_disk"] = pagecache.read_bytes() - self.bytes0
        stats = store.shaper_stats(self.url)
        if stats and self.stats0:
            self.record["requests"] = stats["requests"] - self.stats0["requests"]
            self.record["bytes_from_store"] = stats["response_bytes"] - self.stats0["response_bytes"]
            before = self.stats0.get("methods", {})
            self.record["requests_by_method"] = {
                m: n - before.get(m, 0) for m, n in stats.get("methods", {}).items() if n > before.get(m, 0)
            }
        evicting = [lo for lo in loaders if isinstance(lo, Evicting)]
        if evicting:
            self.record["epochs"] = evicting[0].epochs
        staging = [lo.describe().get("staged") for lo in loaders if lo is not None]
        staging = [s for s in staging if s]
        if staging:
            # None where the library fetches inside the read (litdata, mosaic): its time is the run's
            self.record["staging_s"] = round(sum(s.get("staging_s") or 0 for s in staging), 3)
            self.record["staged_bytes"] = sum(s["staged_bytes"] for s in staging)
        return self.record
