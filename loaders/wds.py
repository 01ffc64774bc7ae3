"""`wds` backend: an ImageFolder split written once to WebDataset tar shards (``loaders.shards``),
read back with exact epochs under DDP.

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

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from . import objstore
from .backend import Backend
from .contract import (
    BaseLoader,
    LoaderConfig,
    LoaderError,
    num_batches,
    require_batches_read,
    require_same,
    shard_sizes,
)
from .feed import DeviceFeed
from .images import check_decoder, collate_checked, describe_pipeline, sample, transform_for
from .shards import (
    Sharding,
    check_sharding,
    convert_shards,
    import_wds,
    is_shard_folder,
    read_manifest,
    resolve_shards,
    shard_path,
    storage_stats,
)
from .shards import summary as shards_summary
from .workers import check_worker_options, worker_loader

__all__ = ["Sharding", "convert_shards", "read_manifest", "WdsBackend"]


@dataclass(frozen=True)
class Options:
    num_workers: int = 0
    pin_memory: bool = False
    non_blocking: bool | None = None  # None: follow pin_memory
    prefetch_factor: int | None = None
    device_normalize: bool = False  # uint8 batches, normalised on the device
    timeout: float = 0  # seconds to wait for one batch from the workers; 0 waits forever
    shuffle_buffer: int = 1000  # samples per worker in webdataset's shuffle buffer (training)
    decode: str = "cpu"  # cpu (torchvision.io, PIL fallback) | pil
    # storage choices when data is an ImageFolder split converted on first use
    shard_samples: int | None = None
    shard_mb: float = 64.0
    max_resolution: int | None = None
    jpeg_quality: int = 90
    shard_seed: int = 0  # the sample order written


def sharding_of(opts: Options) -> Sharding:
    return Sharding(
        opts.shard_samples, opts.shard_mb, opts.max_resolution, opts.jpeg_quality, opts.shard_seed
    )


class WdsBackend(Backend):
    name = "wds"
    summary = "WebDataset: tar shards (converted once from the ImageFolder) + DataLoader workers"
    Options = Options
    requires = ("webdataset",)
    knobs = {
        "workers": "num_workers",
        "pin_memory": "pin_memory",
        "prefetch": "prefetch_factor",
        "device_normalize": "device_normalize",
    }  # no persistent workers: each epoch plans anew
    prefetch_values = (2, 4, 8)
    stored_format = "webdataset shards"
    reads_s3 = True

    def build(self, cfg: LoaderConfig, opts: Options) -> WdsLoader:
        import_wds()
        check_worker_options(opts)
        check_decoder(opts.decode, "wds")
        if opts.shuffle_buffer < 0:
            raise LoaderError(f"shuffle_buffer must be >= 0, got {opts.shuffle_buffer}")
        check_sharding(sharding_of(opts))
        if cfg.data is None:
            raise LoaderError(
                "the wds backend needs data= (a shard folder, or an ImageFolder split to convert)"
            )
        data = cfg.data if objstore.is_url(cfg.data) else Path(cfg.data)
        folder, manifest = resolve_shards(data, sharding_of(opts), progress=cfg.rank == 0)
        if manifest["samples"] < cfg.world_size:
            raise LoaderError(
                f"{manifest['samples']} samples in {folder} cannot be split over {cfg.world_size} ranks"
            )
        shards, streams = len(manifest["shards"]), cfg.world_size * max(1, opts.num_workers)
        if shards < streams:
            raise LoaderError(
                f"{folder} has {shards} shards, fewer than ranks x workers = {cfg.world_size} x "
                f"{max(1, opts.num_workers)}: each worker streams its own shards; convert with more shards "
                "(bench data convert --to wds --shard-samples N) or use fewer workers"
            )
        return WdsLoader(cfg, opts, folder, manifest)

    def stored(self, split: Path, opts: Options) -> Path:
        check_sharding(sharding_of(opts))
        return resolve_shards(Path(split), sharding_of(opts), progress=True)[0]

    def locate(self, root: Path, split: str, opts) -> Path | None:
        return root / split if is_shard_folder(root / split) else None

    def holds(self, root: Path) -> bool:
        return is_shard_folder(root / "train")

    def storage_stats(self, path: Path) -> dict | None:
        return storage_stats(read_manifest(path, verify=False)) if is_shard_folder(path) else None

    def convert(self, split: Path, out_root: Path, opts, workers: int | None = None) -> tuple[Path, str]:
        out = out_root / split.name
        if out.exists():
            raise LoaderError(f"--out {out_root}: {out} exists; choose a new folder")
        check_sharding(sharding_of(opts))
        return out, shards_summary(out, convert_shards(split, out, sharding_of(opts), workers=workers))


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

    def __init__(self, loader: WdsLoader):
        cfg = loader.config
        self.cfg = cfg
        self.folder = loader.folder
        self.files = [s["file"] for s in loader.manifest["shards"]]
        self.counts = [s["samples"] for s in loader.manifest["shards"]]
        self.transform = transform_for(
            cfg, float_in_workers=not loader.options.device_normalize, decoder=loader.options.decode
        )
        self.shuffle_buffer = loader.options.shuffle_buffer
        self.epoch = 0
        # DataLoader worker -> (the worker's share it reads, its batches read already): a resumed epoch
        self.plan: dict[int, tuple[int, int]] = {}

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
        wds = import_wds()
        for shard, skip, take in parts:
            url = str(shard_path(self.folder, self.files[shard]))

            def fail(exc, url=url):  # webdataset's handler: re-raise as one line naming the shard
                if isinstance(exc, LoaderError):
                    raise exc
                why = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
                raise LoaderError(f"cannot read shard {url}: {type(exc).__name__}: {why}")

            stream = wds.tarfile_samples([{"url": url}], handler=fail)
            got = 0
            for item in itertools.islice(stream, skip, skip + take):
                got += 1
                yield item
            stream.close()
            if got < take:
                raise LoaderError(
                    f"shard {url} ended after {skip + got} samples, its manifest lists "
                    f"{self.counts[shard]}: damaged; convert again"
                )

    def _decode_batch(self, samples):
        cfg = self.cfg
        return collate_checked(
            [
                sample(
                    self.transform,
                    s["jpg"],
                    f"{s.get('__url__')} sample {s['__key__']} ({s.get('path', b'?').decode()})",
                    int(s["cls"]),
                    cfg.seed,
                    self.epoch,
                    int(s["__key__"]),
                )
                for s in samples
            ],
            normalize=self.transform.normalize,
        )

    def __iter__(self):
        wds = import_wds()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker, skip = self.plan.get(worker, (worker, 0))
        samples = self._samples(self.parts(worker, workers))
        if self.cfg.train and self.shuffle_buffer > 1:
            seed = hash((self.cfg.seed, self.epoch, self.cfg.rank, worker)) & 0x7FFF_FFFF
            # The first samples leave once a tenth of the buffer is full (webdataset's ratio), not the
            # whole of it: a full fill stalls every epoch's start by reading the worker's whole range.
            samples = wds.shuffle(self.shuffle_buffer, max(1, self.shuffle_buffer // 10), seed=seed)(samples)
        # Batches of raw samples first, decoded after: a skipped bad sample shrinks its batch but
        # never changes how many batches a rank yields; a resumed epoch passes over the batches its
        # state says were read without decoding them (reading their bytes: tar has no index).
        batches = wds.batched(self.cfg.batch_size, collation_fn=None, partial=True)(samples)
        try:
            for raw in itertools.islice(batches, skip, None):
                yield self._decode_batch(raw)
        except LoaderError as exc:
            yield _Failed(str(exc))


class WdsLoader(BaseLoader):
    name = "wds"

    def __init__(self, cfg: LoaderConfig, opts: Options, folder: Path, manifest: dict):
        n = manifest["samples"]
        start, stop = rank_range(n, cfg.rank, cfg.world_size, cfg.train)
        padding = shard_sizes(n, cfg.world_size, pad=True)[1] if cfg.train else 0
        super().__init__(cfg, stop - start, padding, tuple(manifest["classes"]), split_size=n)
        self.options, self.folder, self.manifest = opts, folder, manifest
        self._feed = DeviceFeed.for_options(cfg, opts)
        self._stream = _ShardStream(self)
        self._skipped = 0  # batches of the epoch a resumed state had read already
        self._loader = worker_loader(
            self._stream, opts, self.name, cfg.device.type == "cuda", batch_size=None
        )

    def describe(self) -> dict:
        d = {**super().describe(), **describe_pipeline(self.options, self.config)}
        d.update(
            shards=len(self.manifest["shards"]),
            shard_folder=str(self.folder),
            storage={**self.manifest["storage"], "sharding": self.manifest["sharding"]},
        )
        return d

    def _streams(self) -> int:
        return max(1, self.options.num_workers)

    def _own_state(self) -> dict:
        return {
            "batches_read": self._skipped + self._taken + self._empty_batches,  # by this rank = by each
            "num_workers": self.options.num_workers,
            "shuffle_buffer": self.options.shuffle_buffer,
        }

    def _check_geometry(self, state: dict) -> None:
        # A rank's place is per worker inside its own contiguous range of the epoch's shard sequence
        # (and behind each worker's shuffle buffer): it holds only for the same split of that sequence.
        cfg = self.config
        mine = dict(world_size=cfg.world_size, batch_size=cfg.batch_size, drop_last=cfg.drop_last)
        mine.update(num_workers=self.options.num_workers, shuffle_buffer=self.options.shuffle_buffer)
        why = (
            "the wds loader continues an epoch only with the same ranks, workers, batch size and shuffle "
            "buffer (a rank's place is per worker in its range of the shards)"
        )
        require_same(state, mine, why)
        require_batches_read(state, len(self))

    def _worker_plan(self, read: int) -> dict[int, tuple[int, int]]:
        """Which worker's share each DataLoader worker reads in a resumed epoch, and how many of its
        batches to pass over, so that the rank yields what an uninterrupted epoch had left in its
        order. DataLoader takes an iterable dataset's batches from its workers in turn, passing
        over those that have run out: after ``read`` batches the turn is at some worker, and the
        resumed DataLoader's worker 0 must play that one."""
        cfg, streams = self.config, self._streams()
        start, stop = rank_range(self.split_size, cfg.rank, cfg.world_size, cfg.train)
        counts = []
        for w in range(streams):
            a, b = worker_range(start, stop, cfg.batch_size, cfg.drop_last, w, streams)
            counts.append(math.ceil((b - a) / cfg.batch_size) if b > a else 0)
        taken, turn = [0] * streams, 0
        while read > 0:
            if taken[turn] < counts[turn]:
                taken[turn], read = taken[turn] + 1, read - 1
            turn = (turn + 1) % streams
        order = [(turn + k) % streams for k in range(streams)]  # the turns from here on, in order
        return {physical: (w, taken[w]) for physical, w in enumerate(order)}

    def _batches(self):
        self._stream.epoch = self.epoch  # workers copy the dataset when the iterator starts
        resumed = self._resumed_from
        self._skipped = resumed["batches_read"] if resumed else 0
        self._stream.plan = self._worker_plan(self._skipped) if self._skipped else {}
        expected = (
            num_batches(self.num_samples, self.config.batch_size, self.config.drop_last) - self._skipped
        )
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

    def _epoch_batches(self):
        return self._feed(self._batches())

    def close(self) -> None:
        self._loader.close()
