"""The harness charges no backend for anything but its batches: its images/s agrees within 5 % with
an outside perf_counter clock on the same run, for every backend, loader-only and end to end.

The outside clock wraps the loader `bench run` builds and stamps what a plain timing loop would:
an epoch's window opens when the loop asks for its iterator (or, in the warm-up epoch, for the first
batch after the warm-up steps) and closes when the loop asks for a batch that is not there or stops
asking. Runs stop mid-epoch (--steps), so an iterator torn down inside the window (FFCV's and DALI's
pipeline threads join there: up to `batches_ahead` batches of decoding) would show."""

from __future__ import annotations

import dataclasses

import pytest

from bench.harness import runner
from bench.harness.result import load
from bench.harness.spec import RunSpec

from .conftest import available_backends
from .outside_clock import Stamped

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
