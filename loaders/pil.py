"""The PIL pipeline every CPU-decoding backend shares: decode with a full check, torchvision v2
random-resized-crop + flip (train) or resize + centre crop (eval), seeded per sample and epoch,
and a collate that reports bad samples to the main process instead of failing in a worker."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from .contract import MEAN, STD, LoaderConfig


@dataclass(frozen=True)
class BadSample:
    path: str
    reason: str


def decode_rgb(source: str | Path | bytes):
    """A file's or bytes' image as RGB, fully decoded (truncated JPEGs only show there)."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return im.convert("RGB")


def decode_problem(path: str) -> str | None:
    """Why ``path`` cannot be decoded as an RGB image, or None if it can. For backends whose
    decoder fails without naming the file."""
    try:
        decode_rgb(path)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def shrink(image, max_resolution: int | None):
    """``image`` with its longest side capped at ``max_resolution`` (never upscaled)."""
    from PIL import Image

    if max_resolution is None or max(image.size) <= max_resolution:
        return image
    scale = max_resolution / max(image.size)
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )


def transform_for(cfg: LoaderConfig, float_in_workers: bool) -> v2.Compose:
    size = cfg.image_size
    if cfg.train:
        ops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:  # the standard 0.875 centre-crop ratio
        ops = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    ops.append(v2.PILToTensor())
    if float_in_workers:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


def augment(transform, image, seed: int, epoch: int, sample: int) -> torch.Tensor:
    """``transform(image)`` seeded by (seed, epoch, sample): the same crop and flip whatever the
    worker count or order. fork_rng keeps the caller's global RNG untouched when num_workers=0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, epoch, sample)) & 0x7FFF_FFFF_FFFF_FFFF)
        return transform(image)


def sample(transform, source, where: str, label: int, seed: int, epoch: int, key: int):
    """(augmented image, label) of one sample, or a BadSample naming ``where``."""
    try:
        image = decode_rgb(source)
    except Exception as exc:
        return BadSample(where, f"{type(exc).__name__}: {exc}")
    return augment(transform, image, seed, epoch, key), label


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


def describe_pil(opts, cfg: LoaderConfig) -> dict:
    """Where a PIL-decoding, DataLoader-fed loader decodes and normalises (for its result)."""
    return {
        "decode": "cpu (PIL) in DataLoader workers" if opts.num_workers else "cpu (PIL) in the main process",
        "normalize": "device" if opts.device_normalize else "workers",
        "pin_memory_effective": opts.pin_memory and cfg.device.type == "cuda",
    }
