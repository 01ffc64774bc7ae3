"""The drop-in promise: a training script written for torch's DataLoader (the way pytorch/examples'
imagenet/main.py reads its loaders: ``sampler.set_epoch``, ``len(sampler)``, ``dataset``, ``batch_size``,
the evaluation of the tail a DistributedSampler leaves out) runs unmodified on every backend, with
only the loader's construction changed, on 1 and 2 ranks; and without set_epoch each iteration is
the next epoch, as a DataLoader with shuffle=True reshuffles."""

from __future__ import annotations

import collections
import json

import pytest
import torch
import torch.distributed as dist

from loaders import build_loader

from .conftest import available_backends, decode_ids, run_ranks

NAMES = available_backends(reads_data=True)


# --- the script: DataLoader-style code, written once for this test, never edited per backend -----
def train_and_validate(train_loader, val_loader, epochs, distributed, world_size):
    seen = []  # sample ids per epoch (the probe images encode them in their colour)
    for epoch in range(epochs):
        if distributed:
            train_loader.sampler.set_epoch(epoch)
        ids, batches = [], 0
        for images, target in train_loader:
            assert images.shape[0] <= train_loader.batch_size and target.dtype == torch.int64
            ids += decode_ids(images)
            batches += 1
        assert batches == len(train_loader)
        seen.append(ids)
    val = []
    for images, target in val_loader:
        assert len(target) == len(images)
        val += decode_ids(images)
    if distributed and len(val_loader.sampler) * world_size < len(val_loader.dataset):
        tail = torch.utils.data.Subset(
            val_loader.dataset, range(len(val_loader.sampler) * world_size, len(val_loader.dataset))
        )
        for images, target in torch.utils.data.DataLoader(tail, batch_size=val_loader.batch_size):
            assert len(target) == len(images)
            val += decode_ids(images)
    return seen, val


def loaders(name, root, workers):
    """The only lines a script changes: DataLoader(ImageFolder(...)) -> build_loader(name, ...)."""
    train = build_loader(
        name, root / "train", batch_size=4, train=True, num_workers=workers, image_size=16, device="cpu"
    )
    val = build_loader(
        name, root / "val", batch_size=4, train=False, num_workers=workers, image_size=16, device="cpu"
    )
    return train, val


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", NAMES)
def test_a_dataloader_script_runs_unmodified_in_one_process(name, workers, probe):
    train, val = loaders(name, probe["root"], workers)
    seen, val_ids = train_and_validate(train, val, epochs=3, distributed=False, world_size=1)
    for ids in seen:
        assert sorted(ids) == sorted(probe["train"])
    assert len({tuple(ids) for ids in seen}) == 3, "no set_epoch: each iteration must be the next epoch"
    assert sorted(val_ids) == sorted(probe["val"])
    assert len(train.dataset) == len(probe["train"]) and train.dataset.classes == ["ant", "bee", "cat"]
    train.close(), val.close()


def _rank(rank, world, port, name, root, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train, val = loaders(name, root, 0)
        seen, val_ids = train_and_validate(train, val, epochs=2, distributed=True, world_size=world)
        (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "val": val_ids}))
        train.close(), val.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", NAMES)
def test_a_dataloader_script_runs_unmodified_on_two_ranks(name, probe, tmp_path):
    run_ranks(_rank, 2, name, probe["root"], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        seen = collections.Counter(i for r in ranks for i in r["seen"][epoch])
        assert set(seen) == set(probe["train"]) and sum(seen.values()) == len(probe["train"]) + 1  # 1 padded
    val = collections.Counter(i for r in ranks for i in r["val"])
    assert sorted(val) == sorted(probe["val"]), "evaluation: every sample exactly once"


@pytest.mark.parametrize("name", [n for n in NAMES if n in ("torch", "spdl", "dali")])
def test_set_epoch_wins_and_the_sampler_lists_the_epoch(name, probe):
    loader = build_loader(
        name, probe["root"] / "train", batch_size=4, image_size=16, device="cpu", num_workers=0
    )
    loader.set_epoch(5)
    first = [i for x, _ in loader for i in decode_ids(x)]
    loader.set_epoch(5)
    again = [i for x, _ in loader for i in decode_ids(x)]
    assert first == again
    order = list(loader.sampler)
    labels = {i: probe["train"][i] for i in probe["train"]}
    assert len(order) == len(loader.sampler) == len(probe["train"]) and [labels[i] for i in first]
    loader.close()


def test_num_workers_is_every_backends_name_for_parallelism(probe):
    from loaders import LoaderError, get_backend

    for name in NAMES:
        backend = get_backend(name)
        knob = backend.knobs.get("workers")
        opts = backend.options(num_workers=0)
        assert getattr(opts, knob) == backend.min_workers
        assert getattr(backend.options(num_workers=3), knob) == 3
        if knob != "num_workers":
            with pytest.raises(LoaderError, match=f"num_workers or {knob}"):
                backend.options(num_workers=2, **{knob: 2})


@pytest.mark.parametrize("n,world", [(21, 1), (21, 2), (22, 4), (5, 3)])
def test_the_epoch_order_is_distributed_samplers(n, world):
    """Scripts that compare or mix our loaders with a DataLoader + DistributedSampler see the same
    indices per rank and epoch (DistributedSampler's permutation, padding and stride)."""
    from torch.utils.data import DistributedSampler

    from loaders.contract import shard_indices

    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 3):
            sampler.set_epoch(epoch)
            ours = shard_indices(n, rank, world, shuffle=True, seed=7, epoch=epoch, pad=True)
            assert ours.tolist() == list(sampler)
