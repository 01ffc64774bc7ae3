"""`bench run --checkpoint DIR --checkpoint-every N` and `bench run --resume DIR`: a run killed with
SIGKILL mid-epoch, or stopped by SIGTERM (checkpoint at the next step, exit 143), continues where
its last checkpoint was, on the same or another number of ranks, and every sample of every epoch
is read exactly once over the processes (data with one image per class: the per-epoch label
counts show it). Damaged or foreign checkpoints are refused with one line before anything starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from bench.trainer.checkpoint import latest

from .conftest import bench
from .test_faults import descendants, finish, no_orphans, start_bench, wait_for

STEPS_PER_EPOCH = 16  # 64 images, batch 4, one rank
RUN = ("run", "--model", "resnet18", "--batch-size", "4", "--image-size", "32", "--epochs", "2")


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    from bench.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("ckdata") / "d"
    generate(
        out, SynthSpec(classes=64, train_per_class=1, val_per_class=1, width=64, height=48), progress=False
    )
    return out


def result_of(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def assert_every_sample_once(result: dict, epochs: int, extra: int = 0) -> None:
    cover = [e["train_coverage"] for e in result["metrics"]["epochs"]]
    assert len(cover) == epochs
    for c in cover:
        assert c["classes_seen"] == 64 and c["per_class_min"] == 1, cover
    assert sum(c["images"] for c in cover) == 64 * epochs + extra, cover


def checkpointed_step(folder: Path) -> int:
    return json.loads((latest(folder) / "meta.json").read_text())["step"]


def test_sigkill_mid_epoch_then_resume_continues_the_same_training(one_per_class, tmp_path):
    common = (*RUN, "--data", str(one_per_class), "-o", "num_workers=2")
    ref = bench(*common, "--out", str(tmp_path / "ref"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ck = tmp_path / "ck"
    proc = start_bench(
        *common,
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "5",
        "--out",
        str(tmp_path / "a"),
        cwd=tmp_path,
    )
    wait_for(lambda: (ck / "step-000000005" / "meta.json").is_file(), 120, "the first checkpoint", proc)
    everything = descendants(proc)
    os.killpg(proc.pid, signal.SIGKILL)  # a node lost: no handler runs
    finish(proc, 30)
    no_orphans(everything)
    step, where = checkpointed_step(ck), latest(ck)
    assert step % STEPS_PER_EPOCH, f"checkpoint at step {step} is at an epoch's end, not mid-epoch"
    assert not list((tmp_path / "a").glob("*.json"))  # the killed run wrote no result
    out = bench("run", "--resume", str(ck), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {where}: step {step}" in out.stdout
    resumed, reference = result_of(tmp_path / "b"), result_of(tmp_path / "ref")
    assert_every_sample_once(resumed, epochs=2)
    assert resumed["metrics"]["checkpoint"]["resumed_from"]["step"] == step
    assert resumed["command"][:3] == ["bench", "run", "--resume"]
    # model, optimizer, RNG and loader restored: the same losses as the run that was never killed
    losses = [e["train_loss"] for e in resumed["metrics"]["epochs"]]
    assert losses == pytest.approx([e["train_loss"] for e in reference["metrics"]["epochs"]], rel=1e-4)


def test_sigterm_checkpoints_exits_143_and_resumes_on_another_number_of_ranks(one_per_class, tmp_path):
    ck = tmp_path / "ck"
    proc = start_bench(
        *RUN,
        "--data",
        str(one_per_class),
        "--cpu-ranks",
        "2",
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "3",
        "--out",
        str(tmp_path / "a"),
        cwd=tmp_path,
    )
    wait_for(lambda: (ck / "step-000000003" / "meta.json").is_file(), 180, "the first checkpoint", proc)
    everything = descendants(proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # to bench alone, as `kill PID` or a scheduler's signal does
    took, err = finish(proc, 60)
    assert proc.returncode == 143, err[-2000:]
    assert "bench: preempted: SIGTERM: checkpointed step" in err
    no_orphans(everything)
    step = checkpointed_step(ck)
    assert step > 3 and (time.monotonic() - sent) < 60
    meta = json.loads((latest(ck) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["loader"]["samples_seen"] == step * 4 * 2
    # elastic: the rest of the epoch on one rank, every sample still once
    out = bench("run", "--resume", str(ck), "--cpu-ranks", "1", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = result_of(tmp_path / "b")
    assert resumed["config"]["world_size"] == 1
    assert resumed["metrics"]["checkpoint"]["resumed_from"]["world_size"] == 2
    assert_every_sample_once(resumed, epochs=2)


@pytest.mark.parametrize("shard", ["--shard-optimizer", "--fsdp"])
def test_sharded_training_resumes(one_per_class, tmp_path, shard):
    ck = tmp_path / "ck"
    args = (
        "run",
        "--data",
        str(one_per_class),
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--cpu-ranks",
        "2",
        shard,
    )
    first = bench(
        *args,
        "--epochs",
        "1",
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "3",
        "--out",
        str(tmp_path / "a"),
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert checkpointed_step(ck) == 6  # 8 steps per rank and epoch
    if shard == "--fsdp":
        assert list((latest(ck) / "dcp").glob("*.distcp"))  # torch.distributed.checkpoint's shards
    out = bench("run", "--resume", str(ck), "--epochs", "2", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_every_sample_once(result_of(tmp_path / "b"), epochs=2)


@pytest.fixture(scope="module")
def finished_checkpoint(one_per_class, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckdone")
    args = ("run", "--data", str(one_per_class), "--batch-size", "4", "--image-size", "32", "--epochs", "1")
    out = bench(
        *args, "--checkpoint", str(root / "ck"), "--checkpoint-every", "5", "--out", str(root / "r"), cwd=root
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return root / "ck"


def _refused(out, tmp_path, says: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: error: ") and says in last, out.stderr[-2000:]
    assert "epoch 0:" not in out.stdout  # nothing trained
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))


def test_damaged_and_foreign_checkpoints_are_refused(finished_checkpoint, tmp_path):
    ck = shutil.copytree(finished_checkpoint, tmp_path / "ck")
    other_loader = bench(
        "run", "--resume", str(ck), "--loader", "toy", "--out", str(tmp_path / "r"), cwd=tmp_path
    )
    _refused(other_loader, tmp_path, "loader state is of another run: backend 'torch'")
    other_seed = bench("run", "--resume", str(ck), "--seed", "9", "--out", str(tmp_path / "r"), cwd=tmp_path)
    _refused(other_seed, tmp_path, "seed 0 (this loader: 9)")
    again = bench(
        "run", "--data", str(tmp_path), "--checkpoint", str(ck), "--out", str(tmp_path / "r"), cwd=tmp_path
    )
    _refused(again, tmp_path, f"holds a checkpoint already ({latest(ck).name}): continue that run with")
    (latest(ck) / "trainer.pt").write_bytes(b"not a checkpoint")
    damaged = bench("run", "--resume", str(ck), "--out", str(tmp_path / "r"), cwd=tmp_path)
    _refused(damaged, tmp_path, "trainer.pt cannot be read")
    missing = bench("run", "--resume", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), cwd=tmp_path)
    _refused(missing, tmp_path, "no readable run.json there")
    lonely = bench("run", "--checkpoint-every", "3", "--out", str(tmp_path / "r"), cwd=tmp_path)
    _refused(lonely, tmp_path, "--checkpoint-every needs --checkpoint DIR")


def test_a_checkpoint_being_written_is_never_the_latest(tmp_path):
    (tmp_path / "step-000000005").mkdir()
    (tmp_path / "step-000000005" / "meta.json").write_text("{}")
    (tmp_path / ".partial-step-000000010").mkdir()  # killed while saving: the rename never happened
    (tmp_path / ".partial-step-000000010" / "meta.json").write_text("{}")
    assert latest(tmp_path) == tmp_path / "step-000000005"
    assert latest(tmp_path / "empty") is None
