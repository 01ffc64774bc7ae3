"""The harness itself: the ladder's figures, reports and plots, compare, doctor's verdict, tune's
choice, resource sampling, and a real (tiny) sweep in which a missing backend is skipped."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import report
from bench.harness.doctor import verdict
from bench.harness.launch import Trial
from bench.harness.monitor import ResourceMonitor
from bench.harness.result import new_result, save
from bench.harness.spec import RunSpec

from .conftest import bench


def fake_result(
    ips: float,
    label: str,
    *,
    wait=0.1,
    acc=0.5,
    eval_s=2.0,
    loader="torch",
    workers=0,
    epochs=None,
    loader_only=False,
) -> dict:
    return new_result(
        command=["bench", "run", "--label", label],
        config={
            "loader": loader,
            "model": "small",
            "label": label,
            "loader_options": {"num_workers": workers},
            "amp": "off",
            "channels_last": False,
            "compile": False,
            "world_size": 1,
            "batch_size": 64,
            "image_size": 224,
            "loader_only": loader_only,
            "epochs": 1,
            "warmup_steps": 5,
        },
        environment={
            "cpu": "test cpu",
            "cpu_count": 2,
            "gpus": [],
            "python": "3.11",
            "libraries": {"torch": "x"},
            "cuda": None,
            "git_commit": "abc",
            "git_dirty": False,
        },
        data={
            "train_samples": 1600,
            "classes": 10,
            "storage": {"source": "generated", "mean_width": 430, "mean_height": 373, "jpeg_quality": 90},
        },
        loader={},
        metrics={
            "images_per_second": ips,
            "data_wait_share": wait,
            "final_val_loss": 1.0,
            "final_val_accuracy": acc,
            "eval_seconds": [eval_s],
            "epochs": epochs or [],
            "step_time_s": {"median": 64 / ips},
            "resources": {"peak_rss_total_mib": 100.0, "process_cpu_percent_mean": 150.0},
        },
        samples={},
    )


def write_sweep(folder: Path, steps: list[tuple], ceilings: dict[str, list[float]], target=0.6) -> None:
    """steps: (key, kind, reference, kept, [ips...], extra fake_result kwargs)."""
    doc = {
        "schema": "loaderbench.sweep/1",
        "command": ["bench", "sweep"],
        "steps": [],
        "ceilings": {},
        "settings": {
            "model": "small",
            "trials": 2,
            "steps": 30,
            "warmup_steps": 5,
            "keep_all": False,
            "target_accuracy": target,
        },
    }
    for key, ips_list in ceilings.items():
        doc["ceilings"][key] = [
            str(save(fake_result(i, key, loader="synthetic"), folder / "runs").relative_to(folder))
            for i in ips_list
        ]
    for key, kind, ref, kept, ips_list, kw in steps:
        paths = [str(save(fake_result(i, key, **kw), folder / "runs").relative_to(folder)) for i in ips_list]
        doc["steps"].append(
            {
                "key": key,
                "title": key,
                "kind": kind,
                "status": "ok" if paths else "skipped",
                "reason": None if paths else "not installed",
                "results": paths,
                "reference": ref,
                "kept": kept,
                "ceiling": "c" if paths else None,
            }
        )
    (folder / "sweep.json").write_text(json.dumps(doc))


def test_ladder_figures_come_from_the_results(tmp_path):
    epochs = [
        {"epoch": 0, "train_seconds": 10.0, "eval_seconds": 1.0, "val_accuracy": 0.4},
        {"epoch": 1, "train_seconds": 10.0, "eval_seconds": 1.0, "val_accuracy": 0.7},
        {"epoch": 2, "train_seconds": 10.0, "eval_seconds": 1.0, "val_accuracy": 0.8},
    ]
    write_sweep(
        tmp_path,
        [
            ("baseline", "baseline", None, None, [100.0, 110.0, 90.0], {"eval_s": 4.0}),
            ("workers", "technique", "baseline", True, [150.0, 160.0], {}),
            ("amp", "technique", "workers", False, [120.0], {}),
            ("inference_eval", "eval", "workers", True, [155.0], {"eval_s": 1.0}),
            ("dali", "swap", "workers", False, [], {}),
            ("early_stop", "early_stop", "workers", True, [155.0], {"epochs": epochs}),
        ],
        ceilings={"c": [400.0, 500.0]},
    )
    rungs = {r.key: r for r in report.ladder(json.loads((tmp_path / "sweep.json").read_text()), tmp_path)}
    assert rungs["baseline"].ips == 100.0 and (rungs["baseline"].ips_min, rungs["baseline"].ips_max) == (
        90.0,
        110.0,
    )
    assert rungs["workers"].marginal == pytest.approx(155 / 100) and rungs[
        "workers"
    ].cumulative == pytest.approx(1.55)
    assert rungs["amp"].marginal == pytest.approx(120 / 155)  # against the kept step, not the baseline
    assert rungs["workers"].ceiling_pct == pytest.approx(155 / 450)
    assert rungs["inference_eval"].eval_speedup == pytest.approx(2.0 / 1.0)
    assert rungs["dali"].status == "skipped" and rungs["dali"].ips is None
    es = rungs["early_stop"]
    assert (es.time_to_target, es.target_epoch, es.full_time) == (22.0, 2, 33.0)


def test_report_writes_markdown_and_plots(tmp_path):
    write_sweep(
        tmp_path,
        [
            ("baseline", "baseline", None, None, [100.0], {}),
            ("workers", "technique", "baseline", True, [200.0], {"workers": 2}),
        ],
        ceilings={"c": [400.0]},
    )
    for w, ips in ((1, 120.0), (4, 260.0)):  # e.g. bench tune's runs in the same folder
        save(fake_result(ips, "tune", workers=w, loader_only=True), tmp_path / "runs")
    path = report.render(tmp_path, "T")
    text = path.read_text()
    assert text.startswith("# T")
    assert "| workers | workers | 200.0 (200.0-200.0, 1) | 2.00x | 2.00x | 10% | 50% |" in text
    for png in ("speedup.png", "data-wait-and-ceiling.png", "workers.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{png}]({png})" in text


def test_report_of_an_empty_or_missing_folder_is_a_clear_error(tmp_path):
    p = bench("report", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and "no result files" in p.stderr
    p = bench("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert p.returncode == 2 and "folder not found" in p.stderr


def test_compare_two_runs(tmp_path):
    a = save(fake_result(100.0, "x", wait=0.4, acc=0.5), tmp_path / "a")
    b = save(fake_result(250.0, "x", wait=0.1, acc=0.5), tmp_path / "b")
    rows = {r["metric"]: r for r in report.compare(a, b)}
    assert rows["images/s"]["ratio"] == pytest.approx(2.5)
    assert rows["data-wait share"]["ratio"] == pytest.approx(0.25)
    assert rows["val accuracy"]["ratio"] == pytest.approx(1.0)
    # folders: matched by label, medians of trials
    save(fake_result(300.0, "x"), tmp_path / "b")
    save(fake_result(50.0, "only-in-b"), tmp_path / "b")
    rows = [r for r in report.compare(tmp_path / "a", tmp_path / "b") if r["metric"] == "images/s"]
    assert [(r["group"], r["ratio"]) for r in rows] == [("x", pytest.approx(2.75))]
    p = bench("compare", str(a), str(b), cwd=tmp_path)
    assert p.returncode == 0 and "2.500" in p.stdout


def test_doctor_verdicts():
    text, tries = verdict(
        "torch",
        ceiling=1000,
        end_to_end=300,
        loader_only=320,
        data_wait=0.6,
        alternatives={"dali": 900.0, "wds": 330.0},
        cuda=True,
        amp="off",
        workers=2,
        cores=16,
    )
    assert "INPUT-BOUND by 3.1x" in text
    assert tries[0].startswith("--loader dali: 900.0 img/s") and "more workers: 2 of 16" in tries[1]
    assert not any("wds" in t for t in tries)  # within 10%: not worth a swap
    text, tries = verdict(
        "torch",
        ceiling=200,
        end_to_end=150,
        loader_only=600,
        data_wait=0.02,
        alternatives={},
        cuda=False,
        amp="off",
        workers=2,
        cores=2,
    )
    assert "COMPUTE-BOUND" in text and tries[0].startswith("--amp bf16")


def test_tune_picks_the_fastest_measured_setting(tmp_path, monkeypatch):
    import bench.harness.tune as tune

    def fake(spec, out, **kw):
        w, pf = spec.options.num_workers, spec.options.prefetch_factor or 2
        ips = 100.0 * min(max(w, 1), 4) + (30.0 if pf == 4 else 0.0)  # best: 4+ workers, prefetch 4
        return Trial(spec=spec, path=out / "x.json", result=fake_result(ips, spec.label))

    monkeypatch.setattr(tune, "run_trial", fake)
    doc = tune.tune(RunSpec(steps=10), tmp_path, ["bench", "tune"], max_workers=8, log=lambda *a: None)
    assert doc["best_options"] == {"num_workers": 4, "prefetch_factor": 4} and doc["best_ips"] == 430.0
    assert doc["best_args"] == ["-o", "num_workers=4", "-o", "prefetch_factor=4"]
    assert tune.candidates(8, with_zero=True) == [0, 1, 2, 4, 8, 12]
    assert json.loads((tmp_path / "tune.json").read_text())["best_ips"] == 430.0


def test_resource_monitor_sees_worker_memory_and_cpu():
    mon = ResourceMonitor(interval=0.1).start()
    child = subprocess.Popen(
        [sys.executable, "-c", "b = bytearray(300 * 2**20); import time; time.sleep(1.5)"]
    )
    end = time.monotonic() + 1.2
    while time.monotonic() < end:
        sum(range(10000))  # keep this process busy
    child.wait()
    s = mon.stop()
    assert s["child_processes"] >= 1 and s["peak_rss_children_mib"] > 250
    assert s["peak_rss_main_mib"] > 10 and s["process_cpu_percent_mean"] > 20
    assert s["gpu_util_percent_mean"] is None  # no GPU asked for


@pytest.mark.slow
def test_a_tiny_sweep_skips_a_missing_backend_and_reports(small_data, tmp_path, monkeypatch):
    from bench.harness.sweep import Settings, Sweep
    from loaders import registry

    fake = copy.copy(registry.BACKENDS["dali"])
    object.__setattr__(fake, "requires", ("no_such_module_xyz",))
    monkeypatch.setitem(registry.BACKENDS, "dali", fake)
    spec = RunSpec(
        data=str(small_data), batch_size=16, image_size=48, steps=6, warmup_steps=2, storage="cold"
    )
    s = Settings(spec=spec, trials=1, workers=1, techniques=("workers", "dali"))
    out = tmp_path / "sw"
    Sweep(s, out, ["bench", "sweep"], log=lambda *a: None).run()
    doc = json.loads((out / "sweep.json").read_text())
    steps = {st["key"]: st for st in doc["steps"]}
    assert steps["baseline"]["status"] == "ok" and steps["workers"]["status"] == "ok"
    assert steps["dali"]["status"] == "skipped" and "not installed" in steps["dali"]["reason"]
    # --storage cold reaches every step: each evicted the data before its epoch, and says so
    measured = [r for r in report.results_in(out).values() if r.config["loader"] != "synthetic"]
    assert len(measured) >= 2
    for r in measured:
        assert r.config["storage"] == "cold" and r.metrics.storage["epochs"][0]["resident_after"] < 0.05
    text = report.render(out).read_text()
    assert "| dali | loader swap: dali | skipped:" in text
    with pytest.raises(Exception, match="already holds a sweep"):
        Sweep(s, out, ["bench", "sweep"], log=lambda *a: None).run()


def test_report_command_line_records_the_producing_command(tmp_path):
    save(fake_result(100.0, "a"), tmp_path / "runs")
    p = bench("report", str(tmp_path), "--title", "T", "--command", "bash scripts/x.sh", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# T") and "bash scripts/x.sh" in text


SWEEP_ARGS = [
    *("--batch-size", "16", "--image-size", "48", "--steps", "6", "--warmup-steps", "2"),
    *("--trials", "2", "--techniques", "workers,amp", "--keep-all", "--ranks", "1", "--workers", "1"),
]


def plan_of(doc: dict) -> list:
    """What a sweep decided to run, without what it measured."""
    keys = ("key", "kind", "status", "argv", "reference", "kept", "ceiling")
    return [{k: st[k] for k in keys} for st in doc["steps"]] + sorted(doc["ceilings"])


@pytest.mark.slow
def test_a_sweep_killed_midway_resumes_to_the_same_plan(small_data, tmp_path, monkeypatch):
    import os
    import signal

    from bench.cli import main
    from bench.harness import sweep as sweep_module
    from bench.harness.result import load

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "bench.cli",
        "sweep",
        "--data",
        str(small_data),
        *SWEEP_ARGS,
        "--out",
        str(out),
    ]
    p = subprocess.Popen(
        cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline, before = time.monotonic() + 240, []
    while time.monotonic() < deadline and p.poll() is None:
        try:  # written atomically: a reader never sees half a file
            doc = json.loads((out / "sweep.json").read_text())
        except FileNotFoundError:
            doc = {"steps": [], "ceilings": {}}
        before = [r for st in doc["steps"] for r in st["results"]] + [
            r for rs in doc["ceilings"].values() for r in rs
        ]
        if len(before) >= 3:
            break
        time.sleep(0.1)
    assert p.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGKILL)  # the machine going away: the sweep and its trial, no clean-up
    p.wait()
    assert 3 <= len(before) < 8

    got = bench("sweep", "--resume", str(out), cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "kept from before" in got.stdout
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["resumed"] and doc["command"][:2] == ["bench", "sweep"] and "--resume" not in doc["command"]
    for st in doc["steps"]:
        assert st["status"] == "ok" and len(st["results"]) == 2, st
    assert [len(v) for v in doc["ceilings"].values()] == [1, 1]
    every = [r for st in doc["steps"] for r in st["results"]] + [
        r for v in doc["ceilings"].values() for r in v
    ]
    assert set(before) <= set(every) and len(set(every)) == len(every) == 8  # nothing run twice
    for rel in every:
        load(out / rel)
    assert (out / "README.md").exists()

    # The same sweep uninterrupted (trials faked: the plan does not depend on the figures with --keep-all)
    def fake_trial(spec, runs, timeout=900, env=None):
        path = save(fake_result(100.0, spec.label), runs)
        return Trial(spec=spec, path=path, result=load(path))

    monkeypatch.setattr(sweep_module, "run_trial", fake_trial)
    assert main(["sweep", "--data", str(small_data), *SWEEP_ARGS, "--out", str(tmp_path / "whole")]) == 0
    assert plan_of(doc) == plan_of(json.loads((tmp_path / "whole" / "sweep.json").read_text()))

    extra = bench("sweep", "--resume", str(out), "--trials", "3", cwd=tmp_path)
    assert extra.returncode == 2 and "drop --trials 3" in extra.stderr
    missing = bench("sweep", "--resume", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "no readable sweep.json" in missing.stderr


def test_a_failed_trial_keeps_its_output_and_no_result(tmp_path):
    """A trial whose `bench run` fails: one error line, and the ranks' whole output kept in a log
    beside the results (a sweep's report has nothing else to say why)."""
    from bench.harness.launch import run_trial
    from bench.harness.spec import RunSpec

    runs = tmp_path / "runs"
    spec = RunSpec(data=str(tmp_path / "no-such-data"), steps=8, label="bad label/1")
    t = run_trial(spec, runs, timeout=120)
    assert t.path is None and t.error.startswith("bench: error") and "output: " in t.error
    (log,) = (tmp_path / "failed").glob("failed-bad_label_1-*.log")
    assert str(log) in t.error
    text = log.read_text()
    assert "exit status 2" in text and text.count("no-such-data") >= 2  # the command and the error
    assert not list(runs.glob("*.json"))
