"""`bench run` end to end, as a user types it: it trains, prints a table and writes one valid
result of record; the 2-rank CPU run (torchrun + gloo) works; the default dataset is generated
once and reused."""

from __future__ import annotations

import json

import pytest

from bench.harness.result import SCHEMA, load

from .conftest import available_backends, bench

ARGS = ("--steps", "10", "--warmup-steps", "3", "--batch-size", "16", "--image-size", "64")


def one_result(folder):
    paths = list(folder.glob("*.json"))
    assert len(paths) == 1, paths
    return load(paths[0])


LOADERS = [("torch", ("--workers", "2")), ("synthetic", ())]
if "dali" in available_backends():
    LOADERS.append(("dali", ("-o", "num_threads=2")))
if "wds" in available_backends():
    LOADERS.append(("wds", ("--workers", "2")))


@pytest.mark.parametrize("loader,extra", LOADERS)
def test_run_writes_a_result_of_record(small_data, tmp_path, loader, extra):
    out = bench(
        "run",
        "--loader",
        loader,
        "--data",
        str(small_data),
        *ARGS,
        *extra,
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = one_result(tmp_path / "r")
    m, c = res.metrics, res.config
    assert res.schema == SCHEMA and res.status == "ok"
    assert c["loader"] == loader and c["world_size"] == 1 and c["image_size"] == 64
    assert m.steps == 10 and m.measured_images == 7 * 16
    assert m.images_per_second == pytest.approx(m.measured_images / m.measured_seconds)
    assert 0 <= m.data_wait_share <= 1
    assert m.final_val_accuracy is not None and 0 <= m.final_val_accuracy <= 1
    assert len(res.samples["step_time_s"]) == 7
    assert res.data["storage"]["source"] == "generated" and res.data["storage"]["jpeg_quality"] == 90
    assert res.environment["libraries"]["torch"] and res.environment["cpu_count"]
    assert "images/s" in out.stdout and "step time median [p10, p90]" in out.stdout
    v = m.verdict  # recorded, and printed as the last two lines, the next command with this run's settings
    assert v["kind"] == ("ceiling" if loader == "synthetic" else v["kind"]) and v["next"].startswith("bench ")
    assert out.stdout.rstrip().splitlines()[-2] == v["text"]
    assert out.stdout.rstrip().splitlines()[-1].startswith(f"next: {v['next']}")
    assert f"--data {small_data}" in v["next"] and "--batch-size 16" in v["next"]


def test_quiet_run_records_the_verdict_and_prints_none(small_data, tmp_path):
    out = bench(
        "run", "--data", str(small_data), *ARGS, "--quiet", "--out", str(tmp_path / "r"), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert one_result(tmp_path / "r").metrics.verdict["text"].startswith("verdict: ")
    assert "verdict" not in out.stdout and "next:" not in out.stdout


def test_results_are_never_overwritten(small_data, tmp_path):
    for _ in range(2):
        out = bench(
            "run",
            "--loader",
            "synthetic",
            "--data",
            str(small_data),
            *ARGS,
            "--no-eval",
            "--out",
            str(tmp_path / "r"),
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    paths = sorted((tmp_path / "r").glob("*.json"))
    assert len(paths) == 2 and all(load(p) for p in paths)
    assert not list((tmp_path / "r").glob(".*"))  # no temporaries left behind


RANKED = [("torch", ("--workers", "1"))] + [case for case in LOADERS if case[0] == "dali"]
if "ffcv" in available_backends():
    RANKED.append(("ffcv", ("-o", "num_workers=1")))
if "wds" in available_backends():
    RANKED.append(("wds", ("--workers", "1")))


@pytest.mark.parametrize("loader,extra", RANKED)
def test_two_cpu_ranks_through_torchrun(small_data, tmp_path, loader, extra):
    out = bench(
        "run",
        "--loader",
        loader,
        "--data",
        str(small_data),
        *ARGS,
        *extra,
        "--cpu-ranks",
        "2",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = one_result(tmp_path / "r")  # rank 0 alone writes it
    assert res.config["world_size"] == 2
    assert res.metrics.measured_images == 2 * 7 * 16  # both ranks' images
    assert res.loader["num_samples_per_rank"] == 160 // 2 and res.loader["padding"] == 0


@pytest.mark.slow
def test_default_dataset_generated_once_then_reused(tmp_path, tmp_cache):
    """The README's main command, shortened: no --data generates the default set into the cache."""
    out = bench(
        "run",
        "--steps",
        "7",
        "--warmup-steps",
        "2",
        "--no-eval",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
        env={"LOADERBENCH_CACHE": str(tmp_cache)},
        timeout=500,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (cached,) = tmp_cache.glob("synth-*")
    manifest = json.loads((cached / "synth.json").read_text())
    assert manifest["images"] == {"train": 1600, "val": 400}
    stamp = (cached / "synth.json").stat().st_mtime_ns
    again = bench(
        "run",
        "--loader",
        "synthetic",
        "--steps",
        "7",
        "--warmup-steps",
        "2",
        "--no-eval",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
        env={"LOADERBENCH_CACHE": str(tmp_cache)},
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generating" not in again.stderr
    assert (cached / "synth.json").stat().st_mtime_ns == stamp
    res = [load(p) for p in (tmp_path / "r").glob("*.json")]
    assert {r.data["train"] for r in res} == {str(cached / "train")}


def test_loader_only_measures_the_loader_without_a_model(small_data, tmp_path):
    out = bench(
        "run",
        "--loader-only",
        "--data",
        str(small_data),
        *ARGS,
        "--workers",
        "1",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = one_result(tmp_path / "r")
    m = res.metrics
    assert res.config["loader_only"] is True
    assert m.measured_images == 7 * 16 and m.images_per_second > 0
    assert m.final_train_loss is None and m.final_val_accuracy is None
    assert m.data_wait_share == pytest.approx(1.0)
