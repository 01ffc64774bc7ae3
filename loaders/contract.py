"""The contract every backend implements, and the pieces they share.

A loader is an iterable of ``(images, labels)`` already on ``config.device``: images normalised
with MEAN/STD, dtype ``config.dtype``, NCHW (channels_last memory format when asked), labels
int64 ``[N]``. ``len()`` is batches per epoch for this rank; ``set_epoch()`` says which epoch the
next iteration is (without it, each iteration after the first is the next epoch, as a DataLoader
with ``shuffle=True`` reshuffles); ``close()`` releases workers. Sharding is by global rank (see
``shard_indices``). Like a DataLoader it has ``batch_size``, ``drop_last``, ``sampler`` and ``dataset``.
Like torchdata's StatefulDataLoader it has ``state_dict()`` / ``load_state_dict()``: where it is in
an epoch, as a small dict that any number of ranks can continue from (docs/resume.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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


class StateError(LoaderError):
    """A loader state that cannot be applied to this loader (other data, seed, split, a damaged or
    newer state): raised by ``load_state_dict`` before any batch."""


STATE_VERSION = 1  # what ``state_dict`` writes; a newer state is refused


def require_same(state: dict, mine: dict, why: str) -> None:
    """StateError naming every setting in ``mine`` that ``state`` has otherwise, prefixed by ``why``."""
    differs = [f"{k} {state.get(k)!r} (this loader: {v!r})" for k, v in mine.items() if state.get(k) != v]
    if differs:
        raise StateError(f"{why}: {'; '.join(differs)}")


def require_batches_read(state: dict, most: int) -> int:
    """A shard reader's state: the batches of the epoch each rank had read (within 0..most)."""
    read = state.get("batches_read")
    if not isinstance(read, int) or not 0 <= read <= most:
        raise StateError(f"loader state: batches_read {read!r} is not within 0..{most}")
    return read


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


def rest_indices(order: np.ndarray, start: int, rank: int, world_size: int, pad: bool) -> np.ndarray:
    """This rank's indices of an epoch whose first ``start`` positions of ``order`` (the epoch's
    permutation) were read already, on ``world_size`` ranks: the rest, padded (training) with the
    epoch's first samples to a multiple of ``world_size``, strided by rank. ``start=0`` is
    ``shard_indices``; with the strided split, what k steps of W ranks read is the prefix k*B*W,
    so the rest splits over any number of ranks and every sample is still read once."""
    rest = order[start:]
    if pad and len(rest) % world_size:
        rest = np.concatenate([rest, np.resize(order, world_size - len(rest) % world_size)])
    return rest[rank::world_size]


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
        # Where this rank is in the epoch being read (``state_dict``): the position in the epoch's
        # order this iteration started from, the batches it has taken since, and whether it ended.
        self._resume: dict | None = None  # a loaded state, applied when its epoch is iterated
        self._resume_at, self._taken, self._complete = 0, 0, False
        self._fingerprint: str | None = None
        self._resumed_from: dict | None = None  # the state the current iteration continues

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
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] != self.epoch:  # set_epoch chose another epoch
            resume = None
        self._resumed_from = resume
        self._resume_at = resume["samples_seen"] if resume else 0
        self._taken, self._complete, self._empty_batches = 0, False, 0
        for batch in self._epoch_batches():
            self._taken += 1
            yield batch
        self._complete = True

    # -- where it is in an epoch (torchdata's StatefulDataLoader names) -------------------------------
    def state_dict(self) -> dict:
        """Where this loader is: the epoch, the samples of it read so far over all ranks (ranks
        advance in step, so rank 0's state stands for all of them), the seed and a fingerprint of
        the split. A few numbers, whatever the data's size; JSON-serialisable."""
        cfg = self.config
        if self._resume is not None:  # loaded and not iterated yet: that state still holds
            return dict(self._resume)
        started = self._iterated and not self._epoch_set
        return {
            "version": STATE_VERSION,
            "backend": self.name,
            "epoch": self.epoch,
            "samples_seen": self._samples_seen() if started else 0,
            "complete": started and self._complete,
            "split": self.split_fingerprint(),
            "split_size": self.split_size,
            "seed": cfg.seed,
            "train": cfg.train,
            "drop_last": cfg.drop_last,
            "world_size": cfg.world_size,
            "batch_size": cfg.batch_size,
            **self._own_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of this loader, or of one like it on another number of ranks,
        workers or threads): the next iteration reads exactly the samples of that epoch not read
        yet, split over this loader's ranks. What cannot hold raises StateError, naming it."""
        self._check_state(state)
        if state["complete"]:  # that epoch was read to its end: the next iteration is the next one
            self.epoch, self._iterated, self._epoch_set, self._resume = state["epoch"], True, False, None
            return
        self.epoch, self._epoch_set, self._resume = int(state["epoch"]), True, dict(state)

    def _samples_seen(self) -> int:
        """Positions of the epoch's order read over all ranks: this iteration's start, plus what its
        batches took on each of the world_size ranks (the strided split's prefix)."""
        cfg = self.config
        rest = (self.split_size or self.num_samples * cfg.world_size) - self._resume_at
        taken = (self._taken + self._empty_batches) * cfg.batch_size * cfg.world_size
        return self._resume_at + max(0, min(taken, rest))

    _empty_batches = 0  # batches whose every sample was skipped (not yielded, but read)

    def _own_state(self) -> dict:
        """What a backend adds to the state (shard readers: their own bookkeeping)."""
        return {}

    def split_fingerprint(self) -> str:
        """Identifies the split whatever its path: sample count, classes and every label in order
        (or the stored format's manifest), so that a state is never applied to other data."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=8)
            h.update(repr((self.split_size, self.classes)).encode())
            index, manifest = getattr(self, "index", None), getattr(self, "manifest", None)
            if index is not None:
                h.update(np.ascontiguousarray(index.labels, dtype=np.int64).tobytes())
            elif manifest is not None:
                h.update(
                    repr([(s.get("file"), s.get("samples")) for s in manifest.get("shards", [])]).encode()
                )
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _check_state(self, state) -> None:
        """Refuse, before any batch, a state this loader cannot continue (naming what differs)."""
        need = ("version", "backend", "epoch", "samples_seen", "complete", "split", "seed", "train")
        if not isinstance(state, dict) or any(k not in state for k in need):
            missing = [k for k in need if k not in state] if isinstance(state, dict) else need
            raise StateError(
                f"not a loader state (missing {', '.join(missing)}): damaged, or not from loaderbench"
            )
        if not isinstance(state["version"], int) or state["version"] > STATE_VERSION:
            raise StateError(
                f"loader state version {state['version']!r} is newer than this loaderbench's "
                f"({STATE_VERSION}): resume with the version that wrote it"
            )
        cfg = self.config
        differs = [
            f"{what} {state[key]!r} (this loader: {mine!r})"
            for what, key, mine in (
                ("backend", "backend", self.name),
                ("split", "split", self.split_fingerprint()),
                ("seed", "seed", cfg.seed),
                ("train", "train", cfg.train),
            )
            if state[key] != mine
        ]
        if differs:
            raise StateError(f"loader state is of another run: {'; '.join(differs)}")
        if not isinstance(state["epoch"], int) or state["epoch"] < 0:
            raise StateError(f"loader state: epoch {state['epoch']!r} is not an epoch number")
        seen, n = state["samples_seen"], self.split_size
        if not isinstance(seen, int) or seen < 0 or (n is not None and seen > n):
            raise StateError(f"loader state: samples_seen {seen!r} is not within the split's {n} samples")
        self._check_geometry(state)

    def _check_geometry(self, state: dict) -> None:
        """Index-order loaders continue on any ranks, workers, threads or batch size; a backend
        whose position depends on them refuses other values here."""
        if not self.index_order:
            raise StateError(f"the {self.name} loader cannot continue an epoch from a state")

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
        return rest_indices(self.epoch_order(), self._resume_at, cfg.rank, cfg.world_size, pad=cfg.train)

    def epoch_order(self) -> np.ndarray:
        """The whole split's order this epoch, before it is split over ranks: the permutation of
        seed + epoch every rank draws alike (training), or the split's own order."""
        if not self.config.train:
            return np.arange(self.split_size)
        g = torch.Generator().manual_seed(self.config.seed + self.epoch)
        return torch.randperm(self.split_size, generator=g).numpy()

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
        if batch_empty:
            self._empty_batches += 1
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
