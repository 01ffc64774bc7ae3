"""Loader state (``state_dict`` / ``load_state_dict``) on every backend: an epoch interrupted after
0, 1, a middle and its last batch, restored into a new loader (and, for each backend, in a new
process), continues with exactly the batches the uninterrupted run had left; elastic restores
(ranks 2 -> 1, 1 -> 2, workers 2 -> 1) read every sample of the epoch once; what cannot hold is
refused before the first batch, naming what differs.

The probe set's images are flat colours, so a batch's pixels name its samples (``decode_ids``)
whatever the crop: that is how the order is compared, on FFCV too, whose crops are not seeded."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest
import torch

from loaders import build_loader
from loaders.contract import STATE_VERSION, StateError

from .conftest import REPO, available_backends, decode_ids

INSTALLED = set(available_backends())
# (backend, options): every backend, and DALI's webdataset reader beside its file reader
CASES = [
    (name, opts)
    for name, opts in [
        ("torch", {}),
        ("dali", {}),
        ("dali", {"reader": "wds"}),
        ("ffcv", {}),
        ("wds", {}),
        ("spdl", {}),
        ("ray", {}),
        ("litdata", {}),
        ("mosaic", {"order": "chunks"}),
        ("toy", {}),
        ("synthetic", {}),
    ]
    if name in INSTALLED
]
IDS = [n + ("-" + "-".join(f"{k}={v}" for k, v in o.items()) if o else "") for n, o in CASES]
# index-order readers
ELASTIC = [(n, o) for n, o in CASES if n not in ("wds", "synthetic") and o.get("reader") != "wds"]


def build(probe, name, opts, split="train", **kw):
    kw = {
        "batch_size": 4,
        "image_size": 32,
        "seed": 3,
        "device": "cpu",
        "train": split == "train",
        **opts,
        **kw,
    }
    return build_loader(name, probe["root"] / split, **kw)


def read(loader, name, limit=None):
    """(labels, sample ids) of each batch, up to ``limit`` batches."""
    out = []
    for images, labels in loader:
        out.append((labels.tolist(), None if name == "synthetic" else decode_ids(images)))
        if limit is not None and len(out) == limit:
            break
    return out


def with_states(loader, name, epoch):
    """The epoch's batches, and the loader's state before and after each of them."""
    loader.set_epoch(epoch)
    batches, states = [], [loader.state_dict()]
    for images, labels in loader:
        batches.append((labels.tolist(), None if name == "synthetic" else decode_ids(images)))
        states.append(json.loads(json.dumps(loader.state_dict())))  # what a checkpoint file holds
    return batches, states


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_interrupted_epoch_continues_where_it_stopped(probe, name, opts, workers):
    if name == "synthetic" and workers:
        pytest.skip("synthetic has no workers")
    with build(probe, name, opts, num_workers=workers) as first:
        batches, states = with_states(first, name, epoch=1)
        after = first.state_dict()
    assert len(batches) == len(first) == 6  # 21 samples, batch 4
    assert after["complete"] and after["epoch"] == 1
    with build(probe, name, opts, num_workers=workers) as again:
        for cut in (0, 1, 3, 6):
            again.load_state_dict(states[cut])
            if cut == 3:
                again.set_epoch(
                    1
                )  # what a training loop does before iterating: the same epoch keeps the state
            rest = read(again, name)
            assert rest == batches[cut:], f"resumed after {cut} batches"
        # a state taken after the epoch ended continues with the next epoch, in its usual order
        again.load_state_dict(after)
        nxt = read(again, name)
    with build(probe, name, opts, num_workers=workers) as fresh:
        fresh.set_epoch(2)
        assert nxt == read(fresh, name)


def test_state_is_small_and_says_where_the_epoch_is(probe):
    with build(probe, "torch", {}) as loader:
        loader.set_epoch(4)
        it = iter(loader)
        next(it), next(it)
        state = loader.state_dict()
    assert state["version"] == STATE_VERSION and state["epoch"] == 4
    assert state["samples_seen"] == 8 and not state["complete"]
    assert len(json.dumps(state)) < 600  # a few numbers, no index list


@pytest.mark.parametrize(
    "name,opts", [c for c in CASES if c[0] not in ("synthetic", "toy")], ids=lambda c: str(c)
)
def test_restored_in_a_new_process(probe, name, opts):
    with build(probe, name, opts) as first:
        batches, states = with_states(first, name, epoch=0)
    script = (
        "import json, sys\n"
        "from loaders import build_loader\n"
        "from tests.conftest import decode_ids\n"
        "root, name, opts, state = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])\n"
        "loader = build_loader(name, root, batch_size=4, image_size=32, seed=3, device='cpu', train=True, **opts)\n"
        "loader.load_state_dict(state)\n"
        "print(json.dumps([[l.tolist(), decode_ids(i)] for i, l in loader]))\n"
    )
    args = [str(probe["root"] / "train"), name, json.dumps(opts), json.dumps(states[2])]
    out = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rest = [tuple(b) for b in json.loads(out.stdout.strip().splitlines()[-1])]
    assert rest == batches[2:]


def all_ids(batches):
    return [i for _, ids in batches for i in ids]


@pytest.mark.parametrize("name,opts", ELASTIC, ids=[IDS[CASES.index(c)] for c in ELASTIC])
def test_elastic_restores_read_every_sample_once(probe, name, opts):
    everyone = set(probe["train"])
    # 2 ranks -> 1: two steps on each rank, then one rank reads the rest
    two = [build(probe, name, opts, rank=r, world_size=2) for r in (0, 1)]
    for loader in two:
        loader.set_epoch(2)
    seen = [i for loader in two for i in all_ids(read(loader, name, limit=2))]
    state = two[0].state_dict()
    for loader in two:
        loader.close()
    with build(probe, name, opts) as one:
        one.load_state_dict(state)
        rest = all_ids(read(one, name))
    counts = collections.Counter(seen + rest)
    assert set(counts) == everyone and set(counts.values()) == {1}
    # 1 -> 2: two steps on one rank, the rest over two ranks (one padded repeat: 13 left for 2 ranks)
    with build(probe, name, opts, num_workers=2) as one:
        one.set_epoch(2)
        seen = all_ids(read(one, name, limit=2))
        state = one.state_dict()
    rest = []
    for r in (0, 1):
        with build(probe, name, opts, rank=r, world_size=2) as loader:
            loader.load_state_dict(state)
            rest.append(all_ids(read(loader, name)))
    assert len(rest[0]) == len(rest[1]) == 7  # the ranks take the same number of steps
    counts = collections.Counter(seen + rest[0] + rest[1])
    assert set(counts) == everyone and sum(counts.values()) == len(everyone) + 1
    # workers 2 -> 1 (another backend's parallelism): the uninterrupted order, exactly
    with build(probe, name, opts, num_workers=2) as loader:
        batches, states = with_states(loader, name, epoch=2)
    with build(probe, name, opts, num_workers=1) as loader:
        loader.load_state_dict(states[2])
        assert read(loader, name) == batches[2:]


@pytest.mark.parametrize(
    "name,opts", [c for c in CASES if "wds" in (c[0], c[1].get("reader"))], ids=lambda c: str(c)
)
def test_shard_readers_refuse_another_split_of_the_shards(probe, name, opts):
    with build(probe, name, opts, num_workers=2) as loader:
        read(loader, name, limit=1)
        state = loader.state_dict()
    with build(probe, name, opts, num_workers=2, rank=0, world_size=2) as other:
        with pytest.raises(StateError, match=r"continues an epoch only .*world_size 1 \(this loader: 2\)"):
            other.load_state_dict(state)
    if name == "wds":
        with (
            build(probe, name, opts, num_workers=1) as other,
            pytest.raises(StateError, match="num_workers 2"),
        ):
            other.load_state_dict(state)


@pytest.mark.skipif("mosaic" not in INSTALLED, reason="mosaic not installed")
def test_chunk_order_reads_windows_within_chunks_and_its_state_needs_it(probe, monkeypatch):
    from loaders import streamed

    monkeypatch.setattr(streamed, "WINDOW", 4)
    with build(probe, "mosaic", {"order": "chunks"}) as loader:
        loader.manifest = {**loader.manifest, "chunk_samples": [10, 11]}  # two chunks, as if written so
        # records are written in a seeded random order (by class otherwise): windows are of records
        written = loader.positions.tolist()
        assert sorted(written) == list(range(21)) and written != list(range(21))
        at = {i: k for k, i in enumerate(written)}
        orders = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            orders.append([at[i] for i in loader.epoch_order().tolist()])
        loader.set_epoch(0)
        read(loader, "mosaic", limit=1)
        state = loader.state_dict()
    windows = [range(0, 4), range(4, 8), range(8, 10), range(10, 14), range(14, 18), range(18, 21)]
    for order in orders:
        assert sorted(order) == list(range(21))
        at, seen = 0, []
        while at < len(order):  # each window's samples together, a window never across two chunks
            (w,) = [w for w in windows if order[at] in w]
            assert sorted(order[at : at + len(w)]) == list(w)
            seen.append(w)
            at += len(w)
        assert sorted(seen, key=lambda w: w.start) == windows
    assert orders[0] != orders[1]
    with build(probe, "mosaic", {}) as other, pytest.raises(StateError, match="order 'chunks'"):
        other.load_state_dict(state)


def test_foreign_damaged_and_newer_states_are_refused(probe):
    with build(probe, "torch", {}) as loader:
        read(loader, "torch", limit=1)
        state = loader.state_dict()
    with (
        build(probe, "torch", {}, seed=4) as other,
        pytest.raises(StateError, match=r"seed 3 \(this loader: 4\)"),
    ):
        other.load_state_dict(state)
    with (
        build(probe, "torch", {}, split="val") as other,
        pytest.raises(StateError, match=r"split .* train True \(this loader: False\)"),
    ):
        other.load_state_dict(state)
    with build(probe, "toy", {}) as other, pytest.raises(StateError, match="backend 'torch'"):
        other.load_state_dict(state)
    with build(probe, "torch", {}) as other:
        with pytest.raises(StateError, match="not a loader state"):
            other.load_state_dict({"epoch": 1})
        with pytest.raises(StateError, match="newer than this loaderbench"):
            other.load_state_dict({**state, "version": STATE_VERSION + 1})
        with pytest.raises(StateError, match="samples_seen 99 is not within"):
            other.load_state_dict({**state, "samples_seen": 99})
        # nothing was applied: the loader reads its own first epoch
        assert len(read(other, "torch")) == 6


@pytest.mark.parametrize(
    "name,opts", [c for c in CASES if c[0] in ("torch", "wds", "spdl", "ray") or c[1]], ids=str
)
def test_seeded_backends_resume_with_the_same_pixels(small_data, name, opts):
    kw = dict(batch_size=8, image_size=48, seed=5, device="cpu", train=True, num_workers=1, **opts)
    with build_loader(name, small_data / "train", **kw) as loader:
        loader.set_epoch(1)
        ref, state = [], None
        for k, (images, labels) in enumerate(loader):
            ref.append((images.clone(), labels.clone()))
            if k == 4:
                state = loader.state_dict()
    with build_loader(name, small_data / "train", **kw) as loader:
        loader.load_state_dict(state)
        rest = [(i.clone(), lab.clone()) for i, lab in loader]
    assert len(rest) == len(ref) - 5
    for (a, la), (b, lb) in zip(ref[5:], rest):
        assert torch.equal(la, lb) and torch.equal(a, b)
