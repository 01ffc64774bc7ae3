"""The backends, whether each is installed, and ``build_loader``."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .contract import LoaderConfig, LoaderError, default_device, resolve_dtype, resolve_rank, validate


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # implements Options (a dataclass) and build(cfg, opts)
    summary: str
    requires: tuple[str, ...] = ()  # importable modules the backend needs
    extra: str | None = None  # the pip extra that installs them

    @property
    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.requires)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", "loaders.pytorch", "torchvision ImageFolder + transforms v2 + DataLoader"),
        Backend("synthetic", "loaders.synthetic", "a batch resident on the device; no I/O (the ceiling)"),
        Backend("dali", "loaders.dali", "NVIDIA DALI: nvJPEG decode + GPU augmentation (CPU pipeline without CUDA)",
                requires=("nvidia.dali",), extra="dali"),
        Backend("ffcv", "loaders.ffcv", "FFCV: .beton files (converted once from the ImageFolder) + FFCV Loader",
                requires=("ffcv", "numba"), extra="ffcv"),
        Backend("wds", "loaders.wds", "WebDataset: tar shards (converted once from the ImageFolder) + DataLoader workers",
                requires=("webdataset",), extra="wds"),
    )
}


def backends() -> list[Backend]:
    return list(BACKENDS.values())


def get_backend(name: str) -> Backend:
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise LoaderError(f"unknown loader {name!r}; known: {', '.join(BACKENDS)}") from None
    if not backend.installed:
        missing = [m for m in backend.requires if importlib.util.find_spec(m) is None]
        raise LoaderError(
            f"loader {name!r} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'loaderbench[{backend.extra}]'"
        )
    return backend


def options_for(name: str, **options):
    """Parse a backend's own options, naming any that it does not know."""
    module = importlib.import_module(get_backend(name).module)
    known = {f.name for f in dataclasses.fields(module.Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LoaderError(
            f"loader {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(known)) or 'none'}"
        )
    return module.Options(**options)


def build_loader(
    name: str,
    data: str | Path | None = None,
    *,
    batch_size: int,
    train: bool = True,
    image_size: int = 224,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    on_bad_sample: str = "stop",
    **options,
):
    """Build the loader ``name`` over the ImageFolder split ``data``.

    Common arguments mean the same for every backend; ``**options`` are the backend's own
    (e.g. ``num_workers=8, pin_memory=True`` for ``torch``). Rank and world size default to the
    process group, then RANK/WORLD_SIZE, then a single process.
    """
    opts = options_for(name, **options)
    rank, world_size = resolve_rank(rank, world_size)
    cfg = LoaderConfig(
        data=Path(data) if data is not None else None,
        batch_size=int(batch_size),
        train=bool(train),
        image_size=int(image_size),
        device=torch.device(device) if device is not None else default_device(),
        dtype=resolve_dtype(dtype),
        channels_last=bool(channels_last),
        seed=int(seed),
        rank=rank,
        world_size=world_size,
        drop_last=bool(drop_last),
        on_bad_sample=on_bad_sample,
    )
    validate(cfg)
    return importlib.import_module(BACKENDS[name].module).build(cfg, opts)
