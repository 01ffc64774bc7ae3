"""Micro-benchmarks (pytest-benchmark): JPEG decode, crop + flip, collate, one batch per backend.
Not part of the test suite (outside `testpaths`); run them with

    .venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-group-by=group

Each group compares the ways of doing one thing; figures are per call.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import backends, build_loader


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    from bench.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("micro") / "set"
    generate(
        out, SynthSpec(classes=4, train_per_class=48, val_per_class=8), progress=False
    )  # default-size images
    return out


@pytest.fixture(scope="session")
def jpeg(data):
    path = sorted((data / "train").rglob("*.jpg"))[0]
    return path.read_bytes()


@pytest.mark.benchmark(group="decode")
def test_decode_pil(benchmark, jpeg):
    benchmark(lambda: Image.open(io.BytesIO(jpeg)).convert("RGB").load())


@pytest.mark.benchmark(group="decode")
def test_decode_torchvision_io(benchmark, jpeg):
    from torchvision.io import decode_jpeg

    raw = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    benchmark(decode_jpeg, raw)


@pytest.mark.benchmark(group="crop+flip")
def test_crop_flip_pil(benchmark, jpeg):
    from torchvision.transforms import v2

    t = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    benchmark(t, img)


@pytest.mark.benchmark(group="crop+flip")
def test_crop_flip_uint8_tensor(benchmark, jpeg):
    from torchvision.transforms import v2

    t = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    img = (
        torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(2, 0, 1).contiguous()
    )
    benchmark(t, img)


@pytest.mark.benchmark(group="collate")
def test_collate_float32(benchmark):
    from torch.utils.data import default_collate

    batch = [(torch.rand(3, 224, 224), 1) for _ in range(64)]
    benchmark(default_collate, batch)


@pytest.mark.benchmark(group="collate")
def test_collate_uint8(benchmark):
    from torch.utils.data import default_collate

    batch = [(torch.randint(0, 255, (3, 224, 224), dtype=torch.uint8), 1) for _ in range(64)]
    benchmark(default_collate, batch)


BACKENDS = [b.name for b in backends() if b.installed and b.name != "synthetic"]
OPTS = {
    "torch": dict(num_workers=2),
    "wds": dict(num_workers=2),
    "dali": dict(num_threads=2),
    "ffcv": dict(num_workers=2),
}


@pytest.mark.benchmark(group="one batch of 64")
@pytest.mark.parametrize("name", BACKENDS)
def test_one_batch(benchmark, name, data, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOADERBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    loader = build_loader(name, data / "train", batch_size=64, device="cpu", **OPTS.get(name, {}))
    batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # epochs, endlessly
    next(batches)  # start-up (workers, FFCV's compilation) outside the timing
    benchmark.pedantic(lambda: next(batches), rounds=12, iterations=1)
    loader.close()
