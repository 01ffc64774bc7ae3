"""`synthetic` backend: one batch resident on the device, yielded every step; no I/O, no decode.

The ceiling every report divides by: the same model and step count with a loader that costs
nothing. Sizes follow ``data`` when given (sample and class counts of the ImageFolder), so a
synthetic epoch has as many steps as the real one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import Backend
from .contract import BaseLoader, LoaderConfig, LoaderError, num_batches, rank_share, scan_imagefolder


@dataclass(frozen=True)
class Options:
    num_samples: int | None = None  # default: the data folder's sample count
    num_classes: int | None = None  # default: the data folder's class count


class SyntheticBackend(Backend):
    name = "synthetic"
    summary = "a batch resident on the device; no I/O (the ceiling)"
    Options = Options
    is_ceiling = True

    def build(self, cfg: LoaderConfig, opts: Options) -> SyntheticLoader:
        num_samples, num_classes = opts.num_samples, opts.num_classes
        if cfg.data is not None and (num_samples is None or num_classes is None):
            index = scan_imagefolder(cfg.data)
            num_samples = len(index) if num_samples is None else num_samples
            num_classes = len(index.classes) if num_classes is None else num_classes
        if num_samples is None or num_classes is None:
            raise LoaderError("the synthetic backend needs data= or both num_samples= and num_classes=")
        if num_classes < 1:
            raise LoaderError(f"num_classes must be >= 1, got {num_classes}")
        return SyntheticLoader(cfg, num_samples, num_classes)


class SyntheticLoader(BaseLoader):
    name = "synthetic"
    index_order = True  # its epochs have the shared order's sizes (what a resumed epoch has left)

    def __init__(self, cfg: LoaderConfig, num_samples: int, num_classes: int):
        super().__init__(
            cfg,
            *rank_share(num_samples, cfg, "the synthetic set"),
            tuple(map(str, range(num_classes))),
            split_size=num_samples,
        )
        # Train and eval batches differ, so evaluation cannot score a memorised training batch:
        # the labels are random, and accuracy on them is (correctly) chance.
        g = torch.Generator().manual_seed(hash((cfg.seed, cfg.rank, cfg.train)) & 0x7FFF_FFFF_FFFF_FFFF)
        b, s = cfg.batch_size, cfg.image_size
        # Already-normalised values (mean 0, std 1), as a real backend would hand over.
        self._images = torch.randn(b, 3, s, s, generator=g).to(
            cfg.device, cfg.dtype, memory_format=cfg.memory_format
        )
        self._labels = torch.randint(0, num_classes, (b,), generator=g).to(cfg.device)

    def describe(self) -> dict:
        return {**super().describe(), "decode": "none (resident batch)", "normalize": "none"}

    def _epoch_batches(self):
        b, cfg = self.config.batch_size, self.config
        left = self.num_samples if not self._resume_at else len(self.epoch_indices())
        for k in range(num_batches(left, b, cfg.drop_last)):
            n = min(b, left - k * b)
            if n == b:
                yield self._images, self._labels
            else:  # the last, partial batch: a view, still no copy
                yield self._images[:n], self._labels[:n]
