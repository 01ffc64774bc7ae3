"""`--cpus N`: the run (main process, workers, backend threads, every rank) is confined to N cores,
as the kernel reports it for every thread of every process, and a CPU-bound loader's rate follows N."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from loaders.contract import available_cores

from .conftest import available_backends, bench

ALLOWED = sorted(os.sched_getaffinity(0))
TINY = ["--batch-size", "16", "--image-size", "48", "--loader-only", "--warmup-steps", "2"]


def run_with(small_data, out: Path, *args, env=None) -> dict:
    before = set(out.glob("*.json")) if out.exists() else set()
    p = bench("run", "--data", str(small_data), "--out", str(out), *TINY, *args, cwd=out.parent, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    (new,) = set(out.glob("*.json")) - before
    return json.loads(new.read_text())


@pytest.fixture(scope="module")
def large_images(tmp_path_factory):
    """Few, large JPEGs: decoding dominates, so the loader is CPU-bound and shows the cores it has
    (960x720: at 640x480 the libjpeg-turbo pipeline finished 36 steps on 2 cores within one 0.5 s
    monitor interval, and the run had no CPU reading at all)."""
    from bench.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("large") / "data"
    generate(
        out, SynthSpec(classes=2, train_per_class=48, val_per_class=2, width=960, height=720), progress=False
    )
    return out


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 cores to show confinement and scaling")
def test_cpus_confines_the_main_process_and_workers_and_the_rate_follows(large_images, tmp_path):
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(2):  # alternating, fresh processes
        for n in (1, 2):
            r = run_with(
                large_images,
                tmp_path / "runs",
                "--cpus",
                str(n),
                "--workers",
                "2",
                "--persistent-workers",
                "--steps",
                "36",
            )
            res = r["metrics"]["resources"]
            assert r["config"]["cpus"] == n and r["config"]["cpu_cores"] == ALLOWED[:n]
            # every thread of the main process and of both workers, as the kernel reports it
            assert res["affinity_cores"] == ALLOWED[:n] and res["affinity_processes"] >= 3
            rates[n].append(r["metrics"]["images_per_second"])
            cpu[n].append(res["process_cpu_percent_mean"])
    print(f"\n[--cpus] CPU % {cpu}, images/s {rates}")
    assert max(cpu[1]) < 110, cpu  # one core: the whole tree never ran on more (sampling adds a little)
    assert statistics.median(cpu[2]) > 120, cpu  # two decode workers on two cores use both
    assert statistics.median(rates[2]) > 1.2 * statistics.median(rates[1]), rates


@pytest.mark.parametrize("loader", [b for b in ("dali", "ffcv") if b in available_backends()])
def test_cpus_bounds_the_backend_threads(small_data, tmp_path, loader):
    """DALI's and FFCV's threads live in the main process: they inherit its affinity and their
    default counts follow it. A fresh cache: FFCV converts in this very process (which once hung
    at exit under a narrowed affinity)."""
    r = run_with(
        small_data,
        tmp_path / "runs",
        "--loader",
        loader,
        "--cpus",
        "1",
        "--steps",
        "8",
        env={"LOADERBENCH_CACHE": str(tmp_path / "cache")},
    )
    assert r["metrics"]["resources"]["affinity_cores"] == ALLOWED[:1]
    threads = r["loader"]["num_threads" if loader == "dali" else "num_workers"]
    assert threads == 1


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs a core per rank")
def test_each_rank_gets_its_own_cores(small_data, tmp_path):
    r = run_with(small_data, tmp_path / "runs", "--cpu-ranks", "2", "--cpus", "1", "--steps", "6")
    assert r["config"]["world_size"] == 2 and r["config"]["cpu_cores"] == ALLOWED[:1]
    # core -> how many ranks were confined to it: two disjoint one-core slices
    assert r["config"]["cpu_cores_ranks"] == {str(ALLOWED[0]): 1, str(ALLOWED[1]): 1}


def test_more_cores_than_the_process_may_use_is_refused(small_data, tmp_path):
    n = available_cores() + 1
    p = bench("run", "--data", str(small_data), "--cpus", str(n), *TINY, "--steps", "6", cwd=tmp_path)
    assert p.returncode == 2
    assert f"--cpus {n} needs {n} cores; this process may use {available_cores()}" in p.stderr
    p = bench(
        "run",
        "--data",
        str(small_data),
        "--cpu-ranks",
        "2",
        "--cpus",
        str(available_cores()),
        *TINY,
        cwd=tmp_path,
    )
    assert p.returncode == 2 and f"2 ranks x --cpus {available_cores()} needs" in p.stderr
    assert not list(tmp_path.rglob("*.json"))  # nothing written
