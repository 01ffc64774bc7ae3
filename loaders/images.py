"""The CPU image pipeline every DataLoader-fed backend shares: decode with a full check (libjpeg-turbo
through torchvision.io, PIL for what it cannot read), torchvision v2 random-resized-crop + flip
(train) or resize + centre crop (eval) on the uint8 tensor, seeded per sample and epoch; a collate
that normalises the whole batch at once (into shared memory in a worker) and reports bad samples to
the main process instead of failing in a worker. ``decoder="pil"`` keeps the PIL path (the previous
default) for comparison; ``encoded_sample`` is the GPU-decode path's half that runs in the workers."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .contract import MEAN, STD, LoaderConfig, LoaderError

# torchvision 0.29 deprecates its decoders for torchcodec's (the same libjpeg-turbo, measured at the
# same speed here); torchcodec is not in this project's pinned set, so the warning is silenced once.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

DECODERS = ("cpu", "pil")  # cpu: torchvision.io (libjpeg-turbo) with PIL for other formats


@dataclass(frozen=True)
class BadSample:
    path: str
    reason: str


@dataclass(frozen=True)
class ImageTransform:
    """What a worker does to one sample: decode with ``decoder``, then the seeded crop + flip of
    ``draw_box`` (train) or ``ops``, resize + centre crop (eval), to ``size``; ``normalize``: whether
    the collate normalises (else uint8 batches)."""

    ops: v2.Compose
    decoder: str
    normalize: bool
    train: bool
    size: int


def decode_rgb(source: str | Path | bytes):
    """A file's or bytes' image as an RGB PIL image, fully decoded (truncated JPEGs only show there)."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return im.convert("RGB")


def read_bytes(source: str | Path | bytes) -> bytes:
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


def decode_tensor(source: str | Path | bytes, decoder: str = "cpu") -> torch.Tensor:
    """The image as a uint8 RGB CHW tensor. ``cpu``: torchvision.io's libjpeg-turbo (about 1.5x
    PIL's decode + convert here) for JPEG/PNG/WebP, PIL for what it refuses (BMP, TIFF, odd JPEGs);
    a file both refuse raises PIL's error. ``pil``: PIL alone."""
    if decoder == "cpu":
        from torchvision.io import ImageReadMode, decode_image

        data = read_bytes(source)
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            source = data  # PIL decides, and its error is the one reported
    return v2.functional.pil_to_tensor(decode_rgb(source))


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


def check_decoder(decoder: str, backend: str, allowed: tuple[str, ...] = DECODERS) -> None:
    if decoder not in allowed:
        raise LoaderError(f"{backend} option decode must be one of {', '.join(allowed)}, got {decoder!r}")


def transform_for(cfg: LoaderConfig, float_in_workers: bool, decoder: str = "cpu") -> ImageTransform:
    size = cfg.image_size  # eval: the standard 0.875 centre-crop ratio; train: see draw_box
    ops = v2.Compose([v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)])
    return ImageTransform(ops, decoder, float_in_workers, cfg.train, size)


SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's defaults


def draw_box(height: int, width: int, seed: int, epoch: int, key: int) -> tuple[int, int, int, int, int]:
    """(top, left, height, width, flip) of sample ``key``'s training crop in epoch ``epoch``:
    torchvision v2 RandomResizedCrop.make_params and RandomHorizontalFlip's draws, call for call, from
    a private generator seeded by (seed, epoch, key). The same box whatever the worker or thread
    count: the global RNG, which v2 itself uses, is shared by threads (SPDL's, a toy pool's)."""
    g = torch.Generator().manual_seed(hash((seed, epoch, key)) & 0x7FFF_FFFF_FFFF_FFFF)
    area, log_ratio = height * width, torch.log(torch.tensor(RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(SCALE[0], SCALE[1], generator=g).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            break
    else:  # v2's fallback: the central crop of the nearest allowed ratio
        in_ratio = float(width) / float(height)
        if in_ratio < min(RATIO):
            w, h = width, int(round(width / min(RATIO)))
        elif in_ratio > max(RATIO):
            h, w = height, int(round(height * max(RATIO)))
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
    flip = not bool(torch.rand(1, generator=g) >= 0.5)  # v2 _RandomApplyTransform's test, p=0.5
    return i, j, h, w, int(flip)


def crop_flip(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """RandomResizedCrop(size, antialias=True) + RandomHorizontalFlip of ``image`` at ``box``."""
    top, left, h, w, flip = box
    image = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    return image.flip(-1) if flip else image


def augment(
    transform: ImageTransform, image: torch.Tensor, seed: int, epoch: int, sample: int
) -> torch.Tensor:
    """Train: the seeded crop and flip of ``draw_box``; eval: resize + centre crop (no randomness)."""
    if not transform.train:
        return transform.ops(image)
    return crop_flip(image, draw_box(*image.shape[-2:], seed, epoch, sample), transform.size)


def sample(transform: ImageTransform, source, where: str, label: int, seed: int, epoch: int, key: int):
    """(augmented uint8 image, label) of one sample, or a BadSample naming ``where``."""
    try:
        image = decode_tensor(source, transform.decoder)
    except Exception as exc:
        return BadSample(where, f"{type(exc).__name__}: {exc}")
    return augment(transform, image, seed, epoch, key), label


def _empty(shape, dtype) -> torch.Tensor:
    """A batch buffer; in a DataLoader worker, in shared memory from the start (as default_collate
    does), so handing it to the main process passes a file descriptor instead of copying it."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    n = 1
    for s in shape:
        n *= s
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(n)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def normalize_batch(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NCHW -> float32 normalised with MEAN/STD (into ``out`` when given)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    if out is None:
        out = images.float()
    elif out is not images:
        out.copy_(images)
    return out.sub_(mean).mul_(inv_std)


def collate_checked(batch, normalize: bool = False):
    """Stack the good samples (uint8, or normalised float32 with ``normalize``); report the bad
    ones to the main process, which applies the policy (and counts skips, which workers could not
    do for it)."""
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    good = [b for b in batch if not isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    shape = (len(good), *good[0][0].shape)
    if normalize:  # each sample converted straight into the float batch, then one pass of arithmetic
        images = _empty(shape, torch.float32)
        for k, g in enumerate(good):
            images[k].copy_(g[0])
        images = normalize_batch(images, images)
    else:
        images = torch.stack([g[0] for g in good], out=_empty(shape, good[0][0].dtype))
    labels = torch.tensor([g[1] for g in good], dtype=torch.int64)
    return images, labels, bad


def describe_pipeline(opts, cfg: LoaderConfig) -> dict:
    """Where a DataLoader-fed loader decodes and normalises (for its result)."""
    decode = getattr(opts, "decode", "cpu")
    where = "DataLoader workers" if opts.num_workers else "the main process"
    decoder = {"cpu": "torchvision.io/libjpeg-turbo", "pil": "PIL"}.get(decode)
    return {
        "decode": f"gpu (nvJPEG) in the main process, read in {where}"
        if decode == "gpu"
        else f"cpu ({decoder}) in {where}",
        "normalize": "device" if opts.device_normalize or decode == "gpu" else "workers",
        "pin_memory_effective": opts.pin_memory and cfg.device.type == "cuda",
    }


class SplitDataset(torch.utils.data.Dataset):
    """``loader.dataset``: the loader's split as a map-style Dataset, as training scripts read it
    from a DataLoader: ``len()`` is the whole split, ImageFolder's ``classes``, ``class_to_idx``,
    ``samples`` and ``targets``, and items decoded and transformed (this epoch's seeded crop in
    training), normalised, on the CPU, as a DataLoader's dataset hands them to its collate. Backends
    that read a converted format (ffcv, wds, dali over shards) have no per-file access: their
    ``samples`` and items are a TypeError naming the backend."""

    def __init__(self, loader):
        self.loader = loader
        self.classes = list(loader.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._index = getattr(loader, "index", None)

    def __len__(self) -> int:
        return self.loader.split_size

    def _files(self):
        if self._index is None:
            raise TypeError(
                f"the {self.loader.name} loader reads a converted format; its dataset has no per-file access"
            )
        return self._index

    @property
    def samples(self) -> list[tuple[str, int]]:
        index = self._files()
        return [(str(p), int(y)) for p, y in zip(index.paths, index.labels)]

    @property
    def targets(self) -> list[int]:
        return [int(y) for y in self._files().labels]

    def __getitem__(self, i: int):
        index, cfg = self._files(), self.loader.config
        transform = transform_for(cfg, float_in_workers=True)
        image = augment(transform, decode_tensor(str(index.paths[i])), cfg.seed, self.loader.epoch, int(i))
        return normalize_batch(image[None])[0].to(cfg.dtype), int(index.labels[i])
