"""Who this process is in a multi-process job: torchrun's variables, or SLURM's when srun started it.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. ``srun``
starts every task itself and sets SLURM_PROCID (global rank), SLURM_NTASKS (world size),
SLURM_LOCALID (rank on the node), SLURM_NODEID and SLURM_TASKS_PER_NODE; the job script sets
MASTER_ADDR (the first node) and may set MASTER_PORT. ``torch_env()`` gives torchrun's names for
either, so ``init_process_group()``'s default env:// method works under both.
"""

from __future__ import annotations

import os
import re
import sys

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """A launcher's variables that cannot start a process group: one line naming the variable."""


def under_srun(environ=os.environ) -> bool:
    """A task of a job step with several tasks. The batch script itself and an salloc shell also
    carry SLURM_PROCID and SLURM_NTASKS (of the allocation), but no numeric step id: there, one
    ``bench run`` is one process and may launch its own ranks."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    return (
        "SLURM_PROCID" in environ
        and int(environ.get("SLURM_NTASKS", 1)) > 1
        and step.isdigit()
        and int(step) < 0xFFFFFFF0  # Slurm's batch, extern and interactive steps use the top ids
    )


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ("2(x3),1") as one count per node: [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LaunchError(f"SLURM_TASKS_PER_NODE={spec!r}: not Slurm's 'N(xM),...' form")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def torch_env(environ=os.environ) -> dict[str, str]:
    """torchrun's variables for this process ({} when neither torchrun nor srun started it)."""
    if "WORLD_SIZE" in environ or not under_srun(environ):  # torchrun (or the user) said so: theirs
        return {k: environ[k] for k in TORCHRUN if k in environ}
    node = int(environ.get("SLURM_NODEID", 0))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE"))
    local_world = tasks_per_node(per_node)[node] if per_node else 1
    # A port per job (as Lightning picks it), so two jobs sharing a node do not collide.
    port = environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000)
    env = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_PORT": port,
    }
    if "MASTER_ADDR" in environ:
        env["MASTER_ADDR"] = environ["MASTER_ADDR"]
    return env


def adopt(environ=os.environ) -> dict[str, str]:
    """Set torchrun's variables from srun's in ``environ`` (the process's own by default) and
    return them; a no-op under torchrun or outside a launcher. Under srun without MASTER_ADDR, a
    LaunchError saying how to set it (the ranks could not find each other)."""
    env = torch_env(environ)
    if env and "MASTER_ADDR" not in env and int(env["WORLD_SIZE"]) > 1:
        raise LaunchError(
            "srun started this task but MASTER_ADDR is not set; export it in the job script, e.g. "
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        )
    for key, value in env.items():
        environ.setdefault(key, value)
    return env


def is_rank(environ=os.environ) -> bool:
    """One process of a multi-process job (torchrun's or srun's)."""
    return int(torch_env(environ).get("WORLD_SIZE", 1)) > 1


def exit_now(code: int = 0):
    """End a rank without the interpreter's teardown: exit handlers run and output is flushed, then
    the process ends at once. Teardown ends any thread that takes the GIL after it has begun by
    unwinding it through C++ frames that forbid it (gloo's workers releasing a collective's tensors,
    FFCV's pipeline thread leaving numba code), and the rank aborts after its work is done (SIGABRT,
    "terminate called without an active exception"; ffcv on 2 gloo ranks, now and then)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
