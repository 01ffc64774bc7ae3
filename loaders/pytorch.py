"""`torch` backend: torchvision ImageFolder indexing + transforms v2 + DataLoader.

Every acceleration knob is its own option so the harness can measure each one:
``num_workers``, ``pin_memory`` (+ ``non_blocking`` copies), ``persistent_workers``,
``prefetch_factor`` and ``device_normalize`` (uint8 collate, host->device copy on a side CUDA
stream one batch ahead, normalisation on the device: timm's PrefetchLoader idea).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .backend import Backend
from .contract import BaseLoader, LoaderConfig, LoaderError, rank_share, scan_imagefolder, shard_indices
from .feed import DeviceFeed
from .pil import collate_checked, describe_pil, sample, transform_for
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

    def build(self, cfg: LoaderConfig, opts: Options) -> TorchLoader:
        check_worker_options(opts)
        if cfg.data is None:
            raise LoaderError("the torch backend needs data= (an ImageFolder split folder)")
        return TorchLoader(cfg, opts, scan_imagefolder(cfg.data))


class _Samples(Dataset):
    """Decodes and augments one sample. Keys are (epoch, index) so that augmentation is seeded
    per sample and epoch: the same seed gives the same images whatever the worker count."""

    def __init__(self, index, transform, seed: int):
        self.paths, self.labels = index.paths, index.labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        epoch, i = key
        path = str(self.paths[i])
        return sample(self.transform, path, path, int(self.labels[i]), self.seed, epoch, int(i))


class _EpochKeys(Sampler):
    """Wraps a rank's index sampler to yield (epoch, index) keys for ``_Samples``."""

    def __init__(self, loader: TorchLoader):
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

    def __init__(self, cfg: LoaderConfig, opts: Options, index):
        n = len(index)
        super().__init__(cfg, *rank_share(n, cfg, cfg.data), index.classes)
        self.options = opts
        self.index = index
        self._feed = DeviceFeed.for_options(cfg, opts)
        if cfg.train:
            # DistributedSampler pads to equal shards (<= world_size - 1 repeats): DDP never hangs.
            self._index_sampler = DistributedSampler(
                range(n),
                num_replicas=cfg.world_size,
                rank=cfg.rank,
                shuffle=True,
                seed=cfg.seed,
                drop_last=False,
            )
        else:
            self._index_sampler = lambda epoch: shard_indices(
                n, cfg.rank, cfg.world_size, shuffle=False, seed=cfg.seed, epoch=epoch, pad=False
            )
        self._loader = worker_loader(
            _Samples(index, transform_for(cfg, float_in_workers=not opts.device_normalize), cfg.seed),
            opts,
            self.name,
            cfg.device.type == "cuda",
            batch_size=cfg.batch_size,
            sampler=_EpochKeys(self),
            collate_fn=collate_checked,
            drop_last=cfg.drop_last,
            # Workers share the main process's numpy/torch seeds only through this generator.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def describe(self) -> dict:
        return {**super().describe(), **describe_pil(self.options, self.config)}

    def _batches(self):
        for images, labels, bad in self._loader:
            self._skip_or_raise(bad, batch_empty=images is None)
            if images is not None:
                yield images, labels

    def __iter__(self):
        return self._feed(self._batches())

    def close(self) -> None:
        self._loader.close()
