"""Multi-node without a cluster: two torchrun agents on this machine (``--nnodes 2
--nproc-per-node 1``, c10d rendezvous on 127.0.0.1), each one "node" running ``bench run``; and
two tasks started as srun starts them (SLURM's variables, no torchrun). The data has one image per
class, so the run's per-epoch label counts, summed over ranks (``train_coverage`` and
``val_coverage`` in the result), prove that every sample was read exactly once across the nodes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.harness.result import load

from .conftest import available_backends, free_port

CLASSES = 25  # odd: training pads one sample for 2 ranks; evaluation splits 13 / 12
ARGS = ("--epochs", "2", "--warmup-steps", "1", "--batch-size", "13", "--image-size", "32")
WORKERS = {"torch": ("--workers", "1"), "wds": ("--workers", "1")}
NAMES = available_backends(reads_data=True)


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("one-per-class")
    for split in ("train", "val"):
        for c in range(CLASSES):
            (root / split / f"c{c:02d}").mkdir(parents=True)
            colour = (10 * c, 255 - 10 * c, 128 if split == "train" else 64)
            Image.new("RGB", (48, 40), colour).save(root / split / f"c{c:02d}" / "x.jpg")
    return root


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOADERBENCH_S3"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def wait_all(procs, timeout=400) -> list[tuple[int, str]]:
    outs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def check_exactly_once(out: Path, world: int = 2):
    (path,) = out.glob("*.json")  # rank 0 alone writes the result
    res = load(path)
    assert res.config["world_size"] == world
    epochs = res.metrics.epochs
    assert len(epochs) == 2
    for e in epochs:
        # every class (= every sample) once, one repeated to pad the 25 samples to 2 x 13
        assert e["train_coverage"] == {
            "images": 26,
            "classes_seen": 25,
            "per_class_min": 1,
            "per_class_max": 2,
        }
        assert e["val_coverage"] == {"images": 25, "classes_seen": 25, "per_class_min": 1, "per_class_max": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_torchrun_nodes_read_every_sample_once(name, one_per_class, tmp_path):
    port = free_port()
    agent = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"two-nodes-{name}",
        "--local-addr",
        "127.0.0.1",
        "-m",
        "bench.cli",
        "run",
        "--loader",
        name,
        "--data",
        str(one_per_class),
        *ARGS,
        *WORKERS.get(name, ("-o", "num_workers=1")),
        "--out",
        str(tmp_path / "r"),
    ]
    nodes = [
        subprocess.Popen(
            agent, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for code, err in wait_all(nodes):
        assert code == 0, err[-3000:]
    check_exactly_once(tmp_path / "r")


@pytest.mark.slow
def test_srun_tasks_without_torchrun(one_per_class, tmp_path):
    """What ``srun -N 2 --ntasks-per-node 1 bench run ...`` starts: two tasks, SLURM's variables,
    MASTER_ADDR from the job script, no RANK or WORLD_SIZE."""
    port = free_port()
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "4242",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    cmd = [sys.executable, "-m", "bench.cli", "run", "--loader", "torch", "--data", str(one_per_class), *ARGS]
    tasks = [
        subprocess.Popen(
            [*cmd, "--workers", "1", "--out", str(tmp_path / "r")],
            cwd=tmp_path,
            env=clean_env(**slurm, SLURM_PROCID=str(r), SLURM_NODEID=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for code, err in wait_all(tasks):
        assert code == 0, err[-3000:]
    check_exactly_once(tmp_path / "r")


def test_srun_without_master_addr_says_how_to_set_it(tmp_path):
    env = clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_ID="0")
    cmd = [sys.executable, "-m", "bench.cli", "run", "--loader", "synthetic", "--out", str(tmp_path / "r")]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "MASTER_ADDR is not set" in out.stderr and "scontrol show hostnames" in out.stderr
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())
