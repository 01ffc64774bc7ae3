"""The ray backend beyond the conformance suite: its crops are the torch backend's, its tasks run
on the pool's nodes (not the trainer's), a pool node lost mid-epoch still gives every sample once,
a pool without CPUs, an unreachable head and a task that raises are one clear error in bounded
time, and `bench run --loader ray` starts its own Ray instance and leaves no Ray process behind."""

from __future__ import annotations

import collections
import json
import sys
import time

import pytest
import torch

from loaders import LoaderError, build_loader

from .conftest import available_backends, bench, decode_ids, free_port
from .test_bad_input import fails_cleanly

pytestmark = pytest.mark.skipif("ray" not in available_backends(), reason="ray[data] not installed")


@pytest.fixture(autouse=True)
def _cluster(ray_cluster):
    return ray_cluster


def first_batch(name, split, **opts):
    with build_loader(name, split, batch_size=16, image_size=64, device="cpu", seed=3, **opts) as loader:
        loader.set_epoch(2)
        return next(iter(loader))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_images_are_the_torch_backends_pixels(train, small_data):
    split = small_data / ("train" if train else "val")
    xt, yt = first_batch("torch", split, train=train)
    xr, yr = first_batch("ray", split, train=train)
    assert torch.equal(yt, yr) and torch.equal(xt, xr)
    xd, _ = first_batch("ray", split, train=train, device_normalize=True)  # uint8 from the tasks
    assert torch.allclose(xd, xr, atol=1e-5)


def test_tasks_run_on_the_pool_nodes_not_the_trainers(small_data, ray_cluster):
    """Ray's own record of where each batch's task ran (its runtime context's node id): the two
    worker nodes, never the head that the trainer runs beside."""
    with build_loader("ray", small_data / "train", batch_size=8, image_size=32, device="cpu") as loader:
        assert sum(len(y) for _, y in loader) == loader.num_samples
        workers = {n.node_id for n in ray_cluster["workers"]}
        assert loader.nodes == workers, (loader.nodes, workers)
        assert ray_cluster["cluster"].head_node.node_id not in loader.nodes
        assert loader.describe()["ray_nodes_used"] == 2


def test_a_pool_node_lost_mid_epoch_still_reads_every_sample_once(probe, ray_cluster):
    """A third node joins, then is killed after the first batch: Ray runs its tasks again (and
    rebuilds the blocks it held) on the others; the epoch still has every sample once, in order."""
    cluster = ray_cluster["cluster"]
    extra = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    loader = build_loader("ray", probe["root"] / "train", batch_size=2, image_size=16, device="cpu", seed=1)
    try:
        loader.set_epoch(0)
        ids = []
        for k, (images, _) in enumerate(loader):
            ids += decode_ids(images)
            if k == 0:
                cluster.remove_node(extra)
        expected = [int(i) for i in loader.epoch_indices()]
    finally:
        loader.close()
    assert collections.Counter(ids) == collections.Counter(list(probe["train"]))
    assert len(ids) == len(probe["train"])
    assert ids == [sorted(probe["train"])[i] for i in expected]  # the epoch's order, not a retry's


class Exploding:
    """A Samples stand-in whose every batch raises: a bug in a task, not a bad file."""

    def __init__(self, samples):
        self.transform = samples.transform

    def __getitems__(self, keys):
        raise RuntimeError("a bug in the decode task")


def test_a_task_that_raises_is_one_clear_error(small_data):
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests
    loader = build_loader("ray", small_data / "train", batch_size=8, image_size=32, device="cpu")
    try:
        loader._samples = ray.put(Exploding(ray.get(loader._samples)))
        start = time.monotonic()
        with pytest.raises(LoaderError, match="ray pipeline stopped: .*a bug in the decode task"):
            next(iter(loader))
        assert time.monotonic() - start < 60
    finally:
        loader.close()


@pytest.mark.parametrize(
    "opts,needle",
    [
        (dict(ray_cpus=0), "ray_cpus must be >= 1"),
        (dict(timeout=0), "timeout must be > 0"),
        (dict(prefetch=0), "prefetch must be >= 1"),
    ],
)
def test_impossible_options_are_refused(small_data, opts, needle):
    with pytest.raises(LoaderError, match=needle):
        build_loader("ray", small_data / "train", batch_size=8, device="cpu", **opts)


RUN = (
    "run",
    "--loader",
    "ray",
    "--epochs",
    "1",
    "--warmup-steps",
    "1",
    "--batch-size",
    "4",
    "--image-size",
    "32",
)


def test_an_unreachable_head_is_one_line_within_seconds(probe, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    out = bench(
        *RUN,
        "--data",
        str(probe["root"]),
        "--ray-address",
        address,
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    fails_cleanly(out, f"cannot reach the Ray head at {address}", "--ray-address")
    assert time.monotonic() - start < 60
    assert not list((tmp_path / "r").glob("*.json"))


def test_a_pool_without_cpus_is_an_error_within_the_timeout(probe, tmp_path):
    """A cluster whose only node is the head with no CPUs (every pool node gone): the run waits
    ``timeout`` seconds for a batch, then stops with one line and writes no result."""
    from ray.cluster_utils import Cluster

    empty = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        start = time.monotonic()
        out = bench(
            *RUN,
            "--data",
            str(probe["root"]),
            "--ray-address",
            empty.address,
            "-o",
            "timeout=5",
            "--out",
            str(tmp_path / "r"),
            cwd=tmp_path,
            timeout=120,
        )
        fails_cleanly(out, "no batch from Ray within 5 s")
        assert time.monotonic() - start < 90
        assert not list((tmp_path / "r").glob("*.json"))
    finally:
        empty.shutdown()


def ray_processes() -> set[int]:
    """This machine's Ray processes (raylets, GCS servers, workers, their helpers)."""
    import psutil

    found = set()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            words = " ".join(p.info["cmdline"] or [])
            if (
                p.info["name"] in ("raylet", "gcs_server")
                or "ray::" in words
                or "/site-packages/ray/" in words
            ):
                found.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_bench_run_starts_its_own_ray_and_leaves_nothing_behind(probe, tmp_path):
    """Without RAY_ADDRESS, `bench run --loader ray` starts a local Ray instance on its --cpus cores
    and stops it at exit: no raylet, GCS or worker of it remains."""
    before = ray_processes()
    env = {"RAY_ADDRESS": ""}  # not the suite's cluster: what a user without one gets
    out = bench(
        *RUN, "--cpus", "1", "--data", str(probe["root"]), "--out", str(tmp_path / "r"), cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = (tmp_path / "r").glob("*.json")
    described = json.loads(result.read_text())["loader"]
    assert described["decode"].endswith("the local Ray instance of 1 CPU(s)"), described
    deadline = time.monotonic() + 20
    while (left := ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: {sorted(left)}"
