"""GPU JPEG decode inside a plain PyTorch pipeline (the torch backend's ``decode="gpu"``): DataLoader
workers read each file's bytes and draw its crop box and flip exactly as the CPU path would (same
seed, same RNG calls); the main process decodes the batch with nvJPEG (torchvision.io.decode_jpeg on
the device), crops, flips and normalises there. The idea of DALI's proxy mode, without DALI."""

from __future__ import annotations

import io

import torch

from .contract import LoaderConfig
from .feed import normalize_uint8
from .images import BadSample, ImageTransform, crop_flip, draw_box, read_bytes


def encoded_sample(
    transform: ImageTransform, source, where: str, label: int, seed: int, epoch: int, key: int
):
    """The workers' half: ((the JPEG's bytes, its box or None for eval, where), label), or a
    BadSample naming ``where``. Only the header is parsed here; a file truncated further in is
    found when its batch decodes."""
    from PIL import Image

    try:
        data = read_bytes(source)
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise ValueError(f"a {im.format} image; decode='gpu' reads JPEG files only")
            width, height = im.size
    except Exception as exc:
        return BadSample(where, f"{type(exc).__name__}: {exc}")
    box = draw_box(height, width, seed, epoch, key) if transform.train else None
    return (torch.frombuffer(bytearray(data), dtype=torch.uint8), box, where), label


def collate_encoded(batch):
    """(encoded batch, labels, bad). The files' bytes travel as one concatenated tensor with their
    lengths: a list of tensors would cost the main process a shared-memory file per image."""
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    good = [b for b in batch if not isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    encoded = {
        "bytes": torch.cat([g[0][0] for g in good]),
        "lengths": [len(g[0][0]) for g in good],
        "boxes": [g[0][1] for g in good],
        "where": [g[0][2] for g in good],
    }
    return encoded, torch.tensor([g[1] for g in good], dtype=torch.int64), bad


def _decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """Each JPEG decoded on ``device`` (nvJPEG for CUDA), or the exception it raised: a batch call
    first, one by one only when it fails, to name the bad files."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                out.append(exc)
        return out


def decode_batch(encoded, transform: ImageTransform, cfg: LoaderConfig):
    """(normalised images on ``cfg.device``, indices kept, bad [(where, reason)]) of a collated batch."""
    images, kept, bad = [], [], []
    datas = list(torch.split(encoded["bytes"], encoded["lengths"]))
    for k, (image, box, where) in enumerate(
        zip(_decode(datas, cfg.device), encoded["boxes"], encoded["where"])
    ):
        if isinstance(image, Exception):
            bad.append((where, f"{type(image).__name__}: {str(image).strip().splitlines()[-1]}"))
            continue
        images.append(transform.ops(image) if box is None else crop_flip(image, box, transform.size))
        kept.append(k)
    if not images:
        return None, kept, bad
    return normalize_uint8(torch.stack(images), cfg), kept, bad
