"""Shared fixtures: a probe ImageFolder whose every image names its sample, and a small generated set."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# The toy backend (tests/toy_backend.py) is registered the way an outside backend would be, for this
# process and every `bench` process the tests start: the conformance suite and the harness tests
# take it like any other.
os.environ["LOADERBENCH_BACKENDS"] = "tests.toy_backend:ToyBackend"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from bench.cli import numba_finaliser_keyerror  # noqa: E402  (after the registration above)
from loaders.contract import MEAN, STD  # noqa: E402

# Probe set: flat-colour JPEGs. A crop, resize or flip of a flat image is the same flat image, so
# the colour of any output batch row names the sample it came from, whatever the augmentation.
PROBE_CLASSES = ("ant", "bee", "cat")  # sorted, as torchvision sorts class folders
PROBE_TRAIN_PER_CLASS = 7  # 21 samples: odd, so 2 ranks need one padded sample in training
PROBE_VAL_PER_CLASS = 3


def probe_colour(sample_id: int) -> tuple[int, int, int]:
    return (32 + 24 * (sample_id % 8), 32 + 24 * ((sample_id // 8) % 8), 200)


def write_probe(root: Path, per_class: int, first_id: int) -> dict[int, int]:
    """Write class folders of flat JPEGs; return {sample_id: label}."""
    ids = {}
    sid = first_id
    for label, cls in enumerate(PROBE_CLASSES):
        (root / cls).mkdir(parents=True)
        for _ in range(per_class):
            size = (64 + 8 * (sid % 5), 48 + 6 * (sid % 3))  # varied sizes exercise the resizes
            Image.new("RGB", size, probe_colour(sid)).save(root / cls / f"img_{sid:03d}.jpg", quality=95)
            ids[sid] = label
            sid += 1
    return ids


def decode_ids(images: torch.Tensor) -> list[int]:
    """Map each normalised flat image back to its sample id (nearest probe colour)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    rgb = (images.float().cpu() * std + mean).mul(255).mean(dim=(2, 3))  # [N, 3]
    table = torch.tensor([probe_colour(i) for i in range(64)], dtype=torch.float32)
    dist = torch.cdist(rgb, table)
    best = dist.argmin(1)
    assert (dist.min(1).values < 6).all(), f"an image is not a probe colour: {rgb[dist.min(1).values >= 6]}"
    return best.tolist()


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    train = write_probe(root / "train", PROBE_TRAIN_PER_CLASS, first_id=0)
    val = write_probe(root / "val", PROBE_VAL_PER_CLASS, first_id=len(train))
    return {"root": root, "train": train, "val": val}


SMALL_SPEC = dict(classes=4, train_per_class=40, val_per_class=12, width=200, height=150)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small generated ImageFolder (fast to read; same generator as the default set)."""
    from bench.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("gen") / "small"
    generate(out, SynthSpec(**SMALL_SPEC), progress=False)
    return out


@pytest.fixture(scope="session", autouse=True)
def _suite_cache(tmp_path_factory):
    """Every test and every process it starts converts and stages into a cache of this run, never the
    user's ~/.cache/loaderbench: one suite run left hundreds of .beton and shard sets there (6 GB
    after a few runs, which filled a disk). Removed at the end; a test may still take its own."""
    path = tmp_path_factory.mktemp("lbcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOADERBENCH_CACHE", str(path))
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray cluster on this machine for the suite's ray-backend tests: a head that runs no tasks
    (the trainer's node) and two 1-CPU worker nodes (the remote pool), their raylets on this
    machine's address (Ray's own ray.cluster_utils.Cluster). RAY_ADDRESS names it, so loaders in
    this process and in the ranks and commands it starts join it instead of each starting Ray
    (several seconds a process); the test of the local instance removes RAY_ADDRESS."""
    pytest.importorskip("ray.data")
    import ray
    from ray.cluster_utils import Cluster

    # Each process that joins is its own Ray job with its own worker processes (seconds each to
    # start: they import torch). Ray keeps num_cpus idle workers per node by default, so the two
    # ranks of a test would evict each other's workers after every task; 8 keeps them.
    head = {"num_cpus": 0, "include_dashboard": False, "_system_config": {"num_workers_soft_limit": 8}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", cluster.address)
        yield {"cluster": cluster, "address": cluster.address, "workers": workers}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(autouse=True)
def _ray_for_ray_tests(request):
    """Tests parametrised over the backends (a name, or a command line's words) get the suite's Ray
    cluster where they run the ray one."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if any(v == "ray" or (isinstance(v, tuple) and "ray" in v) for v in params.values()):
        request.getfixturevalue("ray_cluster")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADERBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_launched(rank, fn, *args):
    # A spawned child inherits "spawn" as its default start method, which would make every
    # DataLoader worker re-import torch; torchrun's ranks are fresh interpreters that fork.
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    fn(rank, *args)


def run_ranks(fn, world: int, *args, timeout: float = 240) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes (a fresh interpreter
    each: forking a process that has used OpenMP threads can deadlock) and fail, not hang, if
    they do not finish within ``timeout`` seconds."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _as_launched, args=(fn, world, free_port(), *args), nprocs=world, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s")


def bench(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the `bench` command line as a user would, in its own process."""
    full_env = dict(os.environ)
    # a test's own S3 session (the s3 fixture's) is not the command's unless the test hands it over
    for inherited in ("WORLD_SIZE", "LOADERBENCH_S3_SESSION", "AWS_ENDPOINT_URL"):
        full_env.pop(inherited, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def available_backends(reads_data: bool | None = None) -> list[str]:
    from loaders import backends

    names = [b.name for b in backends() if b.installed]
    if reads_data is None:
        return names
    return [n for n in names if (n != "synthetic") == reads_data]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (not verified on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.hookimpl(trylast=True)  # after pytest's own unraisable hook is installed, to wrap it
def pytest_configure(config):
    # pytest's hook formats the traceback at once, inside the garbage collector; on Python 3.11
    # formatting calls ast.parse, and a collection that starts inside another ast.parse (pytest
    # rewriting a plugin it imports late) then fails that parse with "SystemError: AST constructor
    # recursion depth mismatch" (CPython gh-106905 family). It ended a CI run after every test
    # had passed. So the one known harmless finaliser error is dropped before pytest formats it;
    # any other still reaches pytest and shows as a warning.
    pytest_hook = sys.unraisablehook

    def hook(unraisable):
        if not numba_finaliser_keyerror(unraisable):
            pytest_hook(unraisable)

    sys.unraisablehook = hook
