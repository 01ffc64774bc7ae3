"""The training augmentation every CPU path shares (torch, wds, spdl, the torch GPU-decode path):
``draw_box`` is torchvision's RandomResizedCrop + RandomHorizontalFlip, draw for draw, and its crop
scales, aspect ratios and flips follow torchvision's distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision import transforms as v1
from torchvision.transforms import v2

from loaders import build_loader
from loaders.images import crop_flip, decode_tensor, draw_box, normalize_batch

SIZES = [(375, 500), (500, 333), (64, 48), (20, 400), (400, 20), (224, 224)]  # the last three: fallbacks too


@pytest.mark.parametrize("height,width", SIZES)
def test_draw_box_is_torchvisions_v2_draw(height, width):
    crop, flip = v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()
    for key in range(200):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((7, 1, key)) & 0x7FFF_FFFF_FFFF_FFFF)
            p = crop.make_params([torch.empty(0, height, width)])
            flipped = not bool(torch.rand(1) >= flip.p)
        assert draw_box(height, width, 7, 1, key) == (
            p["top"],
            p["left"],
            p["height"],
            p["width"],
            int(flipped),
        )


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("height,width", SIZES[:3])
def test_crop_scales_aspect_ratios_and_flips_follow_torchvision(height, width):
    """4,000 of our boxes against 4,000 of torchvision's (v1 get_params, its own RNG stream): KS
    statistics of scale and log aspect ratio under the 0.1 % critical value, flips 50 % within 4 sigma."""
    n = 4000
    ours = np.array([draw_box(height, width, 0, 0, k) for k in range(n)], dtype=np.float64)
    torch.manual_seed(12345)
    image = torch.empty(0, height, width)
    ref = np.array([v1.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    critical = 1.95 * math.sqrt(2 / n)  # alpha = 0.001
    for name, f in {
        "scale": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "log aspect ratio": lambda b: np.log(b[:, 3] / b[:, 2]),
        "centre row": lambda b: (b[:, 0] + b[:, 2] / 2) / height,
        "centre column": lambda b: (b[:, 1] + b[:, 3] / 2) / width,
    }.items():
        d = ks_statistic(f(ours), f(ref.astype(np.float64)))
        assert d < critical, f"{name}: KS {d:.4f} >= {critical:.4f}"
    assert abs(ours[:, 4].mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert len({tuple(draw_box(height, width, 0, e, 3)) for e in range(20)}) > 15, "epochs must redraw"


def test_the_torch_backend_applies_exactly_draw_box(small_data):
    """The default torch path's train images are crop_flip(decode, draw_box) to the bit."""
    loader = build_loader("torch", small_data / "train", batch_size=8, image_size=48, device="cpu", seed=5)
    loader.set_epoch(3)
    images, labels = next(iter(loader))
    order = list(loader.sampler)[:8]
    for k, i in enumerate(order):
        image = decode_tensor(str(loader.index.paths[i]))
        expected = crop_flip(image, draw_box(*image.shape[-2:], 5, 3, int(i)), 48)
        assert torch.equal(normalize_batch(expected[None])[0], images[k])
    loader.close()


def test_the_gpu_decode_path_equals_the_cpu_path_when_decoded_on_the_cpu(small_data):
    """decode='gpu' splits the work: workers read bytes and draw boxes (encoded_sample), the main
    process decodes and crops (decode_batch on cfg.device). On the CPU the two halves must give the
    default path's batch exactly; on CUDA tests/test_gpu.py compares them within nvJPEG's rounding."""
    from loaders.gpudecode import collate_encoded, decode_batch, encoded_sample

    for train in (True, False):
        split = small_data / ("train" if train else "val")
        loader = build_loader("torch", split, batch_size=8, train=train, image_size=48, device="cpu", seed=5)
        loader.set_epoch(2)
        images, labels = next(iter(loader))
        keys = list(loader.sampler)[:8]
        paths = [str(loader.index.paths[i]) for i in keys]
        encoded, enc_labels, bad = collate_encoded(
            [
                encoded_sample(loader._transform, p, p, int(loader.index.labels[i]), 5, 2, int(i))
                for p, i in zip(paths, keys)
            ]
        )
        decoded, kept, more = decode_batch(encoded, loader._transform, loader.config)
        assert not bad and not more and kept == list(range(8))
        assert torch.equal(enc_labels, labels) and torch.equal(decoded, images)
        loader.close()


def test_gpu_decode_without_cuda_is_refused_naming_the_option(small_data):
    from loaders import LoaderError

    with pytest.raises(LoaderError, match="decode='gpu'.*CUDA.*cpu"):
        build_loader("torch", small_data / "train", batch_size=8, device="cpu", decode="gpu")
    with pytest.raises(LoaderError, match="decode must be one of cpu, pil, gpu"):
        build_loader("torch", small_data / "train", batch_size=8, device="cpu", decode="nvjpeg")
