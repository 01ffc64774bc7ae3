"""The tree stays formatted and lint-clean (ruff, configured in pyproject.toml): CI runs it here."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import REPO


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(REPO / ".venv" / "bin")) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: scripts/setup.sh installs it with the dev extra")
    return [exe]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
    p = subprocess.run(_ruff() + args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
