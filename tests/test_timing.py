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

BATCH, WARMUP, STEPS = 16, 3, 14  # 10 batches an epoch of the small set: the run stops inside epoch 2


class Stamped:
    """A loader seen from outside: per epoch, the perf_counter times the consumer asked for its
    iterator and for each batch, and the images each batch held."""

    def __init__(self, loader):
        self.loader, self.epochs = loader, []

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        epoch = {"iter": time.perf_counter(), "asks": [], "images": []}
        self.epochs.append(epoch)
        it = iter(self.loader)
        while True:
            epoch["asks"].append(time.perf_counter())
            try:
                images, labels = next(it)
            except StopIteration:  # a plain loop's clock runs until the loader says the epoch is over
                epoch["asks"][-1] = time.perf_counter()
                return
            epoch["images"].append(labels.shape[0])
            try:
                yield images, labels
            except GeneratorExit:  # the consumer stopped asking (--steps): stamped before `it` is torn down
                epoch["asks"].append(time.perf_counter())
                raise

    def images_per_second(self, warmup: int) -> float:
        images, seconds, seen = 0, 0.0, 0  # batches seen before this epoch
        for e in self.epochs:
            n = len(e["images"])
            end = e["asks"][n]  # the ask that found no batch, or the moment the asking stopped
            if seen >= warmup:  # a whole measured epoch, its iterator's start included
                start, counted = e["iter"], e["images"]
            elif seen + n > warmup:  # the epoch in which the warm-up ends
                start, counted = e["asks"][warmup - seen], e["images"][warmup - seen :]
            else:
                start = None
            if start is not None:
                images += sum(counted)
                seconds += end - start
            seen += n
        return images / seconds


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
