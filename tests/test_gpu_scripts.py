"""The GPU lease's scripts, rehearsed on the CPU: every step runs (tiny sizes) or, where it needs
CUDA, its command line is parsed and checked; $OUT is packed within the device's limits; a second
call resumes from the first one's tarball. A GPU minute is never spent on what fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_steps  # noqa: E402


def _rehearse(script: str, out, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", f"scripts/{script}", "--rehearse", *extra], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def _check_out(out, plan: str) -> dict:
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["README.md", "log.txt", f"{plan}.tar.gz"]), files  # <= 8 come back
    assert all(p.stat().st_size < gpu_steps.MAX_FILE_BYTES for p in out.iterdir())
    with tarfile.open(out / f"{plan}.tar.gz") as tar:
        names = tar.getnames()
        status = json.load(tar.extractfile("steps.json"))
    return {"names": names, "status": status, "readme": (out / "README.md").read_text()}


@pytest.mark.slow
def test_the_evidence_script_rehearses_packs_and_resumes(tmp_path):
    out = tmp_path / "out"
    first = _rehearse("gpu-evidence.sh", out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    steps = gpu_steps.evidence_plan()
    got = _check_out(out, "evidence")
    for s in steps:  # every step ran (or its stand-in passed), and the report names it
        assert got["status"][s.label]["status"] in ("ok", "rehearsed"), (s.label, got["status"][s.label])
        assert f"| {s.label} | " in got["readme"]
    ran = gpu_steps.run_in_rehearsal(steps)  # one per command shape; the rest parsed and checked
    assert {"r50-16c-torch", "r50-16c-ffcv", "r50-16c-wds", "r50-16c-spdl"} <= ran
    assert sum(n.endswith(".json") and n.startswith("runs/") for n in got["names"]) == len(ran)
    # the expected seconds, printed, fit one 8-minute command
    total = gpu_steps.SETUP_S["evidence"] + sum(s.expected_s for s in steps)
    assert f"expected {total:.0f} s in all" in first.stdout and total < gpu_steps.BUDGET_S
    assert (
        "REHEARSAL on the CPU" in got["readme"] and "not measured" in got["readme"]
    )  # no energy without a GPU
    # a second call given the first one's tarball keeps what was measured
    again = _rehearse("gpu-evidence.sh", tmp_path / "out2", "--resume", str(out / "evidence.tar.gz"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("kept from evidence.tar.gz") == len(ran)
    assert "bench run" not in again.stdout.split("generating")[-1].replace(
        "rehearsed", ""
    )  # nothing run again


@pytest.mark.slow
def test_the_dali_script_rehearses_every_setting_it_sweeps(tmp_path):
    out = tmp_path / "out"
    proc = _rehearse("gpu-dali.sh", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    got = _check_out(out, "dali")
    steps = gpu_steps.dali_plan()
    assert all(got["status"][s.label]["status"] in ("ok", "rehearsed") for s in steps), got["status"]
    assert (
        "## Profiles" in got["readme"] and "steps on the CPU" in got["readme"]
    )  # the profiled synthetic run
    swept = " ".join(" ".join(s.argv) for s in steps)
    for option in ("hw_decoder_load=0.65", "hw_decoder_load=1.0", "device_memory_padding=211025920",
                   "preallocate_height_hint=6430", "antialias=false", "decode=cpu", "--profile-steps"):  # fmt: skip
        assert option in swept
    total = gpu_steps.SETUP_S["dali"] + sum(s.expected_s for s in steps)
    assert total < gpu_steps.BUDGET_S


def test_a_stand_in_catches_what_would_fail_on_the_gpu():
    good = [
        "--loader",
        "dali",
        "-o",
        "decode=gpu",
        "-o",
        "hw_decoder_load=0.9",
        "--model",
        "resnet50",
        "--steps",
        "8",
    ]
    assert "hw_decoder_load=0.9" in gpu_steps.stand_in(good)
    for bad, says in (
        (["--loader", "dali", "-o", "hw_decoder_lod=0.9"], "hw_decoder_lod"),  # a typo in an option
        (["--loader", "torch", "--model", "resnet05"], "resnet05"),  # a typo in a model
        (["--loader", "torch", "--cpus", "999"], "999"),  # more cores than the machine
    ):
        with pytest.raises(Exception, match=says):
            gpu_steps.stand_in(bad)


def test_out_is_checked_against_what_comes_back(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}").write_text("x")
    assert gpu_steps.check_out(tmp_path) == [f"9 files under {tmp_path}: at most 8 come back"]
