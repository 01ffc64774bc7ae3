"""loaders.lightning: a LightningDataModule over every backend keeps the contract's sharding and
epochs under Lightning's Trainer (bf16-mixed, EarlyStopping), in one process and on two CPU ranks
(strategy="ddp" on gloo, launched by torchrun): every sample exactly once per epoch, a new order
each epoch, no DistributedSampler of Lightning's in between."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from .conftest import available_backends  # noqa: E402

NAMES = available_backends(reads_data=True)
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", NAMES)
def test_one_process_fit_reads_every_sample_once_per_epoch(name, probe):
    from .lightning_fit import fit

    model = fit(name, probe["root"], num_workers=1)
    assert model.trainer.current_epoch == 2, "EarlyStopping stopped the fit after the second epoch"
    assert len(model.train_ids) == 2
    for ids in model.train_ids:
        assert sorted(ids) == sorted(probe["train"])
    assert model.train_ids[0] != model.train_ids[1], "Lightning's set_epoch reached the loader"
    assert [sorted(v) for v in model.val_ids] == [sorted(probe["val"])] * 2


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_ddp_ranks_read_every_sample_once_per_epoch(name, probe, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*cmd, "-m", "tests.lightning_fit", name, str(probe["root"]), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["train"]) for r in ranks] == [2, 2]
    for epoch in range(2):
        seen = collections.Counter(i for r in ranks for i in r["train"][epoch])
        assert set(seen) == set(probe["train"]) and sum(seen.values()) == len(probe["train"]) + 1  # 1 padded
        val = [i for r in ranks for i in r["val"][epoch]]
        assert sorted(val) == sorted(probe["val"]), "evaluation: every sample exactly once"
    assert ranks[0]["train"][0] != ranks[0]["train"][1]


class _Preempted(Exception):
    pass


@pytest.mark.parametrize("name", [n for n in ("torch", "wds", "dali") if n in NAMES])
def test_a_fit_resumed_mid_epoch_reads_the_rest_of_that_epoch(name, probe, tmp_path):
    """Trainer.fit(ckpt_path=...) from a checkpoint taken mid-epoch continues the epoch where the
    loader was: no sample missed or repeated (the failure LitData users report, Lightning #775)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from loaders.lightning import LoaderDataModule

    from .lightning_fit import Recorder

    class Preempt(Callback):  # the run dies at step 9, after the checkpoint of step 8 (epoch 1, batch 2)
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 9:
                raise _Preempted

    def fit(model, callbacks, ckpt_path=None):
        dm = LoaderDataModule(
            name, probe["root"] / "train", probe["root"] / "val", batch_size=4, image_size=16
        )
        pl.Trainer(
            accelerator="cpu",
            max_epochs=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[*callbacks, ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=4, save_top_k=-1)],
        ).fit(model, dm, ckpt_path=ckpt_path)

    first, second = Recorder(), Recorder()
    with pytest.raises(_Preempted):
        fit(first, [Preempt()])
    fit(second, [], ckpt_path=str(tmp_path / "step=8.ckpt"))
    assert sorted(first.train_ids[0]) == sorted(probe["train"])  # 6 steps per epoch
    epoch_1 = first.train_ids[1][:8] + second.train_ids[0]  # the checkpoint had read 2 of its batches
    assert collections.Counter(epoch_1) == dict.fromkeys(probe["train"], 1)
