"""The contract, proven for every installed backend: shapes, dtypes, device, normalisation,
class mapping identical to torchvision's ImageFolder, exact-once coverage on 1 and 2 ranks,
determinism for a seed. New backends are picked up from the registry."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch
import torch.distributed as dist
from torchvision.datasets import ImageFolder

from loaders import build_loader
from loaders.contract import MEAN, STD

from .conftest import available_backends, decode_ids, run_ranks

# Option sets each backend is checked under (every knob combination that changes the data path).
VARIANTS = {
    "torch": [dict(num_workers=0), dict(num_workers=2, device_normalize=True)],
    "dali": [dict(num_threads=2), dict(num_threads=2, reader="wds")],
    "ffcv": [dict(num_workers=2)],
    "wds": [dict(num_workers=0), dict(num_workers=2, device_normalize=True)],
    "spdl": [dict(num_threads=2), dict(num_threads=1, device_normalize=True, decode="ffmpeg")],
    "ray": [dict(ray_cpus=2)],
    "litdata": [dict(num_workers=2, order="chunks")],  # mosaic reads the default order
    "mosaic": [dict(num_workers=2)],
}
CASES = [
    pytest.param(name, opts, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}")
    for name in available_backends(reads_data=True)
    for opts in VARIANTS.get(name, [{}])
]
ALL = available_backends()
# Exact-once under load (two ranks, three epochs): also persistent workers prefetching deep, where
# an epoch's order must still come from set_epoch and not from the workers' copies.
LOADED = CASES + (
    [
        pytest.param(
            "torch",
            dict(num_workers=2, persistent_workers=True, prefetch_factor=4),
            id="torch-persistent-prefetch4",
        )
    ]
    if "torch" in ALL
    else []
)
EPOCHS_TWO_RANKS = 3


def collect(loader, epoch=0):
    loader.set_epoch(epoch)
    ids, labels, batches = [], [], 0
    for images, y in loader:
        ids += decode_ids(images)
        labels += y.tolist()
        batches += 1
    return ids, labels, batches


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_shapes_dtypes_device(name, train, probe, small_data):
    data = (small_data if name != "synthetic" else small_data) / ("train" if train else "val")
    loader = build_loader(name, data, batch_size=8, train=train, image_size=32, device="cpu")
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert images.device.type == "cpu" and labels.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert labels.min() >= 0 and labels.max() < len(loader.classes)
    # Normalised: roughly zero-centred, unit-scale values, not 0..1 or 0..255.
    assert -1.0 < images.float().mean() < 1.0 and 0.2 < images.float().std() < 3.0
    loader.close()


@pytest.mark.parametrize("name", ALL)
def test_low_precision_and_channels_last(name, small_data):
    loader = build_loader(
        name,
        small_data / "train",
        batch_size=4,
        image_size=32,
        device="cpu",
        dtype="bf16",
        channels_last=True,
    )
    images, _ = next(iter(loader))
    assert images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert not images.is_contiguous()  # really NHWC in memory, not an NCHW tensor that also qualifies


@pytest.mark.parametrize("name,opts", CASES)
def test_normalisation_values_and_class_mapping(name, opts, probe):
    """Each pixel of a flat probe image must equal (colour/255 - MEAN) / STD, and each label must
    be torchvision ImageFolder's label for that file."""
    reference = ImageFolder(str(probe["root"] / "val"))
    loader = build_loader(
        name, probe["root"] / "val", batch_size=4, train=False, image_size=24, device="cpu", **opts
    )
    assert list(loader.classes) == reference.classes
    by_id = {}
    for path, label in reference.samples:
        by_id[int(path.rsplit("_", 1)[1].split(".")[0])] = label
    for images, labels in loader:
        for img, label, sid in zip(images, labels, decode_ids(images)):
            assert by_id[sid] == label.item()
            # flat: every pixel of a channel equals that channel's mean (JPEG ringing aside)
            assert (img - img.mean(dim=(1, 2), keepdim=True)).abs().max() < 0.1
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    images, _ = next(iter(loader))
    rgb = images.mean(dim=(2, 3)) * std + mean
    assert 0.0 <= rgb.min() and rgb.max() <= 1.0


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_exact_once_one_rank(name, opts, train, probe):
    split = "train" if train else "val"
    loader = build_loader(
        name, probe["root"] / split, batch_size=4, train=train, image_size=16, device="cpu", **opts
    )
    orders = []
    for epoch in range(2):
        ids, labels, batches = collect(loader, epoch)
        assert sorted(ids) == sorted(probe[split]), f"epoch {epoch}: not every sample exactly once"
        assert labels == [probe[split][i] for i in ids]
        assert batches == len(loader)
        orders.append(ids)
    assert loader.padding == 0
    if train:
        assert orders[0] != orders[1], "set_epoch did not reshuffle"
    else:
        assert orders[0] == orders[1], "evaluation order must not change between epochs"
    loader.close()


def _rank_worker(rank, world, port, name, opts, root, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        record = {}
        for split, train in (("train", True), ("val", False)):
            loader = build_loader(
                name, root / split, batch_size=3, train=train, image_size=16, device="cpu", **opts
            )
            record[split] = {"len": len(loader), "padding": loader.padding, "epochs": []}
            for epoch in range(EPOCHS_TWO_RANKS):
                ids, _, batches = collect(loader, epoch)
                record[split]["epochs"].append({"ids": ids, "batches": batches})
            loader.close()
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,opts", LOADED)
def test_exact_once_two_ranks(name, opts, probe, tmp_path):
    """Two gloo processes: the ranks' samples together cover each split exactly once per epoch,
    plus exactly the padding the loader states (training keeps ranks' step counts equal)."""
    run_ranks(_rank_worker, 2, name, opts, probe["root"], tmp_path)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for split in ("train", "val"):
        ranks = [rec[split] for rec in records]
        n = len(probe[split])
        if split == "train":  # reshuffled every epoch, on both ranks alike
            assert len({tuple(r["epochs"][e]["ids"]) for r in ranks[:1] for e in range(EPOCHS_TWO_RANKS)}) > 1
        for epoch in range(EPOCHS_TWO_RANKS):
            seen = collections.Counter(i for r in ranks for i in r["epochs"][epoch]["ids"])
            assert set(seen) == set(probe[split]), f"{split} epoch {epoch}: samples missing"
            extra = sum(seen.values()) - n
            assert extra == ranks[0]["padding"], (
                f"{split} epoch {epoch}: {extra} repeats, {ranks[0]['padding']} stated"
            )
            for r in ranks:
                assert r["epochs"][epoch]["batches"] == r["len"]
        if split == "train":
            assert ranks[0]["padding"] == math.ceil(n / 2) * 2 - n == 1
            assert ranks[0]["len"] == ranks[1]["len"], "unequal step counts would hang DDP"
        else:
            assert ranks[0]["padding"] == 0


@pytest.mark.parametrize("name,opts", CASES)
def test_same_seed_same_batches(name, opts, small_data):
    """Same seed: same order and same augmentations; another seed: different ones."""

    def first_batches(seed, **extra):
        loader = build_loader(
            name,
            small_data / "train",
            batch_size=8,
            image_size=32,
            device="cpu",
            seed=seed,
            **{**opts, **extra},
        )
        loader.set_epoch(1)
        it = iter(loader)
        out = [next(it) for _ in range(2)]
        loader.close()
        return out

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    seeded = build_loader(name, small_data / "train", batch_size=8, device="cpu", **opts).seeded_augmentation
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)  # the order always follows the seed
        if seeded:
            assert torch.equal(xa, xb)
    assert not torch.equal(a[0][1], c[0][1]) and not torch.equal(a[0][0], c[0][0])


@pytest.mark.parametrize("name,opts", CASES)
def test_eval_batches_are_identical_for_a_seed(name, opts, small_data):
    """Evaluation has no randomness at all, in every backend."""

    def first(seed):
        loader = build_loader(
            name,
            small_data / "val",
            batch_size=8,
            train=False,
            image_size=32,
            device="cpu",
            seed=seed,
            **opts,
        )
        x, y = next(iter(loader))
        loader.close()
        return x.clone(), y.clone()

    (x0, y0), (x1, y1) = first(0), first(1)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_torch_augmentation_independent_of_worker_count(small_data):
    """Augmentation is seeded per (seed, epoch, sample), so adding workers changes speed only."""

    def batch(workers):
        loader = build_loader(
            "torch", small_data / "train", batch_size=8, image_size=32, device="cpu", num_workers=workers
        )
        images, labels = next(iter(loader))
        loader.close()
        return images, labels

    (x0, y0), (x2, y2) = batch(0), batch(2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_torch_knobs_change_only_speed(small_data):
    """Float normalisation in the workers and uint8 + normalisation on the device agree."""

    def batch(**opts):
        loader = build_loader(
            "torch", small_data / "val", batch_size=8, train=False, image_size=32, device="cpu", **opts
        )
        return next(iter(loader))[0]

    assert torch.allclose(batch(), batch(device_normalize=True), atol=1e-5)
    assert torch.allclose(
        batch(), batch(num_workers=1, persistent_workers=True, prefetch_factor=4, pin_memory=True), atol=1e-6
    )


def test_synthetic_sizes_follow_the_data(small_data):
    loader = build_loader(
        "synthetic", small_data / "train", batch_size=7, image_size=16, device="cpu", rank=1, world_size=3
    )
    n = 4 * 40
    assert loader.num_samples == math.ceil(n / 3) and loader.padding == math.ceil(n / 3) * 3 - n
    assert len(loader) == math.ceil(loader.num_samples / 7) == sum(1 for _ in loader)
    assert sum(x.shape[0] for x, _ in loader) == loader.num_samples
    assert len(loader.classes) == 4
