"""The device feed: host batches become the contract's tensors on the device (pinned,
non-blocking copies; normalisation on the device; with both on CUDA the copy of batch k+1 on a
side stream while the model runs batch k: timm's PrefetchLoader idea)."""

from __future__ import annotations

import torch

from .contract import MEAN, STD, LoaderConfig


def normalize_uint8(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """uint8 NCHW -> normalised ``cfg.dtype``, in ``cfg.memory_format``, on the images' device.
    Arithmetic runs in fp32 and is cast once, so bf16/fp16 outputs round only once."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255)
    out = images.float().sub_(mean).mul_(inv_std)
    return out.to(dtype=cfg.dtype, memory_format=cfg.memory_format)


class DeviceFeed:
    """``feed(batches)``: (images, labels) on the host -> on ``cfg.device`` as the contract says.
    ``device_normalize``: the batches are uint8 and normalised here; otherwise already normalised."""

    def __init__(self, cfg: LoaderConfig, device_normalize: bool, non_blocking: bool):
        self.cfg, self.device_normalize, self.non_blocking = cfg, device_normalize, non_blocking

    @classmethod
    def for_options(cls, cfg: LoaderConfig, opts) -> DeviceFeed:
        """From Options with pin_memory, non_blocking (None: follow pin_memory) and device_normalize."""
        return cls(
            cfg, opts.device_normalize, opts.pin_memory if opts.non_blocking is None else opts.non_blocking
        )

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
