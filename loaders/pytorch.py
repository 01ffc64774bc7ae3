"""`torch` backend: torchvision ImageFolder indexing + transforms v2 + DataLoader.

Every acceleration knob is its own option so the harness can measure each one:
``num_workers``, ``pin_memory`` (+ ``non_blocking`` copies), ``persistent_workers``,
``prefetch_factor`` and ``device_normalize`` (uint8 collate, host->device copy on a side CUDA
stream one batch ahead, normalisation on the device: timm's PrefetchLoader idea).
"""
from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from .contract import (
    MEAN,
    STD,
    BaseLoader,
    FolderIndex,
    LoaderConfig,
    LoaderError,
    normalize_uint8,
    scan_imagefolder,
    shard_indices,
    shard_sizes,
    worker_failed,
)


@dataclass(frozen=True)
class Options:
    num_workers: int = 0
    pin_memory: bool = False
    non_blocking: bool | None = None  # None: follow pin_memory (non-blocking needs pinned pages)
    persistent_workers: bool = False
    prefetch_factor: int | None = None  # DataLoader's default (2) when workers are used
    device_normalize: bool = False  # uint8 collate + normalise on the device
    timeout: float = 0  # seconds to wait for one batch from the workers; 0 waits forever (DataLoader's)


def build(cfg: LoaderConfig, opts: Options) -> "TorchLoader":
    if opts.num_workers < 0:
        raise LoaderError(f"num_workers must be >= 0, got {opts.num_workers}")
    if opts.num_workers == 0 and (opts.persistent_workers or opts.prefetch_factor is not None):
        raise LoaderError("persistent_workers and prefetch_factor need num_workers >= 1")
    if opts.prefetch_factor is not None and opts.prefetch_factor < 1:
        raise LoaderError(f"prefetch_factor must be >= 1, got {opts.prefetch_factor}")
    check_timeout(opts)
    if cfg.data is None:
        raise LoaderError("the torch backend needs data= (an ImageFolder split folder)")
    index = scan_imagefolder(cfg.data)
    if len(index) < cfg.world_size:
        raise LoaderError(f"{len(index)} samples in {cfg.data} cannot be split over {cfg.world_size} ranks")
    return TorchLoader(cfg, opts, index)


def check_timeout(opts) -> None:
    if opts.timeout < 0:
        raise LoaderError(f"timeout must be >= 0 seconds (0 waits forever), got {opts.timeout}")
    if opts.timeout and opts.num_workers == 0:
        raise LoaderError("timeout needs num_workers >= 1 (it bounds the wait for a worker's batch)")


def checked(it, backend: str):
    """Iterate a DataLoader iterator; a dead or stuck worker becomes a LoaderError that says so. The
    workers are stopped before raising: the error's traceback keeps the iterator alive, and with it
    DataLoader's SIGCHLD check of those workers, which would raise again wherever the caller is later."""
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            stop_workers(it)
            raise (worker_failed(exc, backend) or exc) from exc
        yield item


def start_workers(loader: DataLoader):
    """``iter(loader)`` with a terminal's Ctrl-C held back while the workers start (every epoch),
    and left to the main process. Otherwise it can land in a starting worker, which dies with exit
    code 1 (reported as a dead worker), or in the main process's at-fork handlers, where Python
    prints and drops the KeyboardInterrupt and the run goes on. The workers keep the holding
    handler: the main process stops them (close()). A held Ctrl-C is passed on once they are up."""
    if threading.current_thread() is not threading.main_thread():  # only it can set handlers
        return iter(loader)
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        it = iter(loader)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if held:
        try:
            signal.raise_signal(signal.SIGINT)  # the caller's handler, KeyboardInterrupt by default
        except BaseException:
            stop_workers(it)
            raise
    return it


def stop_workers(it) -> None:
    """Stop a DataLoader iterator's workers now, not whenever it is garbage-collected (after bench
    has printed its last line, or never for a persistent one). A worker that has died meanwhile makes
    DataLoader's SIGCHLD check raise while the others are joined; it has nothing left to tell at
    this point, and the shutdown's own ``finally`` has stopped the rest and dropped the check."""
    shutdown = getattr(it, "_shutdown_workers", None)  # private, but the only way short of GC
    if shutdown is None:
        return
    try:
        shutdown()
    except RuntimeError as exc:
        if worker_failed(exc, "") is None:
            raise


def quiet_hand_over(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker whose main process dies (a rank killed by the OOM
    killer) while taking a batch's shared memory from it prints no multiprocessing traceback; the
    death is reported by bench or torchrun, and a living main process raises its own side of a
    failed hand-over. In a worker, only multiprocessing's fd-sharing thread reports through
    sys.excepthook (the worker's own errors go to the main process)."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, (EOFError, ConnectionError)):
            default(kind, value, tb)

    sys.excepthook = hook


class WorkerEpochs:
    """A DataLoader iterated epoch by epoch through start_workers() and checked(); close() stops the
    live iterator's workers, whether its epoch ended, failed or was interrupted (persistent workers
    belong to the DataLoader's own ``_iterator``)."""

    def __init__(self, loader: DataLoader, backend: str):
        self.loader, self.backend, self._live = loader, backend, None

    def __iter__(self):
        self._live = start_workers(self.loader)
        return checked(self._live, self.backend)

    def close(self) -> None:
        stop_workers(self._live)
        stop_workers(self.loader._iterator)
        self._live = self.loader._iterator = None


def transform_for(cfg: LoaderConfig, float_in_workers: bool) -> v2.Compose:
    """The torchvision transforms every PIL-decoding backend applies (torch, wds)."""
    size = cfg.image_size
    if cfg.train:
        ops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:  # the standard 0.875 centre-crop ratio
        ops = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    ops.append(v2.PILToTensor())
    if float_in_workers:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


class _Samples(Dataset):
    """Decodes and augments one sample. Keys are (epoch, index) so that augmentation is seeded
    per sample and epoch: the same seed gives the same images whatever the worker count."""

    def __init__(self, index: FolderIndex, transform, seed: int):
        self.paths, self.labels = index.paths, index.labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        epoch, i = key
        path = str(self.paths[i])
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")  # forces the full decode, so damage shows here
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            return BadSample(path, f"{type(exc).__name__}: {exc}")
        return augment(self.transform, image, self.seed, epoch, int(i)), int(self.labels[i])


def augment(transform, image, seed: int, epoch: int, sample: int) -> torch.Tensor:
    """``transform(image)`` seeded by (seed, epoch, sample): the same crop and flip whatever the
    worker count or order. fork_rng keeps the caller's global RNG untouched when num_workers=0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, epoch, sample)) & 0x7FFF_FFFF_FFFF_FFFF)
        return transform(image)


@dataclass(frozen=True)
class BadSample:
    path: str
    reason: str


def collate_checked(batch):
    """Stack the good samples; report the bad ones to the main process, which applies the policy
    (and counts skips, which workers could not do for it)."""
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    good = [b for b in batch if not isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good], dtype=torch.int64)
    return images, labels, bad


class _EpochKeys(Sampler):
    """Wraps a rank's index sampler to yield (epoch, index) keys for ``_Samples``."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.num_samples

    def __iter__(self):
        epoch = self.loader.epoch
        inner = self.loader._index_sampler
        if isinstance(inner, DistributedSampler):
            inner.set_epoch(epoch)
            return ((epoch, i) for i in inner)
        return ((epoch, int(i)) for i in inner(epoch))


class TorchLoader(BaseLoader):
    name = "torch"

    def __init__(self, cfg: LoaderConfig, opts: Options, index: FolderIndex):
        n = len(index)
        per_rank, padding = shard_sizes(n, cfg.world_size, pad=cfg.train)
        if not cfg.train:  # exact split: the first n % world_size ranks get one more sample
            per_rank = len(range(cfg.rank, n, cfg.world_size))
        super().__init__(cfg, per_rank, padding, index.classes)
        self.options = opts
        self.index = index
        self._cuda = cfg.device.type == "cuda"
        self._feed = DeviceFeed(cfg, opts.device_normalize,
                                opts.pin_memory if opts.non_blocking is None else opts.non_blocking)
        if cfg.train:
            # DistributedSampler pads to equal shards (<= world_size - 1 repeats): DDP never hangs.
            self._index_sampler = DistributedSampler(
                range(n), num_replicas=cfg.world_size, rank=cfg.rank, shuffle=True, seed=cfg.seed, drop_last=False
            )
        else:
            self._index_sampler = lambda epoch: shard_indices(
                n, cfg.rank, cfg.world_size, shuffle=False, seed=cfg.seed, epoch=epoch, pad=False
            )
        workers = opts.num_workers
        self._loader = WorkerEpochs(DataLoader(
            _Samples(index, transform_for(cfg, float_in_workers=not opts.device_normalize), cfg.seed),
            batch_size=cfg.batch_size,
            sampler=_EpochKeys(self),
            num_workers=workers,
            collate_fn=collate_checked,
            pin_memory=opts.pin_memory and self._cuda,
            drop_last=cfg.drop_last,
            persistent_workers=opts.persistent_workers,
            prefetch_factor=opts.prefetch_factor,
            timeout=opts.timeout,
            worker_init_fn=quiet_hand_over,
            # Workers share the main process's numpy/torch seeds only through this generator.
            generator=torch.Generator().manual_seed(cfg.seed),
        ), self.name)

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            decode="cpu (PIL) in DataLoader workers" if self.options.num_workers else "cpu (PIL) in the main process",
            normalize="device" if self.options.device_normalize else "workers",
            options={k: getattr(self.options, k) for k in self.options.__dataclass_fields__},
            pin_memory_effective=self.options.pin_memory and self._cuda,
        )
        return d

    def _batches(self):
        for images, labels, bad in self._loader:
            self._skip_or_raise(bad, batch_empty=images is None)
            if images is not None:
                yield images, labels

    def __iter__(self):
        return self._feed(self._batches())

    def close(self) -> None:
        self._loader.close()


class DeviceFeed:
    """Host batches -> the contract's tensors on the device: non-blocking copies from pinned pages,
    normalisation on the device when asked (uint8 batches), and with both on CUDA the copy of
    batch k+1 on a side stream while the model runs batch k (timm's PrefetchLoader idea)."""

    def __init__(self, cfg: LoaderConfig, device_normalize: bool, non_blocking: bool):
        self.cfg, self.device_normalize, self.non_blocking = cfg, device_normalize, non_blocking

    def __call__(self, batches):
        if self.cfg.device.type == "cuda" and self.device_normalize:
            return self._prefetch_on_side_stream(batches)
        return (self._to_device(images, labels) for images, labels in batches)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor):
        cfg = self.cfg
        images = images.to(cfg.device, non_blocking=self.non_blocking)
        labels = labels.to(cfg.device, non_blocking=self.non_blocking)
        if self.device_normalize:
            return normalize_uint8(images, cfg), labels
        return images.to(dtype=cfg.dtype, memory_format=cfg.memory_format), labels

    def _prefetch_on_side_stream(self, batches):
        device = self.cfg.device
        stream = torch.cuda.Stream(device=device)
        pending = None
        for images, labels in batches:
            with torch.cuda.stream(stream):
                ready = self._to_device(images, labels)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(device).wait_stream(stream)
            for t in ready:  # the caching allocator must not reuse these while the main stream reads them
                t.record_stream(torch.cuda.current_stream(device))
            pending = ready
        if pending is not None:
            yield pending
