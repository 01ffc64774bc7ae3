"""The spdl backend beyond the conformance suite: its crops are the torch backend's (with decode=cpu,
the default, or pil the very same pixels; with ffmpeg the same seeded draws and FFmpeg's scaler), thread
counts change speed only, a failing stage is
an error (SPDL drops failed items by default), and close() joins the pipeline's threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loaders import LoaderError, build_loader

from .conftest import available_backends

pytestmark = pytest.mark.skipif("spdl" not in available_backends(), reason="spdl (or FFmpeg) not installed")


def first_batch(name, split, **opts):
    loader = build_loader(name, split, batch_size=16, image_size=64, device="cpu", seed=3, **opts)
    loader.set_epoch(2)
    batch = next(iter(loader))
    loader.close()
    return batch


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_images_are_the_torch_backends_crops(train, small_data):
    """Per image, spdl's output is far closer to torch's for the same sample than two different
    samples are: the same boxes, flips, resize sizes and offsets (measured: <= 0.17 vs ~0.67)."""
    split = small_data / ("train" if train else "val")
    xt, yt = first_batch("torch", split, train=train)
    xs, ys = first_batch("spdl", split, train=train, decode="ffmpeg")
    assert torch.equal(yt, ys)
    same = (xt - xs).abs().mean(dim=(1, 2, 3))
    other = (xt - xs.roll(1, 0)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.3, same
    assert other.mean() > 2 * same.max(), (same, other)


@pytest.mark.parametrize("decode", ["cpu", "pil"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_torch_decode_stage_gives_the_torch_backends_pixels(decode, train, small_data):
    """decode=cpu|pil runs the torch backend's per-sample code on SPDL's threads: equal pixels."""
    split = small_data / ("train" if train else "val")
    xt, yt = first_batch("torch", split, train=train, decode=decode, num_workers=0)
    xs, ys = first_batch("spdl", split, train=train, decode=decode, num_threads=2)
    assert torch.equal(yt, ys) and torch.equal(xt, xs)


@pytest.mark.parametrize("decode", ["cpu", "ffmpeg"])
def test_thread_count_changes_speed_only(decode, small_data):
    a = first_batch("spdl", small_data / "train", num_threads=1, decode=decode)
    b = first_batch("spdl", small_data / "train", num_threads=3, prefetch=1, decode=decode)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_failing_stage_is_an_error_not_a_dropped_sample(small_data, monkeypatch):
    import loaders.spdl as ls

    real = ls.SpdlLoader._load

    def fail_one(self, i):
        if i == 5:
            raise ValueError("a bug in a stage")
        return real(self, i)

    monkeypatch.setattr(ls.SpdlLoader, "_load", fail_one)
    loader = build_loader(
        "spdl", small_data / "train", batch_size=8, image_size=32, device="cpu", num_threads=2
    )
    with pytest.raises(LoaderError, match="spdl pipeline stopped"):
        sum(len(y) for _, y in loader)
    loader.close()


def test_close_joins_the_pipeline_threads(small_data):
    before = threading.active_count()
    loader = build_loader(
        "spdl", small_data / "train", batch_size=8, image_size=32, device="cpu", num_threads=3
    )
    batches = iter(loader)
    next(batches)
    assert threading.active_count() >= before + 3
    loader.close()  # `batches` is still referenced: only close() can have stopped them
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]
    del batches


@pytest.mark.parametrize(
    "opts,says",
    [
        (dict(num_threads=0), "num_threads must be >= 1"),
        (dict(prefetch=0), "prefetch must be >= 1"),
        (dict(scale_algo="nearest-ish"), "scale_algo must be one of"),
        (dict(decode="nvjpeg"), "decode must be one of ffmpeg, cpu, pil"),
        (
            dict(decode="cpu", scale_algo="area"),
            "scale_algo is FFmpeg's resize filter: it needs decode=ffmpeg",
        ),
    ],
)
def test_impossible_options_are_refused(opts, says, small_data):
    with pytest.raises(LoaderError, match=says):
        build_loader("spdl", small_data / "train", batch_size=8, device="cpu", **opts)


def test_ctrl_c_while_iterating_stops_the_pipeline(small_data):
    """SIGINT lands in the main thread while SPDL's threads decode: the KeyboardInterrupt reaches the
    caller, and closing the loader (bench's `finally`) ends every pipeline thread within seconds."""
    import os
    import signal

    # A test run started in the background by a non-interactive shell ignores SIGINT (and so would
    # this process): Python's own handler, as a terminal's foreground job has it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = threading.active_count()
    loader = build_loader(
        "spdl", small_data / "train", batch_size=4, image_size=32, device="cpu", num_threads=2
    )
    with pytest.raises(KeyboardInterrupt):
        for k, _ in enumerate(loader):
            if k == 2:
                os.kill(os.getpid(), signal.SIGINT)
            assert k < 1000, "the interrupt never arrived"
    signal.signal(signal.SIGINT, previous)
    loader.close()
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]
