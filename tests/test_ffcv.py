"""The ffcv backend beyond the conformance test: conversion (manifest, atomic, bad images), damaged
or missing .beton files, distributed limits, the worker cap, kept batches, and `bench run`."""

from __future__ import annotations

import json
import time

import pytest
import torch

from loaders import LoaderError, build_loader

from .conftest import available_backends, bench, copy_tree

pytestmark = pytest.mark.skipif("ffcv" not in available_backends(), reason="ffcv not installed")


@pytest.fixture(scope="module")
def converted(probe, tmp_path_factory):
    out = tmp_path_factory.mktemp("beton") / "probe"
    res = bench(
        "data",
        "convert",
        "--to",
        "ffcv",
        "--data",
        str(probe["root"]),
        "--out",
        str(out),
        "--max-resolution",
        "64",
        "--jpeg-quality",
        "85",
        cwd=out.parent,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_convert_writes_both_splits_with_manifests(converted, probe):
    for split in ("train", "val"):
        beton = converted / f"{split}.beton"
        m = json.loads((converted / f"{split}.beton.json").read_text())
        assert m["samples"] == len(probe[split]) and m["classes"] == ["ant", "bee", "cat"]
        assert m["storage"] == {
            "write_mode": "jpg",
            "max_resolution": 64,
            "jpeg_quality": 85,
            "compress_probability": 0.5,
        }
        assert m["bytes"] == beton.stat().st_size > 0
    assert not list(converted.glob(".*"))  # no temporaries left


def test_missing_damaged_or_unfinished_beton_is_refused(converted, tmp_path):
    with pytest.raises(LoaderError, match="ffcv file not found"):
        build_loader("ffcv", tmp_path / "nope.beton", batch_size=4, device="cpu")
    data = copy_tree(converted, tmp_path / "c")
    beton = data / "train.beton"
    with open(beton, "r+b") as f:  # truncated, as by a full disk or an interrupted copy
        f.truncate(beton.stat().st_size // 2)
    with pytest.raises(
        LoaderError, match=r"train.beton is (truncated|damaged): \d+ bytes, its manifest says"
    ):
        build_loader("ffcv", beton, batch_size=4, device="cpu")
    (data / "val.beton.json").unlink()
    with pytest.raises(LoaderError, match="has no manifest"):
        build_loader("ffcv", data / "val.beton", batch_size=4, device="cpu")
    out = bench(
        "run",
        "--loader",
        "ffcv",
        "--data",
        str(data),
        "--steps",
        "8",
        "--warmup-steps",
        "2",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "train.beton is truncated" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))


def test_interrupted_conversion_leaves_nothing_that_looks_complete(probe, tmp_path, monkeypatch):
    from ffcv.writer import DatasetWriter

    from loaders.ffcv import convert_beton

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_beton(probe["root"] / "train", tmp_path / "train.beton", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_stops_the_conversion_naming_it(probe, tmp_path):
    data = copy_tree(probe["root"], tmp_path / "d")
    bad = data / "train" / "bee" / "img_008.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 8)
    out = bench(
        "data", "convert", "--to", "ffcv", "--data", str(data), "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert out.returncode == 2 and str(bad) in out.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "o").glob("*.beton"))


def test_distributed_limits_are_clear(converted):
    with pytest.raises(LoaderError, match="'quasi_random' cannot be used with several ranks"):
        build_loader(
            "ffcv",
            converted / "train.beton",
            batch_size=4,
            device="cpu",
            rank=0,
            world_size=2,
            order="quasi_random",
        )
    # The contract's order needs no process group: a rank reads its strided share of the permutation.
    halves = [
        build_loader("ffcv", converted / "train.beton", batch_size=4, device="cpu", rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert [len(h.epoch_indices()) for h in halves] == [h.num_samples for h in halves]
    assert not set(halves[0].epoch_indices()) & set(halves[1].epoch_indices()) or halves[0].padding


def test_workers_are_capped_at_the_cores_with_a_note(converted):
    import os

    loader = build_loader("ffcv", converted / "train.beton", batch_size=4, device="cpu", num_workers=512)
    assert loader.workers == os.cpu_count()
    assert "capped" in loader.describe()["note"]


def test_kept_batches_are_not_overwritten_and_threads_are_left_alone(converted):
    threads = torch.get_num_threads()
    loader = build_loader(
        "ffcv", converted / "val.beton", batch_size=2, train=False, image_size=32, device="cpu", num_workers=1
    )
    kept = list(loader)  # FFCV reuses its buffers; the contract hands out new tensors
    again = [(x.clone(), y.clone()) for x, y in loader]
    assert len(kept) == len(again) == len(loader) == 5
    for (x1, y1), (x2, y2) in zip(kept, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.get_num_threads() == threads  # FFCV would set it to num_workers
    assert loader.describe()["first_batch_seconds"] > 0


def test_bench_run_records_storage_and_warm_up(small_data, tmp_path):
    out = bench(
        "run",
        "--loader",
        "ffcv",
        "--data",
        str(small_data),
        "--steps",
        "10",
        "--warmup-steps",
        "3",
        "--batch-size",
        "16",
        "--image-size",
        "64",
        "-o",
        "max_resolution=128",
        "-o",
        "num_workers=2",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "r").glob("*.json")
    res = json.loads(path.read_text())
    assert res["data"]["storage"]["backend_storage"]["max_resolution"] == 128
    assert res["loader"]["first_batch_seconds"] > 0
    assert res["metrics"]["measured_images"] == 7 * 16


def test_quasi_random_on_one_rank_covers_every_sample(converted, probe):
    from .conftest import decode_ids

    loader = build_loader(
        "ffcv",
        converted / "train.beton",
        batch_size=4,
        image_size=16,
        device="cpu",
        order="quasi_random",
        num_workers=1,
    )
    ids = [i for x, _ in loader for i in decode_ids(x)]
    assert sorted(ids) == sorted(probe["train"])


def test_a_failing_pipeline_thread_raises_instead_of_hanging(small_data, tmp_cache, monkeypatch):
    """FFCV runs its pipeline in a thread; an exception there used to leave the consumer waiting on
    the output queue forever (seen on a GPU: a one-sample batch broke ToDevice)."""
    loader = build_loader(
        "ffcv", small_data / "val", batch_size=8, train=False, image_size=32, device="cpu", num_workers=1
    )
    from ffcv.loader.epoch_iterator import EpochIterator

    real = EpochIterator.run_pipeline

    def fail_on_third(self, b_ix, *args):
        if b_ix == 2:
            raise IndexError("planted")
        return real(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", fail_on_third)
    seen = 0
    start = time.monotonic()
    with pytest.raises(LoaderError, match=r"ffcv failed reading .*val\.beton: IndexError: planted"):
        for _ in loader:
            seen += 1
    assert seen == 2 and time.monotonic() - start < 60
    loader.close()


def test_evaluation_under_inference_mode(small_data, tmp_cache):
    """The trainer evaluates under torch.inference_mode; FFCV's buffers must still be writable by
    its pipeline thread (on CUDA they are torch tensors allocated when iteration starts)."""
    loader = build_loader(
        "ffcv", small_data / "val", batch_size=8, train=False, image_size=32, device="cpu", num_workers=1
    )
    with torch.inference_mode():
        n = sum(y.numel() for _, y in loader)
    assert n == loader.num_samples
    loader.close()


def test_an_epoch_cut_short_stops_its_pipeline_thread(converted):
    """Leaving an epoch early (--steps, early stopping) ends FFCV's pipeline thread before the
    caller goes on: it would otherwise keep decoding batches no one reads, beside the caller's
    work, and a daemon thread still inside numba when the process exits can abort it."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    loader = build_loader(
        "ffcv", converted / "train.beton", batch_size=4, device="cpu", num_workers=1, batches_ahead=3
    )
    it = iter(loader)
    next(it)
    (thread,) = [t for t in threading.enumerate() if isinstance(t, EpochIterator)]
    it.close()  # what dropping the iterator does
    assert not thread.is_alive()
    assert len(list(loader)) == len(loader)  # the next epoch is whole
