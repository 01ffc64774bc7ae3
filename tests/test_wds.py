"""The wds backend beyond the conformance test: the shard writer (balanced, original bytes, labels
for webdataset and DALI, manifest, atomic), the epoch plan (equal batches on every rank, exact
coverage), damaged or missing shards, too few shards, bad samples inside a shard, `bench run`."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile

import numpy as np
import pytest

from loaders import LoaderError, build_loader
from loaders.contract import BadSampleError, num_batches, shard_sizes

from .conftest import available_backends, bench, copy_tree, decode_ids

pytestmark = pytest.mark.skipif("wds" not in available_backends(), reason="webdataset not installed")


@pytest.fixture(scope="module")
def shards(probe, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds") / "probe"
    res = bench(
        "data",
        "convert",
        "--to",
        "wds",
        "--data",
        str(probe["root"]),
        "--out",
        str(out),
        "--shard-samples",
        "4",
        cwd=out.parent,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "6 shards of 3-4 samples" in res.stdout
    return out


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_are_balanced_and_keep_the_original_bytes(shards, probe):
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        root = probe["root"] / split
        labels = {p: y for p, y in ImageFolder(str(root)).samples}
        m = json.loads((shards / split / "manifest.json").read_text())
        counts = [s["samples"] for s in m["shards"]]
        assert sum(counts) == m["samples"] == len(probe[split]) and max(counts) - min(counts) <= 1
        assert m["classes"] == ["ant", "bee", "cat"] and m["storage"]["reencoded"] == 0
        seen = []
        for s in m["shards"]:
            tar = shards / split / s["file"]
            assert tar.stat().st_size == s["bytes"]
            files = members(tar)
            keys = sorted({name.split(".")[0] for name in files})
            assert len(keys) == s["samples"]
            for key in keys:
                source = root / files[f"{key}.path"].decode()
                assert files[f"{key}.jpg"] == source.read_bytes()  # not re-encoded
                assert int(files[f"{key}.cls"]) == labels[str(source)]  # webdataset's text label
                assert np.frombuffer(files[f"{key}.lbl"], dtype="<i8")[0] == labels[str(source)]  # DALI's
                seen.append(str(source))
            if m["dali_index"]:
                assert tar.with_suffix(".idx").is_file()
        assert sorted(seen) == sorted(labels)
    assert not list(shards.glob(".*")) and not list((shards / "train").glob(".*"))


def test_shards_mix_classes(shards):
    """Samples are written in a seeded random order, so a shard is not one class."""
    m = json.loads((shards / "train" / "manifest.json").read_text())
    per_shard = [
        {int(v) for k, v in members(shards / "train" / s["file"]).items() if k.endswith(".cls")}
        for s in m["shards"]
    ]
    assert sum(len(c) > 1 for c in per_shard) >= len(per_shard) // 2


@pytest.mark.parametrize(
    "n,world,batch,workers,drop_last",
    [
        (21, 2, 3, 2, False),
        (21, 3, 4, 3, True),
        (100, 4, 7, 2, False),
        (9, 2, 4, 1, False),
        (1000, 8, 32, 5, True),
        (33, 5, 1, 4, False),
    ],
)
def test_plan_gives_every_rank_the_same_batches_and_covers_each_sample_once(
    n, world, batch, workers, drop_last
):
    from loaders.wds import plan, rank_range, worker_range

    rng = np.random.default_rng(n)
    counts = [int(c) for c in rng.integers(1, 9, size=max(world * workers, 7))]
    counts[-1] += n - sum(counts) if sum(counts) < n else 0
    n = sum(counts)
    order = rng.permutation(len(counts)).tolist()
    for train in (True, False):
        per_rank_batches, seen = [], []
        for rank in range(world):
            start, stop = rank_range(n, rank, world, train)
            batches = 0
            for w in range(workers):
                a, b = worker_range(start, stop, batch, drop_last, w, workers)
                if w < workers - 1:
                    assert (b - a) % batch == 0, "only a rank's last worker may have a partial batch"
                batches += math.ceil((b - a) / batch)
                for shard, skip, take in plan(counts, order, a, b) if b > a else []:
                    assert 0 <= skip and skip + take <= counts[shard]
                    seen += [(shard, skip + k) for k in range(take)]
            assert batches == num_batches(stop - start, batch, drop_last)
            per_rank_batches.append(batches)
        if train:
            assert len(set(per_rank_batches)) == 1, "unequal batch counts hang DDP"
        if not drop_last:
            every = {(s, k) for s in range(len(counts)) for k in range(counts[s])}
            assert set(seen) == every
            padding = shard_sizes(n, world, pad=True)[1] if train else 0
            assert len(seen) == n + padding


def test_missing_truncated_or_unfinished_shards_are_refused(shards, tmp_path):
    with pytest.raises(LoaderError, match="wds shard folder not found"):
        build_loader("wds", tmp_path / "nope", batch_size=4, device="cpu")
    data = copy_tree(shards, tmp_path / "c")
    shard = data / "train" / "shard-000002.tar"
    with open(shard, "r+b") as f:  # as by a full disk or an interrupted copy
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(
        LoaderError, match=r"shard .*shard-000002.tar is truncated: \d+ bytes, its manifest says"
    ):
        build_loader("wds", data / "train", batch_size=4, device="cpu")
    (data / "val" / "shard-000001.tar").unlink()
    with pytest.raises(LoaderError, match=r"shard-000001.tar is missing"):
        build_loader("wds", data / "val", batch_size=4, device="cpu")
    (data / "val" / "manifest.json").unlink()
    with pytest.raises(LoaderError, match="has no manifest manifest.json"):
        build_loader("wds", data / "val", batch_size=4, device="cpu")


def flip_bytes_inside_first_jpeg(shard):
    """Same size, tar headers intact: 16 bytes flipped in the middle of the first image's JPEG data."""
    raw = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    middle = jpg.offset_data + jpg.size // 2
    for k in range(middle, middle + 16):
        raw[k] ^= 0xFF
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("backend, opts", [("wds", {}), ("dali", {"reader": "wds", "num_threads": 1})])
def test_a_shard_damaged_inside_at_the_same_size_is_refused(backend, opts, shards, tmp_path):
    """Such a JPEG still decodes, to wrong pixels, without a word: only the checksum each shard's
    manifest entry records at conversion catches it (wds, and DALI reading the same shards)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    data = copy_tree(shards, tmp_path / "c") / "train"
    build_loader(backend, data, batch_size=4, device="cpu", **opts).close()  # intact: accepted
    flip_bytes_inside_first_jpeg(data / "shard-000002.tar")
    with pytest.raises(
        LoaderError,
        match=r"shard .*shard-000002.tar is damaged: its content differs from the "
        r"checksum recorded when it was converted",
    ):
        build_loader(backend, data, batch_size=4, device="cpu", **opts)
    m = json.loads((data / "manifest.json").read_text())
    for entry in m["shards"]:
        del entry["sha1"]  # as a manifest without checksums: the size checks alone pass it
    (data / "manifest.json").write_text(json.dumps(m))
    loader = build_loader(backend, data, batch_size=4, device="cpu", image_size=16, **opts)
    assert sum(len(y) for _, y in loader) == m["samples"]  # the damage is silent without the checksum
    loader.close()


def test_a_damaged_cached_conversion_is_converted_again(probe, tmp_cache):
    from loaders.wds import read_manifest

    build_loader(
        "wds", probe["root"] / "train", batch_size=4, device="cpu"
    ).close()  # converts into the cache
    (folder,) = [m.parent for m in tmp_cache.rglob("manifest.json")]
    flip_bytes_inside_first_jpeg(sorted(folder.glob("*.tar"))[0])
    with pytest.raises(LoaderError, match="is damaged"):
        read_manifest(folder)
    loader = build_loader("wds", probe["root"] / "train", batch_size=4, device="cpu", image_size=16)
    assert sorted(i for images, _ in loader for i in decode_ids(images)) == sorted(probe["train"])
    read_manifest(folder)  # whole again


def test_a_shard_damaged_inside_fails_naming_it(shards, tmp_path):
    """Damage the checks at build cannot see (the manifest updated to match, no checksum, as from a
    foreign or hand-edited manifest): the read names the shard."""
    data = copy_tree(shards, tmp_path / "c")
    shard = data / "train" / "shard-000003.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:700])  # inside the first member's data
    m = json.loads((data / "train" / "manifest.json").read_text())
    m["shards"][3]["bytes"] = 700
    del m["shards"][3]["sha1"]
    (data / "train" / "manifest.json").write_text(json.dumps(m))
    for workers in (0, 2):
        loader = build_loader(
            "wds", data / "train", batch_size=4, device="cpu", image_size=16, num_workers=workers
        )
        with pytest.raises(LoaderError, match=r"shard .*shard-000003.tar"):
            list(loader)
    out = bench(
        "run",
        "--loader",
        "wds",
        "--data",
        str(data),
        "--steps",
        "6",
        "--warmup-steps",
        "1",
        "--batch-size",
        "4",
        "--image-size",
        "16",
        "--workers",
        "2",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr and "shard-000003.tar" in last, out.stderr[
        -2000:
    ]
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))


def test_too_few_shards_for_ranks_times_workers_is_an_error_at_build(shards):
    with pytest.raises(LoaderError, match=r"6 shards, fewer than ranks x workers = 2 x 4"):
        build_loader("wds", shards / "train", batch_size=4, device="cpu", rank=0, world_size=2, num_workers=4)
    build_loader("wds", shards / "train", batch_size=4, device="cpu", rank=0, world_size=2, num_workers=3)


def test_interrupted_conversion_leaves_nothing(probe, tmp_path, monkeypatch):
    import webdataset

    from loaders.wds import convert_shards

    calls = itertools.count()
    real = webdataset.TarWriter.write

    def interrupted(self, sample):
        if next(calls) == 10:
            raise KeyboardInterrupt
        return real(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_shards(probe["root"] / "train", tmp_path / "out" / "train", progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # no shard folder, no temporary
    monkeypatch.undo()
    convert_shards(
        probe["root"] / "train", tmp_path / "out" / "train", progress=False
    )  # a re-run starts clean
    with pytest.raises(LoaderError, match="exists"):
        convert_shards(probe["root"] / "train", tmp_path / "out" / "train", progress=False)


def test_a_file_that_is_not_an_image_stops_the_conversion_naming_it(probe, tmp_path):
    data = copy_tree(probe["root"], tmp_path / "d")
    bad = data / "train" / "bee" / "zz_notes.jpg"
    bad.write_text("not an image")
    out = bench(
        "data", "convert", "--to", "wds", "--data", str(data), "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert out.returncode == 2 and str(bad) in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert not (tmp_path / "o" / "train").exists() and not list((tmp_path / "o").glob(".*"))


@pytest.fixture(scope="module")
def damaged_shards(probe, tmp_path_factory):
    """Shards holding one truncated JPEG (a valid header: conversion keeps its bytes as they are)."""
    from PIL import Image

    base = tmp_path_factory.mktemp("wds-bad")
    data = copy_tree(probe["root"], base / "d")
    victim = data / "train" / "bee" / "img_009.jpg"
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "JPEG", quality=90)
    victim.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    from loaders.wds import Sharding, convert_shards

    convert_shards(data / "train", base / "s" / "train", Sharding(shard_samples=3), progress=False)
    return base / "s" / "train", victim


def test_bad_sample_in_a_shard_stops_naming_shard_and_file(damaged_shards):
    folder, victim = damaged_shards
    loader = build_loader("wds", folder, batch_size=4, device="cpu", image_size=16, num_workers=2)
    with pytest.raises(BadSampleError, match=r"shard-\d+\.tar sample \d+ \(bee/img_009.jpg\)"):
        list(loader)


def test_bad_sample_in_a_shard_is_skipped_and_counted(damaged_shards, probe):
    folder, _ = damaged_shards
    # batch 7: 21 samples in 3 full batches, so the bad sample never fills a batch on its own
    loader = build_loader(
        "wds", folder, batch_size=7, device="cpu", image_size=16, num_workers=2, on_bad_sample="skip"
    )
    ids, batches = [], 0
    for images, _ in loader:
        ids += decode_ids(images)
        batches += 1
    assert batches == len(loader)  # a skip shrinks a batch, never the number of batches
    assert len(loader.skipped) == 1 and "bee/img_009.jpg" in loader.skipped[0]
    good = [i for i in probe["train"] if i != 9]  # the probe's sample 9 is bee/img_009.jpg
    assert sorted(ids) == sorted(good)


def test_bench_run_reads_converted_shards_and_records_them(shards, tmp_path):
    out = bench(
        "run",
        "--loader",
        "wds",
        "--data",
        str(shards),
        "--epochs",
        "1",
        "--warmup-steps",
        "1",
        "--batch-size",
        "4",
        "--image-size",
        "16",
        "--workers",
        "2",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = (tmp_path / "r").glob("*.json")
    res = json.loads(path.read_text())
    assert res["loader"]["backend"] == "wds" and res["loader"]["shards"] == 6
    assert res["data"]["storage"]["backend_storage"]["reencoded"] == 0
    torch_out = bench(
        "run", "--loader", "torch", "--data", str(shards), "--steps", "4", "--warmup-steps", "1", cwd=tmp_path
    )
    assert torch_out.returncode == 2 and "webdataset shards" in torch_out.stderr


@pytest.mark.skipif("dali" not in available_backends(), reason="dali not installed")
def test_dali_reads_the_same_shards(shards, probe, tmp_path):
    loader = build_loader(
        "dali", shards / "train", batch_size=4, device="cpu", image_size=16, reader="wds", num_threads=2
    )
    ids = [i for images, _ in loader for i in decode_ids(images)]
    assert sorted(ids) == sorted(probe["train"])
    with pytest.raises(LoaderError, match="cannot skip bad samples"):
        build_loader("dali", shards / "train", batch_size=4, device="cpu", reader="wds", on_bad_sample="skip")
    out = bench(
        "run",
        "--loader",
        "dali",
        "-o",
        "reader=wds",
        "-o",
        "num_threads=2",
        "--data",
        str(shards),
        "--epochs",
        "1",
        "--warmup-steps",
        "1",
        "--batch-size",
        "4",
        "--image-size",
        "16",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = (tmp_path / "r").glob("*.json")
    assert json.loads(path.read_text())["loader"]["shards"] == 6
