"""A backend plugs in with its own module and one registry line (tests/toy_backend.py, named in
LOADERBENCH_BACKENDS by conftest): the conformance suite picks it up from the registry, and
`bench run`, `bench tune` and a `bench sweep` swap take it through its own knobs. And the layering
holds: no backend module imports another."""

from __future__ import annotations

import ast
import json

import pytest

from loaders import backends, get_backend

from .conftest import REPO, bench


def test_the_toy_is_registered_from_the_environment():
    toy = get_backend("toy")
    assert toy.installed and toy.knobs["workers"] == "threads"
    assert "toy" in [b.name for b in backends()]


@pytest.mark.slow
def test_toy_through_bench_run_tune_and_a_sweep_swap(small_data, tmp_path):
    common = ["--data", str(small_data), "--batch-size", "16", "--image-size", "48"]
    p = bench(
        "run",
        "--loader",
        "toy",
        "--workers",
        "2",
        "--steps",
        "6",
        "--warmup-steps",
        "2",
        *common,
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    (result,) = (tmp_path / "run").glob("*.json")
    r = json.loads(result.read_text())
    assert r["config"]["loader"] == "toy" and r["config"]["loader_options"] == {"threads": 2, "ahead": 2}
    assert r["metrics"]["images_per_second"] > 0 and r["metrics"]["final_val_accuracy"] is not None

    p = bench(
        "tune",
        "--loader",
        "toy",
        "--steps",
        "6",
        "--max-workers",
        "2",
        *common,
        "--out",
        str(tmp_path / "tune"),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    tune = json.loads((tmp_path / "tune" / "tune.json").read_text())
    tried = [t["options"] for t in tune["tried"]]
    assert {"threads": 1} in tried and {"threads": 2} in tried and any("ahead" in t for t in tried)
    assert set(tune["best_options"]) <= {"threads", "ahead"}

    p = bench(
        "sweep",
        "--techniques",
        "workers,toy",
        "--steps",
        "6",
        "--warmup-steps",
        "2",
        "--trials",
        "1",
        "--ceiling-trials",
        "0",
        "--workers",
        "2",
        *common,
        "--out",
        str(tmp_path / "sweep"),
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    steps = {s["key"]: s for s in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["steps"]}
    assert steps["toy"]["status"] == "ok" and "-o" in steps["toy"]["argv"]
    assert "threads=2" in steps["toy"]["argv"]  # the ladder's workers, through the toy's own knob
    assert "| toy | loader swap: toy |" in (tmp_path / "sweep" / "README.md").read_text()


def test_no_backend_module_imports_another():
    modules = {type(b).__module__ for b in backends() if type(b).__module__.startswith("loaders.")}
    assert {"loaders.pytorch", "loaders.dali", "loaders.ffcv", "loaders.wds", "loaders.synthetic"} <= modules
    for module in modules:
        path = REPO / (module.replace(".", "/") + ".py")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [f"loaders.{base}" if node.level else base]
                names += [f"loaders.{a.name}" for a in node.names if node.level and not base]
                imported |= set(names)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not (imported & (modules - {module})), f"{module} imports {imported & (modules - {module})}"
