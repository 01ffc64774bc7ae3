"""`bench plan`: the prediction model on known curves, and the command end to end on tiny data."""

from __future__ import annotations

import json

import pytest

from bench.harness.plan import GPU_RATES, Curve, Measured, Target, predict

from .conftest import bench


def test_a_curve_interpolates_and_never_extrapolates_better_than_linear():
    c = Curve([1, 2], [100.0, 180.0])
    assert c.at(1) == 100 and c.at(2) == 180 and c.at(1.5) == pytest.approx(140)
    assert c.at(0.5) == pytest.approx(50)  # below the first point: proportional
    a = c.exponent
    assert 0.8 < a < 0.9 and c.at(8) == pytest.approx(180 * 4**a)
    assert Curve([1, 2], [100.0, 250.0]).at(4) == pytest.approx(500)  # super-linear capped at linear
    assert Curve([1, 2], [100.0, 90.0]).at(8) == pytest.approx(90)  # no gain stays no gain
    assert c.cores_for(180) == 2 and c.cores_for(181) == 3 and Curve([1], [0.0]).cores_for(1, limit=8) is None


def test_a_gpu_node_is_fed_by_its_share_of_the_cores():
    m = Measured(loaders={"slow": Curve([1, 2], [100.0, 200.0]), "fast": Curve([1, 2], [300.0, 600.0])})
    t = Target(gpus=8, cores_per_node=64, gpu_rate=1000.0)  # 8 cores per GPU
    slow, fast = predict(m, t, "slow"), predict(m, t, "fast")
    assert slow["loader_ips"] == pytest.approx(800) and slow["bound"] == "input"
    assert slow["per_gpu_ips"] == pytest.approx(800) and slow["total_ips"] == pytest.approx(6400)
    assert slow["cores_per_gpu_for_95"] == 10  # 950 img/s at 100 per core
    assert fast["bound"] == "compute" and fast["per_gpu_ips"] == 1000 and fast["cores_per_gpu_for_95"] == 4
    # storage shared by the node's GPUs caps them all
    m.storage_ips = {"fast": 4000.0}
    capped = predict(m, t, "fast")
    assert capped["bound"] == "storage" and capped["per_gpu_ips"] == pytest.approx(500)
    assert (
        predict(m, Target(gpus=8, cores_per_node=64, nodes=4, gpu_rate=1000.0), "slow")["total_ips"] == 25600
    )


def test_on_the_cpu_the_loader_and_the_model_take_turns():
    m = Measured(loaders={"a": Curve([1], [300.0])}, model=Curve([1], [600.0]))
    p = predict(m, Target(gpus=1, cores_per_node=1), "a")
    assert p["per_gpu_ips"] == pytest.approx(200) and p["bound"] == "input"  # 1 / (1/300 + 1/600)


@pytest.mark.slow
def test_bench_plan_measures_and_predicts(small_data, tmp_path):
    args = ["--data", str(small_data), "--loaders", "torch", "--batch-size", "16", "--image-size", "48"]
    p = bench(
        "plan", *args, "--model", "resnet50", "--gpus", "8", "--cores-per-node", "64", "--gpu-rate", "3000",
        "--steps", "6", "--out", str(tmp_path / "p"), cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    curve = doc["measured"]["loaders"]["torch"]
    assert curve["cores"] and curve["cores"][0] == 1 and all(v > 0 for v in curve["ips"])
    (row,) = doc["predictions"]
    assert row["loader"] == "torch" and row["cores_per_gpu"] == 8 and row["bound"] in ("input", "compute")
    assert row["per_gpu_ips"] <= 3000 and row["total_ips"] == pytest.approx(8 * row["per_gpu_ips"])
    assert doc["measured"]["model_on_cpu"] is None  # the GPU's rate was given
    assert (tmp_path / "p" / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "torch" in p.stdout and row["bound"] in p.stdout

    # a named GPU takes its published rate; unknown ones and impossible budgets are refused
    named = bench("plan", *args, "--model", "resnet50", "--gpu", "nope", cwd=tmp_path)
    assert named.returncode == 2 and "--gpu nope: no published rate for resnet50" in named.stderr
    many = bench("plan", *args, "--max-cores", "999", cwd=tmp_path)
    assert many.returncode == 2 and "--max-cores 999" in many.stderr


def test_a_remote_pool_feeds_a_gpu_until_the_trainer_or_the_gpu_binds():
    from bench.harness.plan import PoolCosts, advice, cpu_nodes_for, predict_pool

    # 10 ms of pool CPU per image (100 img/s per pool core); the trainer receives 2,000 img/s on a core
    m = Measured(pool=PoolCosts(pool_cpu_s=0.01, trainer_cpu_s=0.0005, bytes_per_image=600e3, images=64))
    t = Target(gpus=8, cores_per_node=64, gpu_rate=1000.0, cpu_nodes=2, cores_per_cpu_node=32)
    r = predict_pool(m, t)  # 64 pool cores for 8 GPUs: 8 each, 800 img/s
    assert r["pool_cores_per_gpu"] == 8 and r["bound"] == "pool" and r["per_gpu_ips"] == pytest.approx(800)
    assert r["cpu_nodes_for_95"] == 3  # 950 img/s x 8 GPUs x 10 ms = 76 cores: 3 nodes of 32
    assert predict_pool(m, t, cpu_nodes=3)["bound"] == "compute" and r["total_ips"] == pytest.approx(6400)
    assert "3 CPU node(s) of 32 cores" in advice([r], t)[r["loader"]]
    # a faster GPU: past 2,000 img/s the trainer's receiving binds, and more nodes stop paying
    fast = Target(gpus=8, cores_per_node=64, gpu_rate=5000.0, cpu_nodes=10, cores_per_cpu_node=32)
    assert predict_pool(m, fast)["bound"] == "trainer" and predict_pool(m, fast)["per_gpu_ips"] == 2000
    assert cpu_nodes_for(m, fast) == 5  # 1,900 x 8 x 10 ms = 152 cores
    assert predict_pool(m, fast, cpu_nodes=50)["per_gpu_ips"] == 2000
    # a 10 Gbit/s link carries 1.25e9 / 600e3 images/s for the node's 8 GPUs
    fast.network_gbps = 10.0
    assert predict_pool(m, fast)["bound"] == "network"
    assert predict_pool(m, fast)["per_gpu_ips"] == pytest.approx(1.25e9 / 600e3 / 8)
    # on the CPU the trainer's receiving and the model take turns on its core; the pool decodes apart
    m.model = Curve([1], [600.0])
    cpu = Target(gpus=1, cores_per_node=1, cpu_nodes=1, cores_per_cpu_node=1)
    assert (
        predict_pool(m, cpu)["per_gpu_ips"] == pytest.approx(100) and predict_pool(m, cpu)["bound"] == "pool"
    )
    assert predict_pool(m, cpu, cpu_nodes=10)["per_gpu_ips"] == pytest.approx(1 / (1 / 600 + 0.0005))


def test_a_pool_nodes_background_and_the_trainers_come_off_their_cores():
    from bench.harness.plan import PoolCosts, per_image_and_background, predict_pool

    # two epochs of 1,000 images: 2 ms per image and 0.25 core busy whatever the rate
    assert per_image_and_background((1000, 4.0, 3.0), (1000, 12.0, 5.0)) == pytest.approx((0.002, 0.25))
    assert per_image_and_background((1000, 4.0, 5.0), (1000, 12.0, 3.0)) == (0.005, 0.0)  # noise: per image
    m = Measured(
        pool=PoolCosts(0.01, 0.0005, 600e3, 64, pool_background=4.0, trainer_background=0.2),
        model=Curve([1], [600.0]),
    )
    t = Target(gpus=8, cores_per_node=64, gpu_rate=5000.0, cpu_nodes=2, cores_per_cpu_node=32)
    r = predict_pool(m, t)
    assert r["limits"]["pool"] == pytest.approx(2 * 28 / 8 / 0.01)  # 28 of each node's 32 cores decode
    assert r["limits"]["trainer"] == pytest.approx(0.8 / 0.0005)  # 0.8 of its core receives
    cpu = Target(gpus=1, cores_per_node=1, cpu_nodes=9, cores_per_cpu_node=1)
    assert predict_pool(m, cpu)["limits"]["trainer"] == pytest.approx(0.8 / (1 / 600 + 0.0005))


def test_pool_flags_are_checked():
    from argparse import Namespace

    from bench.errors import UsageError
    from bench.harness.plan import target_from

    base = dict(gpus=1, cores_per_node=16, nodes=1, gpu=None, gpu_rate=3000.0)
    t = target_from(Namespace(**base, cpu_nodes=4, cores_per_cpu_node=32, network_gbps=25.0), "resnet50")
    assert (t.cpu_nodes, t.cores_per_cpu_node, t.network_gbps, t.pool_cores_per_gpu) == (4, 32, 25.0, 128)
    for bad, says in (
        (dict(cpu_nodes=2, cores_per_cpu_node=0, network_gbps=None), "needs --cores-per-cpu-node"),
        (dict(cpu_nodes=0, cores_per_cpu_node=8, network_gbps=None), "give --cpu-nodes K too"),
        (dict(cpu_nodes=-1, cores_per_cpu_node=8, network_gbps=None), "--cpu-nodes must be >= 0"),
        (dict(cpu_nodes=1, cores_per_cpu_node=8, network_gbps=0.0), "--network-gbps must be > 0"),
    ):
        with pytest.raises(UsageError, match=says):
            target_from(Namespace(**base, **bad), "resnet50")


@pytest.mark.slow
def test_bench_plan_measures_a_ray_pool_and_plans_its_nodes(small_data, tmp_path):
    pytest.importorskip("ray.data")
    out = tmp_path / "p"
    p = bench(
        "plan", "--data", str(small_data), "--loaders", "torch", "--batch-size", "16", "--image-size", "48",
        "--model", "resnet50", "--gpu-rate", "3000", "--max-cores", "1", "--steps", "5",
        "--cpu-nodes", "2", "--cores-per-cpu-node", "8", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "plan.json").read_text())
    pool = doc["measured"]["ray_pool"]
    assert pool["pool_cpu_s"] > 0 and pool["trainer_cpu_s"] > 0 and pool["images"] > 0
    assert pool["pool_background"] >= 0 and pool["trainer_background"] >= 0
    assert {"pool/raylet", "trainer/raylet", "trainer/this process"} <= set(pool["detail"])
    # a GPU target: uint8 CHW batches cross to the trainer (its GPU normalises them)
    assert pool["bytes_per_image"] == 3 * 48 * 48 and pool["batches"] == "uint8"
    (row,) = [r for r in doc["predictions"] if r["loader"].startswith("ray pool")]
    assert row["pool_cores_per_gpu"] == 16 and row["cpu_nodes_for_95"] >= 1
    assert row["per_gpu_ips"] == pytest.approx(min(row["limits"].values()))
    assert "ray pool" in p.stdout and "CPU node(s)" in p.stdout


def test_a_named_gpu_gives_its_published_rate_and_source():
    from argparse import Namespace

    from bench.harness.plan import target_from

    args = Namespace(gpus=8, cores_per_node=64, nodes=2, gpu_rate=None, gpu="a100-80gb")
    t = target_from(args, "resnet50")
    assert t.gpu_rate == 2470 and "DeepLearningExamples" in t.gpu_source and t.cores_per_gpu == 8


def test_every_named_gpu_rate_names_its_source():
    for model, table in GPU_RATES.items():
        for name, (rate, source) in table.items():
            assert rate > 0 and len(source) > 40, (model, name)


def test_a_loader_that_takes_gpu_time_lowers_the_ceiling_it_reaches():
    # DALI-like: a fast loader whose GPU decode makes the model's step 1.3x longer
    m = Measured(loaders={"gpu-decode": Curve([16], [14000.0]), "cpu-decode": Curve([16], [5600.0])})
    t = Target(gpus=1, cores_per_node=16, gpu_rate=3740.0, gpu_cost={"gpu-decode": 1.3})
    p = predict(m, t, "gpu-decode")
    assert p["per_gpu_ips"] == pytest.approx(3740 / 1.3) and p["bound"] == "gpu shared"
    assert p["cores_per_gpu_for_95"] == 4  # 95 % of the lowered ceiling at 875 img/s per core
    assert predict(m, t, "cpu-decode")["bound"] == "compute"  # cost 1: the model's own rate
    # decode in the training process between steps: the times add up
    t.serial = {"gpu-decode": True}
    s = predict(m, t, "gpu-decode")
    assert s["per_gpu_ips"] == pytest.approx(1 / (1 / 14000 + 1.3 / 3740)) and s["bound"] == "gpu shared"
    from bench.harness.plan import advice

    assert "1.30x synthetic's" in advice([s], t)["gpu-decode"]


def _cuda_result(loader, compute_ms, options=None, loader_only=False):
    from tests.test_harness import fake_result

    r = fake_result(1000.0, loader)
    r.config.update(loader=loader, model="resnet50", device="cuda:0", loader_only=loader_only, batch_size=128)
    r.config.update(amp="bf16", channels_last=True, loader_options=options or {})
    r.metrics.compute_time_s = {"median": compute_ms / 1e3}
    return r


def test_gpu_costs_come_from_cuda_results_against_synthetic():
    from bench.harness.plan import gpu_costs

    runs = [
        _cuda_result("synthetic", 34.0),
        _cuda_result("synthetic", 34.2),
        _cuda_result("dali", 44.2, {"decode": "auto"}),  # its default decode: keyed by its name
        _cuda_result("torch", 34.4, {"decode": "gpu"}),
        _cuda_result("torch", 99.0, {"decode": "cpu"}, loader_only=True),  # trains no model: not a cost
    ]
    costs = gpu_costs(runs, "resnet50")
    assert set(costs) == {"dali", "torch decode=gpu"}
    assert (
        costs["dali"]["cost"] == pytest.approx(44.2 / 34.1)
        and "44.2 vs synthetic 34.1" in costs["dali"]["source"]
    )
    assert gpu_costs(runs, "resnet18") == {}  # another model's GPU time says nothing of this one


def test_gpu_cost_flags_are_checked():
    from argparse import Namespace

    from bench.errors import UsageError
    from bench.harness.plan import target_from

    base = dict(gpus=1, cores_per_node=16, nodes=1, gpu=None, measured=None)
    t = target_from(Namespace(**base, gpu_rate=3700.0, gpu_cost=["dali=1.3"]), "resnet50")
    assert t.gpu_cost == {"dali": 1.3} and t.gpu_cost_source == {"dali": "--gpu-cost"}
    for bad, says in ((["dali"], "expected NAME=RATIO"), (["dali=-1"], "must be > 0")):
        with pytest.raises(UsageError, match=says):
            target_from(Namespace(**base, gpu_rate=3700.0, gpu_cost=bad), "resnet50")
    with pytest.raises(UsageError, match="give --gpu-rate or --gpu"):
        target_from(Namespace(**base, gpu_rate=None, gpu_cost=["dali=1.3"]), "resnet50")


def test_the_planner_check_against_the_committed_h100_runs_reproduces():
    """reports/plan-gpu-h100 is what scripts/plan-gpu-check.py prints from the committed results."""
    import subprocess
    import sys

    from .conftest import REPO

    out = subprocess.run(
        [sys.executable, "scripts/plan-gpu-check.py"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (REPO / "reports/plan-gpu-h100/README.md").read_text().strip()
    assert "| dali decode=gpu | 13,871 | 1.33 |" in out.stdout
