"""`torch` backend: torchvision ImageFolder indexing + transforms v2 + DataLoader.

Every acceleration knob is its own option so the harness can measure each one:
``num_workers``, ``pin_memory`` (+ ``non_blocking`` copies), ``persistent_workers``,
``prefetch_factor`` and ``device_normalize`` (uint8 collate, host->device copy on a side CUDA
stream one batch ahead, normalisation on the device: timm's PrefetchLoader idea). ``decode``: ``cpu``
(torchvision.io's libjpeg-turbo, the default), ``pil`` (the PIL path, for comparison) or ``gpu``
(workers read bytes, the main process decodes with nvJPEG: see gpudecode.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import objstore
from .backend import Backend
from .contract import BaseLoader, LoaderConfig, LoaderError, rank_share, scan_imagefolder
from .feed import DeviceFeed
from .gpudecode import collate_encoded, decode_batch
from .images import (
    DECODERS,
    check_decoder,
    collate_checked,
    describe_pipeline,
    transform_for,
)
from .samples import EpochKeys, Samples
from .workers import check_worker_options, worker_loader


@dataclass(frozen=True)
class Options:
    num_workers: int = 0
    pin_memory: bool = False
    non_blocking: bool | None = None  # None: follow pin_memory (non-blocking needs pinned pages)
    persistent_workers: bool = False
    prefetch_factor: int | None = None  # DataLoader's default (2) when workers are used
    device_normalize: bool = False  # uint8 collate + normalise on the device
    timeout: float = 0  # seconds to wait for one batch from the workers; 0 waits forever (DataLoader's)
    s3_requests: int = 16  # s3:// data: GETs in flight per worker (a batch's images are fetched together)
    decode: str = "cpu"  # cpu (torchvision.io, PIL fallback) | pil | gpu (nvJPEG in the main process)


class TorchBackend(Backend):
    name = "torch"
    summary = "torchvision ImageFolder + transforms v2 + DataLoader"
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

    def gpu_work_between_steps(self, options: dict) -> bool:
        return options.get("decode") == "gpu"  # nvJPEG in the main process, between steps

    def build(self, cfg: LoaderConfig, opts: Options) -> TorchLoader:
        check_worker_options(opts)
        if opts.s3_requests < 1:
            raise LoaderError(f"s3_requests must be >= 1, got {opts.s3_requests}")
        check_decoder(opts.decode, "torch", (*DECODERS, "gpu"))
        if opts.decode == "gpu" and cfg.device.type != "cuda":
            raise LoaderError(
                f"torch decode='gpu' decodes with nvJPEG on a CUDA device; this run's device is {cfg.device} "
                "(use decode='cpu')"
            )
        if cfg.data is None:
            raise LoaderError("the torch backend needs data= (an ImageFolder split folder)")
        remote = objstore.is_url(cfg.data)  # one GET per image, from every worker
        return TorchLoader(
            cfg, opts, objstore.scan_imagefolder(cfg.data) if remote else scan_imagefolder(cfg.data)
        )


class TorchLoader(BaseLoader):
    name = "torch"
    index_order = True  # reads epoch_indices(): loader.sampler iterates them

    def __init__(self, cfg: LoaderConfig, opts: Options, index):
        n = len(index)
        super().__init__(cfg, *rank_share(n, cfg, cfg.data), index.classes, split_size=n)
        self.options = opts
        self.index = index
        gpu = opts.decode == "gpu"
        # GPU decode yields normalised batches on the device already: the feed only casts them.
        self._feed = DeviceFeed(cfg, False, False) if gpu else DeviceFeed.for_options(cfg, opts)
        self._transform = transform_for(
            cfg, float_in_workers=not (opts.device_normalize or gpu), decoder="cpu" if gpu else opts.decode
        )
        self._loader = worker_loader(
            Samples(index, self._transform, cfg.seed, opts.s3_requests, encoded=gpu),
            opts,
            self.name,
            cfg.device.type == "cuda",
            batch_size=cfg.batch_size,
            sampler=EpochKeys(self),
            collate_fn=collate_encoded
            if gpu
            else functools.partial(collate_checked, normalize=self._transform.normalize),
            drop_last=cfg.drop_last,
            # Workers share the main process's numpy/torch seeds only through this generator.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def describe(self) -> dict:
        return {**super().describe(), **describe_pipeline(self.options, self.config)}

    def _batches(self):
        for images, labels, bad in self._loader:
            if images is not None and self.options.decode == "gpu":
                images, kept, more = decode_batch(images, self._transform, self.config)
                labels, bad = labels[kept], bad + more
            self._skip_or_raise(bad, batch_empty=images is None)
            if images is not None:
                yield images, labels

    def _epoch_batches(self):
        return self._feed(self._batches())

    def close(self) -> None:
        self._loader.close()
