"""The contract every backend implements, and the pieces they share.

A loader is an iterable of ``(images, labels)`` already on ``config.device``: images normalised
with MEAN/STD, dtype ``config.dtype``, NCHW (channels_last memory format when asked), labels
int64 ``[N]``. ``len()`` is batches per epoch for this rank; ``set_epoch()`` says which epoch the
next iteration is (without it, each iteration after the first is the next epoch, as a DataLoader
with ``shuffle=True`` reshuffles); ``close()`` releases workers. Sharding is by global rank (see
``shard_indices``). Like a DataLoader it has ``batch_size``, ``drop_last``, ``sampler`` and ``dataset``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import launch

# One normalisation for every backend (ImageNet statistics, on the 0..1 scale).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

BAD_SAMPLE_POLICIES = ("stop", "skip")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LoaderError(Exception):
    """A user error (bad option, missing data, unavailable backend): one clear line, no traceback."""


class BadSampleError(LoaderError):
    """A sample that cannot be decoded, under ``on_bad_sample='stop'``."""

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"cannot decode {path}: {reason} "
            "(on_bad_sample='skip' / --on-bad-sample skip skips and counts such files)"
        )
        self.path = path


@dataclass(frozen=True)
class LoaderConfig:
    """What every backend is asked for; backend-specific knobs live in each backend's Options."""

    data: Path | str | None  # a local path, or an s3:// URL (a str)
    batch_size: int
    train: bool
    image_size: int = 224
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    on_bad_sample: str = "stop"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LoaderError(f"dtype {dtype} not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise LoaderError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Global rank and world size: explicit arguments, else the process group, else the
    RANK/WORLD_SIZE torchrun sets (or srun's SLURM_PROCID/SLURM_NTASKS), else a single process."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise LoaderError("pass both rank and world_size, or neither")
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env = launch.torch_env()  # torchrun's variables, or srun's as torchrun would name them
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. `bench run --cpus N` or taskset),
    which is what the backends' default thread and worker counts follow, not the machine's count."""
    return len(os.sched_getaffinity(0))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(launch.torch_env().get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def validate(cfg: LoaderConfig) -> None:
    """Checks every backend needs, before any worker starts."""
    if cfg.batch_size < 1:
        raise LoaderError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.image_size < 8:
        raise LoaderError(f"image_size must be >= 8, got {cfg.image_size}")
    if cfg.world_size < 1 or not 0 <= cfg.rank < cfg.world_size:
        raise LoaderError(f"rank {cfg.rank} is not within world_size {cfg.world_size}")
    if cfg.on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise LoaderError(
            f"on_bad_sample must be one of {', '.join(BAD_SAMPLE_POLICIES)}, got {cfg.on_bad_sample!r}"
        )
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        raise LoaderError(f"device {cfg.device} requested but CUDA is not available on this machine")


# --- ImageFolder scanning ------------------------------------------------------------------


@dataclass(frozen=True)
class FolderIndex:
    """An ImageFolder's samples in torchvision's order and class mapping.

    Paths and labels are numpy arrays, not lists of Python tuples, so that forked DataLoader
    workers do not touch (and so copy) one refcounted object per sample.
    """

    root: Path
    classes: tuple[str, ...]
    paths: np.ndarray  # unicode strings
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)


def scan_imagefolder(root: Path | str) -> FolderIndex:
    """Index an ImageFolder (class sub-folders of images) exactly as torchvision does."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.exists():
        raise LoaderError(f"data folder not found: {root}")
    if not root.is_dir():
        raise LoaderError(f"data path is not a folder: {root}")
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise LoaderError(
            f"no class folders in {root} (expected ImageFolder layout: {root}/<class>/<image>)"
        ) from None
    # allow_empty=True so that we can name every empty class folder ourselves.
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [str(root / classes[i]) for i in np.flatnonzero(counts == 0)]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise LoaderError(
            f"class folder(s) with no images: {shown} (image extensions: {', '.join(IMG_EXTENSIONS)})"
        )
    return FolderIndex(
        root=root,
        classes=tuple(classes),
        paths=np.array([p for p, _ in samples]),
        labels=np.array([label for _, label in samples], dtype=np.int64),
    )


# --- Sharding --------------------------------------------------------------------------------


def shard_sizes(n: int, world_size: int, pad: bool) -> tuple[int, int]:
    """(samples per rank, padded samples in total).

    ``pad=True`` (training) gives every rank ceil(n / world_size) samples, repeating at most
    world_size - 1 samples, so DDP ranks take the same number of steps and never hang.
    ``pad=False`` (evaluation) splits exactly; ranks may differ by one sample.
    """
    per_rank = math.ceil(n / world_size)
    return (per_rank, per_rank * world_size - n) if pad else (n // world_size, 0)


def shard_indices(
    n: int, rank: int, world_size: int, *, shuffle: bool, seed: int, epoch: int, pad: bool
) -> np.ndarray:
    """Indices this rank reads this epoch: the same permutation on every rank, strided by rank
    (DistributedSampler's scheme, so it is usable by backends that do not use DistributedSampler)."""
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).numpy()
    else:
        order = np.arange(n)
    if pad:
        per_rank, padding = shard_sizes(n, world_size, pad=True)
        if padding:
            order = np.concatenate([order, order[:padding]])
    return order[rank::world_size]


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def rank_share(n: int, cfg: LoaderConfig, where) -> tuple[int, int]:
    """(samples this rank yields per epoch, padded samples in all) for the strided split of
    ``shard_indices``; ``where`` names the data in the error for too few samples."""
    if n < cfg.world_size:
        raise LoaderError(f"{n} samples in {where} cannot be split over {cfg.world_size} ranks")
    per_rank, padding = shard_sizes(n, cfg.world_size, pad=cfg.train)
    if not cfg.train:  # exact split: the first n % world_size ranks get one more sample
        per_rank = len(range(cfg.rank, n, cfg.world_size))
    return per_rank, padding


class BaseLoader:
    """Shared bookkeeping; backends implement ``__iter__`` and set the counts in ``__init__``."""

    name = "base"
    seeded_augmentation = True  # False where the library cannot seed its crops and flips (FFCV)
    index_order = False  # True where each epoch reads the samples in ``epoch_indices()`` order

    def __init__(
        self,
        cfg: LoaderConfig,
        num_samples: int,
        padding: int,
        classes: tuple[str, ...],
        split_size: int | None = None,
    ):
        self.config = cfg
        self.split_size = split_size  # samples in the whole split (every rank's), padding excluded
        self.num_samples = num_samples  # samples this rank yields per epoch, padding included
        self.padding = padding  # samples repeated across all ranks per epoch to equalise them
        self.classes = classes
        self.epoch = 0
        self.skipped: list[str] = []  # files skipped under on_bad_sample='skip'
        self._iterated = self._epoch_set = False

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.config.batch_size, self.config.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_set = True

    def __iter__(self):
        # A DataLoader with shuffle=True reshuffles on every iteration: a script that never calls
        # set_epoch must not see one epoch's order and augmentations over and over. The epoch is
        # settled at the first batch, not at iter(): Lightning calls iter() once only to check that
        # the loader is iterable, and calls set_epoch(0) after creating the first epoch's iterator.
        if self._iterated and not self._epoch_set:
            self.epoch += 1
        self._iterated, self._epoch_set = True, False
        yield from self._epoch_batches()

    def _epoch_batches(self):
        """This epoch's batches (``self.epoch``): what each backend implements."""
        raise NotImplementedError

    # -- what training scripts read from a DataLoader -----------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def drop_last(self) -> bool:
        return self.config.drop_last

    @functools.cached_property
    def sampler(self) -> RankSampler:
        return RankSampler(self)

    @property
    def batch_sampler(self) -> torch.utils.data.BatchSampler:
        # Lightning reads batch_sampler.sampler to decide shuffling and to call set_epoch.
        return torch.utils.data.BatchSampler(self.sampler, self.batch_size, self.drop_last)

    @functools.cached_property
    def dataset(self):
        """The split as a map-style Dataset (ImageFolder's ``classes``, ``samples``, ``targets``;
        items decoded and transformed as this loader does, for scripts that index it directly)."""
        from .images import SplitDataset

        return SplitDataset(self)

    def epoch_indices(self) -> np.ndarray:
        """The split's indices this rank reads this epoch (``shard_indices``, DistributedSampler's scheme)."""
        if not self.index_order or self.split_size is None:
            raise TypeError(
                f"the {self.name} loader streams its samples in its own order; it has no index order"
            )
        cfg = self.config
        return shard_indices(
            self.split_size,
            cfg.rank,
            cfg.world_size,
            shuffle=cfg.train,
            seed=cfg.seed,
            epoch=self.epoch,
            pad=cfg.train,
        )

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What a result records about where and how the data was read."""
        d = {
            "backend": self.name,
            "num_samples_per_rank": self.num_samples,
            "padding": self.padding,
            "batches_per_epoch": len(self),
            "num_classes": len(self.classes),
        }
        options = getattr(self, "options", None)
        if dataclasses.is_dataclass(options):
            d["options"] = dataclasses.asdict(options)
        return d

    def _skip_or_raise(self, bad: list[tuple[str, str]], batch_empty: bool = False) -> None:
        for path, reason in bad:
            if self.config.on_bad_sample == "stop":
                raise BadSampleError(path, reason)
            self.skipped.append(path)
        if batch_empty and self.config.train and self.config.world_size > 1:
            # Dropping the batch would give this rank one step fewer than the others: DDP would hang.
            raise LoaderError(
                f"every sample of a batch on rank {self.config.rank} was bad ({', '.join(p for p, _ in bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}); skipping it would leave the ranks a step apart. Remove the "
                "bad files or use a larger batch size"
            )


class RankSampler:
    """``loader.sampler`` for scripts written for DistributedSampler: ``set_epoch`` (the loader's),
    ``len()`` as DistributedSampler(drop_last=False) has it (ceil(split / world_size): training
    pads to it; in evaluation a rank may yield one fewer, and every sample is read exactly once, so
    a script's "evaluate the tail the sampler left out" finds none) and, where the backend reads by
    index, the epoch's indices."""

    def __init__(self, loader: BaseLoader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        n, world = self.loader.split_size, self.loader.config.world_size
        return self.loader.num_samples if n is None else math.ceil(n / world)

    def __iter__(self):
        return iter(int(i) for i in self.loader.epoch_indices())
