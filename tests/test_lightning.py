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
