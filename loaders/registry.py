"""The backends, registered once, and ``build_loader``.

A backend outside this package registers through ``LOADERBENCH_BACKENDS=module:Class[,...]`` (it is
then known to every `bench` process, the child processes of sweeps and ranks included) or, in one
process, ``register(cls)``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from . import objstore
from .backend import Backend
from .contract import LoaderConfig, LoaderError, default_device, resolve_dtype, resolve_rank, validate

BUILTIN = (
    "loaders.pytorch:TorchBackend",
    "loaders.synthetic:SyntheticBackend",
    "loaders.dali:DaliBackend",
    "loaders.ffcv:FfcvBackend",
    "loaders.wds:WdsBackend",
    "loaders.spdl:SpdlBackend",
    "loaders.raydata:RayBackend",
    "loaders.lit:LitBackend",
    "loaders.mosaic:MosaicBackend",
)

BACKENDS: dict[str, Backend] = {}


def register(cls: type[Backend]) -> Backend:
    backend = cls()
    BACKENDS[backend.name] = backend
    return backend


def _load(spec: str) -> None:
    module, _, cls = spec.strip().partition(":")
    try:
        register(getattr(importlib.import_module(module), cls))
    except (ImportError, AttributeError) as exc:
        raise LoaderError(f"cannot load backend {spec!r} (LOADERBENCH_BACKENDS): {exc}") from None


for _spec in BUILTIN + tuple(s for s in os.environ.get("LOADERBENCH_BACKENDS", "").split(",") if s.strip()):
    _load(_spec)


def backends() -> list[Backend]:
    return list(BACKENDS.values())


def get_backend(name: str, installed: bool = True) -> Backend:
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise LoaderError(f"unknown loader {name!r}; known: {', '.join(BACKENDS)}") from None
    if installed and not backend.installed:
        raise LoaderError(
            f"loader {name!r} needs {', '.join(backend.missing)}, which is not installed: "
            f"{backend.install_hint()}"
        )
    return backend


def _device(device: str | torch.device | None) -> torch.device:
    """A CUDA device without an index is the current one (``torch.cuda.set_device``), for every
    backend: DALI would otherwise take GPU 0 on every rank."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def options_for(name: str, **options):
    """Parse a backend's own options, naming any that it does not know."""
    return get_backend(name).options(**options)


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
    options=None,
    **option_values,
):
    """Build the loader ``name`` over the ImageFolder split ``data`` (a folder, or the backend's own
    stored format; an ``s3://bucket/prefix`` URL of either reads from object storage).

    Common arguments mean the same for every backend; ``**option_values`` are the backend's own
    (e.g. ``num_workers=8, pin_memory=True`` for ``torch``), or ``options=`` its Options instance.
    Rank and world size default to the process group, then RANK/WORLD_SIZE, then a single process.
    """
    backend = get_backend(name)
    if options is not None and option_values:
        raise LoaderError("pass the backend's options either as options= or as keywords, not both")
    opts = options if options is not None else backend.options(**option_values)
    rank, world_size = resolve_rank(rank, world_size)
    cfg = LoaderConfig(
        data=None if data is None else data if objstore.is_url(data) else Path(data),
        batch_size=int(batch_size),
        train=bool(train),
        image_size=int(image_size),
        device=_device(device),
        dtype=resolve_dtype(dtype),
        channels_last=bool(channels_last),
        seed=int(seed),
        rank=rank,
        world_size=world_size,
        drop_last=bool(drop_last),
        on_bad_sample=on_bad_sample,
    )
    validate(cfg)
    return backend.build(cfg, opts)
