"""What the conformance test does not cover for `dali`: agreement with `torch`, the decode
options, epochs independent of history, batches that stay valid, and the GPU paths (marked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loaders import LoaderError, build_loader

from .conftest import available_backends

pytestmark = pytest.mark.skipif("dali" not in available_backends(), reason="dali not installed")


def first_eval_batch(name, data, device="cpu", **opts):
    loader = build_loader(name, data / "val", batch_size=8, train=False, image_size=96, device=device, **opts)
    images, labels = next(iter(loader))
    loader.close()
    return images.float().cpu(), labels.cpu()


def test_eval_batches_match_torchvision(small_data):
    """Same files, labels and crops as torchvision; pixels differ only by resampling filters."""
    xt, yt = first_eval_batch("torch", small_data)
    xd, yd = first_eval_batch("dali", small_data)
    assert torch.equal(yt, yd)
    assert torch.allclose(xt.mean(dim=(2, 3)), xd.mean(dim=(2, 3)), atol=0.05)
    box = torch.ones(3, 1, 5, 5) / 25  # compare at a scale where the resampling filters agree
    assert (F.conv2d(xt, box, groups=3) - F.conv2d(xd, box, groups=3)).abs().mean() < 0.12


def test_decode_options_are_checked(small_data):
    with pytest.raises(LoaderError, match="decode must be one of auto, gpu, cpu"):
        build_loader("dali", small_data / "train", batch_size=4, device="cpu", decode="nvjpeg")
    with pytest.raises(LoaderError, match="hw_decoder_load must be within 0..1"):
        build_loader("dali", small_data / "train", batch_size=4, device="cpu", hw_decoder_load=2.0)


def test_gpu_decode_without_cuda_is_a_clear_error(small_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LoaderError, match="decode='gpu' needs a CUDA device"):
        build_loader("dali", small_data / "train", batch_size=4, device="cpu", decode="gpu")


def test_epoch_depends_on_set_epoch_not_on_history(small_data):
    def first(loader):
        images, labels = next(iter(loader))
        return images.clone(), labels.clone()

    common = dict(batch_size=8, image_size=32, device="cpu", num_threads=2)
    a = build_loader("dali", small_data / "train", **common)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        for _ in a:
            pass
    a.set_epoch(2)
    xa, ya = first(a)
    b = build_loader("dali", small_data / "train", **common)
    b.set_epoch(2)
    xb, yb = first(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_kept_by_the_caller_are_not_overwritten(small_data):
    loader = build_loader("dali", small_data / "val", batch_size=8, train=False, image_size=32, device="cpu")
    kept = list(loader)
    again = [(x.clone(), y.clone()) for x, y in loader]
    assert len(kept) == len(again) == len(loader)
    for (x1, y1), (x2, y2) in zip(kept, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_cuda_paths_match_the_cpu_pipeline(small_data, decode):
    """nvJPEG (mixed) decode and the dali-cpu variant on CUDA against the CPU-only pipeline."""
    xg, yg = first_eval_batch("dali", small_data, device="cuda", decode=decode)
    xc, yc = first_eval_batch("dali", small_data, device="cpu")
    assert torch.equal(yg, yc)
    assert (xg - xc).abs().mean() < 0.05  # decoders differ by IDCT rounding only


@pytest.mark.gpu
def test_cuda_fp16_channels_last(small_data):
    loader = build_loader(
        "dali",
        small_data / "train",
        batch_size=8,
        image_size=64,
        device="cuda",
        dtype="fp16",
        channels_last=True,
    )
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.float16 and labels.dtype == torch.int64
    assert images.shape == (8, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)


def test_nvjpeg_buffer_options_are_refused_where_nothing_decodes_on_the_gpu(small_data):
    """The paddings and preallocation hints NVIDIA's ResNet-50 example gives nvJPEG mean nothing to
    a CPU decode: refused naming them, not silently ignored."""
    for name in (
        "device_memory_padding",
        "host_memory_padding",
        "preallocate_width_hint",
        "preallocate_height_hint",
    ):
        with pytest.raises(LoaderError, match=f"dali {name} size nvJPEG's buffers for GPU decode"):
            build_loader("dali", small_data / "train", batch_size=4, device="cpu", **{name: 1024})
    with pytest.raises(LoaderError, match="device_memory_padding must be >= 0"):
        build_loader("dali", small_data / "train", batch_size=4, device="cpu", device_memory_padding=-1)


def test_resize_without_antialiasing_is_an_option_and_changes_the_pixels(small_data):
    def first(**kw):
        loader = build_loader(
            "dali",
            small_data / "val",
            train=False,
            batch_size=4,
            image_size=32,
            device="cpu",
            num_threads=1,
            **kw,
        )
        try:
            return next(iter(loader))[0]
        finally:
            loader.close()

    smooth, sharp = first(), first(antialias=False)
    assert smooth.shape == sharp.shape == (4, 3, 32, 32)
    assert not torch.equal(smooth, sharp)  # evaluation: the same centre crops, another filter
    assert (smooth - sharp).abs().mean() < 0.5  # the same images all the same
