"""loaders.launch: srun's variables read as torchrun's, and where they must not be."""

from __future__ import annotations

import pytest

from loaders.launch import LaunchError, adopt, tasks_per_node, torch_env

SRUN = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "6",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_TASKS_PER_NODE": "2(x3)",
    "SLURM_JOB_ID": "123456",
    "MASTER_ADDR": "node01",
}


def test_srun_task_reads_as_torchrun():
    assert torch_env(SRUN) == {
        "RANK": "5",
        "WORLD_SIZE": "6",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": str(15000 + 123456 % 20000),
    }
    assert torch_env({**SRUN, "MASTER_PORT": "29400"})["MASTER_PORT"] == "29400"


def test_torchrun_wins_over_srun():
    """``srun torchrun ...``: the ranks torchrun starts carry both; torchrun's are the truth."""
    env = {**SRUN, "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}
    assert torch_env(env) == {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "node01"}


@pytest.mark.parametrize(
    "change",
    [
        {"SLURM_STEP_ID": None},  # the batch script or an salloc shell: not a task of a step
        {"SLURM_STEP_ID": str(0xFFFFFFFE)},  # Slurm's batch step
        {"SLURM_NTASKS": "1"},  # one task: it may launch its own ranks
    ],
)
def test_not_a_task_of_a_parallel_step(change):
    env = {k: v for k, v in {**SRUN, **change}.items() if v is not None}
    assert torch_env(env) == {k: env[k] for k in ("MASTER_ADDR",)}
    assert adopt(dict(env)) == {"MASTER_ADDR": "node01"}


def test_adopt_sets_only_what_is_missing_and_needs_master_addr():
    env = dict(SRUN)
    adopt(env)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "6" and env["LOCAL_WORLD_SIZE"] == "2"
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        adopt({k: v for k, v in SRUN.items() if k != "MASTER_ADDR"})


def test_tasks_per_node_forms():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4]
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node("two")
