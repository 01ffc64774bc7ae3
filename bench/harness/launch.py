"""Run `bench run` as a child process and pick up the result it wrote: what `bench sweep`,
`bench doctor` and `bench tune` are made of. A fresh process per trial, so no run inherits another's
workers, compiled graphs, DALI pipelines or FFCV thread settings."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import result as results
from .spec import RunSpec


@dataclass
class Trial:
    spec: RunSpec
    path: Path | None = None  # the result written, when it succeeded
    error: str | None = None  # the child's last error line otherwise
    seconds: float = 0.0
    result: results.Result | None = field(default=None, repr=False)


def run_trial(spec: RunSpec, out: Path, timeout: float = 900, env: dict | None = None) -> Trial:
    """``bench run`` of ``spec`` in a child, writing into OUT; the new result file there is the trial's."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.json"))
    cmd = [sys.executable, "-m", "bench.cli", "run", *dataclasses.replace(spec, out=str(out)).to_argv()]
    child_env = {**os.environ, **(env or {})}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a child under our launcher is not one of its ranks
        child_env.pop(var, None)
    start = time.perf_counter()
    trial = Trial(spec=spec)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        trial.error = f"did not finish within {timeout:.0f} s"
        trial.seconds = time.perf_counter() - start
        return trial
    trial.seconds = time.perf_counter() - start
    new = sorted(set(out.glob("*.json")) - before)
    if p.returncode != 0 or len(new) != 1:
        lines = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("bench: error")]
        trial.error = (errors or lines or [f"exit status {p.returncode}"])[-1].strip()[:500]
        # The ranks' output is the only account of why; a result it wrote before failing is not
        # the trial's (the run did not end cleanly), so it goes beside the log, out of the results.
        name = re.sub(r"[^\w.-]+", "_", spec.label or spec.loader)
        stem = f"failed-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        log = out.parent / "failed" / f"{stem}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text(f"$ {shlex.join(cmd)}\nexit status {p.returncode}\n\n{p.stdout}\n{p.stderr}")
        for path in new:
            path.rename(log.parent / f"{stem}-{path.name}")
        trial.error += f" (output: {log})"
        return trial
    trial.path = new[0]
    trial.result = results.load(new[0])
    return trial
