"""The harness charges no backend for anything but its batches: its images/s agrees within 5 % with
an outside perf_counter clock on the same run, for every backend, loader-only and end to end.

The outside clock wraps the loader `bench run` builds and stamps what a plain timing loop would:
an epoch's window opens when the loop asks for its iterator (or, in the warm-up epoch, for the first
batch after the warm-up steps) and closes when the loop asks for a batch that is not there or stops
asking. Runs stop mid-epoch (--steps), so an iterator torn down inside the window (FFCV's and DALI's
pipeline threads join there: up to `batches_ahead` batches of decoding) would show."""

from __future__ import annotations

import dataclasses
import time

import pytest

from bench.harness import runner
from bench.harness.result import load
from bench.harness.spec import RunSpec

from .conftest import available_backends
from .outside_clock import BackToBack, Stamped

BATCH, WARMUP, STEPS = 16, 3, 14  # 10 batches an epoch of the small set: the run stops inside epoch 2


@pytest.mark.parametrize("mode", ["loader-only", "end-to-end"])
@pytest.mark.parametrize("name", available_backends())
def test_harness_images_per_second_match_an_outside_clock(name, mode, small_data, tmp_path, monkeypatch):
    stamped = []
    real = runner.build_loader

    def build(*args, train=True, **kwargs):
        loader = real(*args, train=train, **kwargs)
        if train:
            stamped.append(Stamped(loader))
            return stamped[-1]
        return loader

    monkeypatch.setattr(runner, "build_loader", build)
    spec = dataclasses.replace(
        RunSpec().with_loader(name, workers=2),
        data=str(small_data),
        batch_size=BATCH,
        image_size=48,
        steps=STEPS,
        warmup_steps=WARMUP,
        loader_only=mode == "loader-only",
        out=str(tmp_path),
    )
    if name == "synthetic" and spec.loader_only:
        # Its batches cost under a microsecond: a window of 11 would be a few microseconds of Python.
        spec = dataclasses.replace(spec.with_options(num_samples=BATCH * 4000), steps=3000)
    path = runner.run(spec, ["run"], log=lambda *a: None)
    harness = load(path).metrics
    assert harness.measured_images == sum(sum(e["images"]) for e in stamped[0].epochs) - BATCH * WARMUP
    ratio = harness.images_per_second / stamped[0].images_per_second(WARMUP)
    assert 0.95 < ratio < 1.05, f"{name} {mode}: harness / outside clock = {ratio:.3f}"


EPOCHS_CROSSED = 2  # the window runs through two epoch boundaries: 10 + 10 + 8 batches


class SlowBoundaries:
    """A loader whose set_epoch and iterator teardown take BOUNDARY_S each (as a DataLoader's
    worker shutdown or a sampler that reshuffles a large index would)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        time.sleep(BOUNDARY_S)
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return _SlowEnd(iter(self.loader))


class _SlowEnd:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)

    def __del__(self):
        time.sleep(BOUNDARY_S)


BOUNDARY_S = 0.05


@pytest.mark.parametrize(
    "name", [*available_backends(), pytest.param("torch-slow-boundaries", id="torch-slow-boundaries")]
)
def test_a_window_across_epoch_boundaries_matches_a_loop_that_runs_epochs_back_to_back(
    name, small_data, tmp_path, monkeypatch
):
    """A training loop pays each epoch's end (the iterator's teardown: worker and pipeline threads
    joined) and the next epoch's set_epoch and iterator start before its next batch; so must the
    harness (loader only: nothing else runs between the epochs). torch-slow-boundaries makes those
    costs 50 ms each, so that a harness that left them out would read far above the loop."""
    clocks = []
    real = runner.build_loader
    slow = name.endswith("-slow-boundaries")
    name = name.removesuffix("-slow-boundaries")

    def build(*args, train=True, **kwargs):
        loader = real(*args, train=train, **kwargs)
        if train:
            clocks.append(BackToBack(SlowBoundaries(loader) if slow else loader, WARMUP))
            return clocks[-1]
        return loader

    monkeypatch.setattr(runner, "build_loader", build)
    per_epoch = 10
    spec = dataclasses.replace(
        RunSpec().with_loader(name, workers=2),
        data=str(small_data),
        batch_size=BATCH,
        image_size=48,
        steps=per_epoch * EPOCHS_CROSSED + 8,
        warmup_steps=WARMUP,
        loader_only=True,
        out=str(tmp_path),
    )
    if name == "synthetic":  # batches of a microsecond: epochs of 1000 of them outweigh the bookkeeping
        per_epoch = 1000
        spec = dataclasses.replace(
            spec.with_options(num_samples=BATCH * per_epoch), steps=per_epoch * EPOCHS_CROSSED + 500
        )
    path = runner.run(spec, ["run"], log=lambda *a: None)
    harness = load(path).metrics
    assert len(harness.epochs) == EPOCHS_CROSSED + 1
    assert harness.measured_images == clocks[0].images
    ratio = harness.images_per_second / clocks[0].images_per_second()
    assert 0.95 < ratio < 1.05, f"{name}: harness / a back-to-back loop = {ratio:.3f}"
