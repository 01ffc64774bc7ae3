"""Repeat the two races that failed CI and count the runs that end wrong.

  .venv/bin/python scripts/stress-exits.py ctrl-c [N]     # Ctrl-C just as DataLoader workers start
  .venv/bin/python scripts/stress-exits.py ddp-exit [N]   # 2 gloo ranks (ffcv) exiting after all-reduces

ctrl-c: `bench run` (one process, 2 workers) gets SIGINT on its process group 0-5 ms after a new
worker appears (workers restart every epoch); right is exit 130 with `bench: interrupted` as the
last line of stderr. ddp-exit: a short `bench run --loader ffcv --cpu-ranks 2`; right is exit 0
(a gloo thread releasing a tensor during shutdown aborted a rank). Wrong runs' stderr is kept under
the work folder printed at the end. Figures, not a test: the races are timing-dependent.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.data.synth import SynthSpec, generate


def ctrl_c(data: Path, work: Path, i: int) -> tuple[bool, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.cli",
            "run",
            "--steps",
            "2000",
            "--warmup-steps",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--data",
            str(data),
            "-o",
            "num_workers=2",
            "--out",
            str(work / f"r{i}"),
        ],
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # as a terminal's foreground job: a background start may have it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    me = psutil.Process(proc.pid)
    seen: set[int] = set()
    armed_at = None
    while True:
        now = {c.pid for c in me.children()}
        if armed_at is None and len(now) >= 2:
            armed_at = time.monotonic() + random.uniform(0.5, 4.0)
        if armed_at is not None and time.monotonic() > armed_at and now - seen:
            break
        seen |= now
        time.sleep(0.0005)
    time.sleep(random.uniform(0, 0.005))
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        err += "\n(still running 60 s after the Ctrl-C)"
    lines = err.strip().splitlines()
    return proc.returncode == 130 and bool(lines) and lines[-1].startswith("bench: interrupted"), err


def ddp_exit(data: Path, work: Path, i: int) -> tuple[bool, str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cli",
            "run",
            "--loader",
            "ffcv",
            "--data",
            str(data),
            "--steps",
            "10",
            "--warmup-steps",
            "3",
            "--batch-size",
            "16",
            "--image-size",
            "64",
            "-o",
            "num_workers=1",
            "--cpu-ranks",
            "2",
            "--out",
            str(work / f"r{i}"),
        ],
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc.returncode == 0, proc.stderr


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("ctrl-c", "ddp-exit"):
        print(__doc__, file=sys.stderr)
        return 2
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    work = Path(tempfile.mkdtemp(prefix=f"stress-{mode}-"))
    data = work / "small"  # the tests' small set: 20 steps per epoch at batch 8
    generate(
        data,
        SynthSpec(classes=4, train_per_class=40, val_per_class=12, width=200, height=150),
        progress=False,
    )
    env_free = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    os.environ.clear()
    os.environ.update(env_free)
    wrong = 0
    for i in range(n):
        ok, err = (ctrl_c if mode == "ctrl-c" else ddp_exit)(data, work, i)
        if not ok:
            wrong += 1
            (work / f"wrong{i}.txt").write_text(err)
        print(f"{i + 1}/{n} {'ok' if ok else 'WRONG'}", flush=True)
    print(f"{mode}: {wrong} of {n} runs ended wrong (stderr of each under {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
