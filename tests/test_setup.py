"""The set-up rule: the README opens with the two commands, and CI runs the README's test command."""

from __future__ import annotations

import re

from .conftest import REPO


def readme_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README has no command block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_opens_with_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert all(c.startswith("bash scripts/setup.sh && ") for c in cmds)
    assert "bench run" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = [
        ln
        for ln in (REPO / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci == [readme_commands()[1]]


def test_setup_refuses_a_disk_too_small_before_installing_anything(tmp_path):
    import os
    import shutil
    import subprocess

    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "df").write_text(
        "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        "echo '/dev/vda 1000000 990000 512000 99% /'\n"
    )
    (fake / "df").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "500 MiB free" in out.stderr and "7 GiB" in out.stderr, out.stderr
    assert not (tmp_path / ".venv").exists()  # nothing half-made
