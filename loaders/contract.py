"""The contract every backend implements, and the pieces they share.

A loader is an iterable of ``(images, labels)`` already on ``config.device``: images normalised
with MEAN/STD, dtype ``config.dtype``, NCHW (channels_last memory format when asked), labels
int64 ``[N]``. ``len()`` is batches per epoch for this rank; ``set_epoch()`` reshuffles;
``close()`` releases workers. Sharding is by global rank (see ``shard_indices``).
"""
from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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

    data: Path | None
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
    RANK/WORLD_SIZE environment torchrun and SLURM launchers set, else a single process."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise LoaderError("pass both rank and world_size, or neither")
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
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
        raise LoaderError(f"no class folders in {root} (expected ImageFolder layout: {root}/<class>/<image>)") from None
    # allow_empty=True so that we can name every empty class folder ourselves.
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [str(root / classes[i]) for i in np.flatnonzero(counts == 0)]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise LoaderError(f"class folder(s) with no images: {shown} (image extensions: {', '.join(IMG_EXTENSIONS)})")
    return FolderIndex(
        root=root,
        classes=tuple(classes),
        paths=np.array([p for p, _ in samples]),
        labels=np.array([label for _, label in samples], dtype=np.int64),
    )


def temp_sibling(out: Path) -> Path:
    """The hidden sibling ``out`` is written under before its atomic rename, named by this process.
    Leftovers of writers that are gone (killed mid-write) are removed first, so a re-run restarts
    cleanly instead of accumulating partial copies."""
    out = Path(out)
    if out.parent.is_dir():
        for old in out.parent.glob(f".{out.name}.tmp-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(old)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


@contextmanager
def temp_output(out: Path):
    """Yield the temporary sibling to write ``out`` under; the caller renames it into place when
    complete. On any failure it is removed, file or folder, and an OSError (a full disk) becomes one
    line naming ``out``: an interrupted or failed writer leaves nothing that looks complete."""
    tmp = temp_sibling(out)
    _remove(tmp)  # a dead writer's, if this process's pid was once its pid
    try:
        yield tmp
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise write_failed(exc, Path(out)) from exc
        raise


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


VERIFY_MAX_BYTES = 4 << 30  # checksums of more would cost every run minutes; size checks remain


def file_sha1(path: Path) -> str:
    """The checksum conversions record, so that damage a size check cannot see (flipped bytes inside
    an image record, which decode to garbage without an error) is refused when the data is read."""
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_failed(exc: OSError, out: Path) -> LoaderError:
    """A failed conversion write as one line; the partial output has already been removed."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LoaderError(f"out of space writing {out} ({exc.filename or out.parent}); the partial output was "
                           "removed: free some space or write elsewhere")
    return LoaderError(f"cannot write {out}: {exc.strerror or exc}; the partial output was removed")


def decode_problem(path: str) -> str | None:
    """Why ``path`` cannot be decoded as an RGB image, or None if it can (a full decode: truncated
    JPEGs only show there). For backends whose decoder fails without naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def cache_dir(kind: str, split: Path, settings: dict) -> Path:
    """Where a backend keeps its conversion of an ImageFolder split under these settings: keyed by
    the split's path and every file's name, size and mtime, so a changed, added or removed file
    (or other settings) gives a new conversion."""
    import hashlib
    import json

    index = scan_imagefolder(split)
    h = hashlib.sha1(json.dumps([str(Path(split).resolve()), settings]).encode())
    for p in index.paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    root = Path(os.environ.get("LOADERBENCH_CACHE", Path.home() / ".cache" / "loaderbench"))
    return root / f"{kind}-{h.hexdigest()[:12]}"


# --- Sharding --------------------------------------------------------------------------------


def shard_sizes(n: int, world_size: int, pad: bool) -> tuple[int, int]:
    """(samples per rank, padded samples in total).

    ``pad=True`` (training) gives every rank ceil(n / world_size) samples, repeating at most
    world_size - 1 samples, so DDP ranks take the same number of steps and never hang.
    ``pad=False`` (evaluation) splits exactly; ranks may differ by one sample.
    """
    per_rank = math.ceil(n / world_size)
    return (per_rank, per_rank * world_size - n) if pad else (n // world_size, 0)


def shard_indices(n: int, rank: int, world_size: int, *, shuffle: bool, seed: int, epoch: int, pad: bool) -> np.ndarray:
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


# --- Normalisation on the device -------------------------------------------------------------


def normalize_uint8(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """uint8 NCHW -> normalised ``cfg.dtype``, in ``cfg.memory_format``, on the images' device.

    Arithmetic runs in fp32 and is cast once, so bf16/fp16 outputs round only once.
    """
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255)
    out = images.float().sub_(mean).mul_(inv_std)
    return out.to(dtype=cfg.dtype, memory_format=cfg.memory_format)


class BaseLoader:
    """Shared bookkeeping; backends implement ``__iter__`` and set the counts in ``__init__``."""

    name = "base"
    seeded_augmentation = True  # False where the library cannot seed its crops and flips (FFCV)

    def __init__(self, cfg: LoaderConfig, num_samples: int, padding: int, classes: tuple[str, ...]):
        self.config = cfg
        self.num_samples = num_samples  # samples this rank yields per epoch, padding included
        self.padding = padding  # samples repeated across all ranks per epoch to equalise them
        self.classes = classes
        self.epoch = 0
        self.skipped: list[str] = []  # files skipped under on_bad_sample='skip'

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.config.batch_size, self.config.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What a result records about where and how the data was read."""
        return {
            "backend": self.name,
            "num_samples_per_rank": self.num_samples,
            "padding": self.padding,
            "batches_per_epoch": len(self),
            "num_classes": len(self.classes),
        }

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
                "bad files or use a larger batch size")


def worker_failed(exc: RuntimeError, backend: str) -> LoaderError | None:
    """DataLoader's own report of a dead worker ("DataLoader worker (pid N) exited unexpectedly" or
    "is killed by signal") or of its ``timeout`` expiring, as a LoaderError that says what usually
    causes it; None for other errors."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if first.startswith("DataLoader timed out after"):
        seconds = first.split("after", 1)[1].split("seconds")[0].strip()
        return LoaderError(f"{backend} loader: no batch from the workers within timeout={seconds} s: a worker is "
                           "stuck (a hung network mount, a deadlock) or one batch takes longer than that "
                           "(raise -o timeout=...)")
    if "DataLoader worker" not in first:
        return None
    return LoaderError(f"{backend} loader: {first.rstrip('. ')}. A worker killed by a signal is usually the "
                       "kernel's OOM killer (see `dmesg`): fewer num_workers or a smaller batch needs less memory")