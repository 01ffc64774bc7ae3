"""The trainer: it learns (fp32 and bf16), stops early on a stalled validation loss, and its
throughput and data-wait figures agree with what an outside clock sees."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from bench.trainer import TrainConfig, TrainError, train
from bench.trainer import loop as trainer
from bench.trainer.models import build_model

CPU = torch.device("cpu")


class Batches:
    """A loader stand-in: fixed batches, an optional sleep per batch (a slow input pipeline)."""

    def __init__(self, batches, sleep=0.0, first_sleep=None, warm=0):
        self.batches, self.sleep, self.first_sleep, self.warm = batches, sleep, first_sleep, warm
        self.epochs = []
        self.asked, self.spent = (
            [],
            [],
        )  # when each batch was asked for, and how long it took: an outside clock

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for k, b in enumerate(self.batches):
            self.asked.append(time.perf_counter())
            time.sleep(self.first_sleep if (self.first_sleep is not None and k < self.warm) else self.sleep)
            self.spent.append(time.perf_counter() - self.asked[-1])
            yield b


def separable(n_batches, batch=16, size=16, classes=3, seed=0):
    """Class c = a bright quadrant-ish pattern + noise: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        x = torch.randn(batch, 3, size, size, generator=g) * 0.5
        for c in range(classes):
            x[y == c, c % 3] += 1.5
        out.append((x, y))
    return out


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_loss_decreases_on_the_generated_set(amp, small_data):
    """Real data through the torch backend, fp32 and bf16 autocast on the CPU."""
    from loaders import build_loader

    torch.manual_seed(0)
    common = dict(batch_size=16, image_size=48, device="cpu")
    train_loader = build_loader("torch", small_data / "train", train=True, drop_last=True, **common)
    val_loader = build_loader("torch", small_data / "val", train=False, **common)
    res = train(
        build_model("small", 4),
        train_loader,
        val_loader,
        TrainConfig(epochs=4, lr=0.05, amp=amp, warmup_steps=2),  # 0.1 oscillated: 1.13, 0.69, 0.92, 0.69
        CPU,
        log=lambda *a: None,
    )
    losses = [e.train_loss for e in res.epochs]
    assert losses[-1] < 0.8 * losses[0], losses
    assert res.epochs[-1].val_accuracy > 0.4  # chance: 0.25
    assert res.steps == 4 * 10 and res.measured_images == (40 - 2) * 16


def test_loss_decreases_on_a_separable_task():
    torch.manual_seed(0)
    res = train(
        build_model("small", 3),
        Batches(separable(40)),
        Batches(separable(4, seed=1)),
        TrainConfig(epochs=3, lr=0.05, warmup_steps=2),
        CPU,
        log=lambda *a: None,
    )
    losses = [e.train_loss for e in res.epochs]
    assert losses[-1] < 0.5 * losses[0], losses
    assert res.epochs[-1].val_accuracy > 0.8


def test_channels_last_trains_the_same_model():
    torch.manual_seed(0)
    model = build_model("small", 3)
    res = train(
        model,
        Batches(separable(10)),
        None,
        TrainConfig(epochs=1, channels_last=True, warmup_steps=2),
        CPU,
        log=lambda *a: None,
    )
    assert math.isfinite(res.epochs[0].train_loss)
    conv = model[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_early_stopping_after_patience_epochs(monkeypatch):
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.5, 0.4])  # best at epoch 1, then two bad epochs
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: (next(losses), 0.5))
    loader = Batches(separable(3))
    res = train(
        build_model("small", 3),
        loader,
        Batches(separable(1)),
        TrainConfig(epochs=6, patience=2, warmup_steps=1),
        CPU,
        log=lambda *a: None,
    )
    assert res.stopped_early and len(res.epochs) == 4
    assert loader.epochs == [0, 1, 2, 3]


def test_no_early_stop_without_patience(monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: (1.0, 0.5))
    res = train(
        build_model("small", 3),
        Batches(separable(3)),
        Batches(separable(1)),
        TrainConfig(epochs=3, warmup_steps=1),
        CPU,
        log=lambda *a: None,
    )
    assert not res.stopped_early and len(res.epochs) == 3


def test_throughput_matches_an_outside_clock_and_excludes_warm_up():
    """A loader that sleeps 30 ms per batch (the first 3 batches 400 ms, like worker start-up)
    in front of a model that costs ~nothing. The outside clock starts when the loader is asked
    for the first batch after warm-up; including the warm-up would report about half the rate.
    Both sides are measured, not nominal, so a loaded CI machine cannot fail it by oversleeping."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    batches = separable(40, size=4)
    loader = Batches(batches, sleep=0.03, first_sleep=0.4, warm=3)
    t0 = time.perf_counter()
    res = train(model, loader, None, TrainConfig(epochs=1, warmup_steps=3), CPU, log=lambda *a: None)
    end = time.perf_counter()
    steady = 37 * 16 / (end - loader.asked[3])
    assert res.images_per_second == pytest.approx(steady, rel=0.05)
    with_warm_up = 40 * 16 / (end - t0)
    assert res.images_per_second > 1.5 * with_warm_up  # nominally 2x: the 1.2 s of start-up is out
    assert res.measured_images == 37 * 16
    # data wait is the loader's own time, step by step, and the compute does not include it
    assert all(w >= s for w, s in zip(res.data_wait, loader.spent[3:]))
    assert sum(res.data_wait) == pytest.approx(sum(loader.spent[3:]), abs=37 * 0.005)
    assert all(t >= w + c * 0.99 for t, w, c in zip(res.step_time, res.data_wait, res.compute))
    assert len(res.data_wait) == len(res.compute) == len(res.step_time) == 37


def test_compute_bound_loop_has_small_data_wait():
    model = build_model("small", 3)
    res = train(
        model,
        Batches(separable(12, batch=32, size=64)),
        None,
        TrainConfig(epochs=1, warmup_steps=2),
        CPU,
        log=lambda *a: None,
    )
    share = sum(res.data_wait) / sum(res.step_time)
    assert share < 0.05, share
    assert all(c > 0 for c in res.compute)


def test_batch_of_one_is_a_clear_error_not_a_batchnorm_traceback():
    data = separable(2) + [(torch.randn(1, 3, 16, 16), torch.tensor([0]))]
    with pytest.raises(TrainError, match="batch of 1 sample"):
        train(
            build_model("small", 3),
            Batches(data),
            None,
            TrainConfig(epochs=1, warmup_steps=1),
            CPU,
            log=lambda *a: None,
        )


def test_eval_runs_under_inference_mode_unless_asked(monkeypatch):
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 4 * 4, 3)

        def forward(self, x):
            if not self.training:
                seen.append(torch.is_inference_mode_enabled())
            return self.lin(x.flatten(1))

    for mode in (True, False):
        train(
            Probe(),
            Batches(separable(4, size=4)),
            Batches(separable(1, size=4)),
            TrainConfig(epochs=1, warmup_steps=1, eval_inference_mode=mode),
            CPU,
            log=lambda *a: None,
        )
    assert seen == [True, False]


def _all_reduce_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sent, all_reduce = [], dist.all_reduce

        def recording(t, *args, **kwargs):
            sent.append(t)
            return all_reduce(t, *args, **kwargs)

        dist.all_reduce = recording
        held, sums = 0, set()
        for _ in range(400):
            sums.add(tuple(trainer.all_reduce_values([1.0, rank], CPU)))
            held += sent.pop()._use_count() > 1  # a reference gloo's worker thread has not dropped yet
        (out / f"rank{rank}.txt").write_text(f"{held} {sorted(sums)}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_returns_after_gloo_lets_go_of_its_tensor(tmp_path):
    """gloo's worker drops a finished all-reduce's tensor a moment after the caller wakes up; if
    the caller has dropped it first, that late release needs the GIL, and at interpreter exit it
    aborts the rank (SIGABRT after a successful run). all_reduce_values holds on until it is free."""
    from .conftest import run_ranks

    run_ranks(_all_reduce_worker, 2, tmp_path)
    for rank in range(2):
        held, sums = (tmp_path / f"rank{rank}.txt").read_text().split(" ", 1)
        assert sums == "[(2.0, 1.0)]"  # the reduction itself: 1+1, 0+1
        assert held == "0", (
            f"rank {rank}: {held} of 400 all-reduces returned while gloo still held the tensor"
        )


def _sharded_worker(rank, world, port, out, shard, channels_last=False):
    import json

    import torch.distributed as dist

    def fmt(batches):  # a loader's channels_last batches
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return [(x.contiguous(memory_format=memory_format), y) for x, y in batches]

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank (FSDP does not broadcast them)
        res = train(
            build_model("small", 3),
            Batches(fmt(separable(6, seed=10 + rank))),
            Batches(fmt(separable(2 if rank == 0 else 1, seed=20 + rank))),  # uneven evaluation shards
            TrainConfig(epochs=2, warmup_steps=1, shard=shard, num_classes=3, channels_last=channels_last),
            CPU,
            log=lambda *a: None,
        )
        epochs = [(e.train_loss, e.val_loss, e.val_coverage["images"]) for e in res.epochs]
        (out / f"{shard}-{channels_last}-{rank}.json").write_text(
            json.dumps({"epochs": epochs, "memory": res.memory})
        )
    finally:
        dist.destroy_process_group()


def test_zero_and_fsdp_train_as_ddp_does_and_hold_a_share_each(tmp_path):
    """--shard-optimizer (ZeRO-1) and --fsdp (FSDP2) on 2 gloo ranks: the same losses as DDP (same
    data, same initial weights), evaluation on uneven shards does not hang, and each rank holds
    about half of what DDP holds of the sharded state."""
    import json

    from .conftest import run_ranks

    got = {}
    for shard, channels_last in (("off", False), ("optimizer", False), ("fsdp", False), ("fsdp", True)):
        run_ranks(_sharded_worker, 2, tmp_path, shard, channels_last)
        key = shard + "-channels_last" * channels_last
        got[key] = [
            json.loads((tmp_path / f"{shard}-{channels_last}-{r}.json").read_text()) for r in range(2)
        ]
    ddp = got["off"][0]
    # FSDP2 refuses channels_last (non-contiguous) parameters: the trainer keeps them NCHW and
    # trains on channels_last batches to the same losses.
    for (loss, _, _), (ref_loss, _, _) in zip(got["fsdp-channels_last"][0]["epochs"], ddp["epochs"]):
        assert loss == pytest.approx(ref_loss, rel=1e-3)
    # ZeRO: DDP's numbers exactly. FSDP: the same training losses; its evaluation differs a little
    # because FSDP does not broadcast BatchNorm's running statistics from rank 0 as DDP does.
    for shard, val_rel in (("optimizer", 1e-9), ("fsdp", 0.05)):
        for (loss, val, n), (ref_loss, ref_val, ref_n) in zip(got[shard][0]["epochs"], ddp["epochs"]):
            assert loss == pytest.approx(ref_loss, rel=1e-4) and val == pytest.approx(ref_val, rel=val_rel)
            assert n == ref_n == 48  # 3 evaluation batches of 16, over both ranks
    full = ddp["memory"]
    params, momentum = full["params_mib"][0], full["optimizer_mib"][0]
    assert full["params_mib"] == [params, params] and momentum == pytest.approx(params, rel=0.01)
    zero = got["optimizer"][0]["memory"]
    assert zero["params_mib"] == [params, params]
    assert (
        sum(zero["optimizer_mib"]) == pytest.approx(momentum, rel=0.01)
        and max(zero["optimizer_mib"]) < momentum
    )
    fsdp = got["fsdp"][0]["memory"]
    for key in ("params_mib", "grads_mib", "optimizer_mib"):
        assert max(fsdp[key]) <= 0.6 * params and sum(fsdp[key]) >= 0.99 * params, (key, fsdp[key])
    assert all(m > 0 for m in fsdp["peak_mib"]) and fsdp["peak_is"] == "process peak RSS"
