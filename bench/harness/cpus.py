"""`--cpus N`: confine a run (every thread of every process of every rank) to N cores.

The affinity is set on every thread of the process before any worker or backend thread starts,
so DataLoader workers, DALI's and FFCV's threads and torch's intra-op pool inherit it; torch's and
OpenMP's thread counts and the backends' default worker and thread counts follow it. With several
ranks on a node each gets its own N cores: rank r of a node takes the r-th slice of the cores the
launcher may use. Cores are logical CPUs in the kernel's order (on SMT machines Linux usually
numbers one thread of every physical core first, so a small N gets distinct physical cores).
"""

from __future__ import annotations

import os

from ..errors import UsageError


def allowed() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def describe(cores: list[int]) -> str:
    """0-3,8 style, as taskset prints them."""
    parts, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            parts.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts)


def check(cpus: int, ranks_per_node: int) -> None:
    """Whether ``ranks_per_node`` slices of ``cpus`` cores fit in what this process may use."""
    if cpus < 0:
        raise UsageError(f"--cpus must be >= 1 (0: every core), got {cpus}")
    have = allowed()
    if cpus * ranks_per_node > len(have):
        per = f"{ranks_per_node} ranks x --cpus {cpus}" if ranks_per_node > 1 else f"--cpus {cpus}"
        raise UsageError(
            f"{per} needs {cpus * ranks_per_node} cores; this process may use {len(have)} ({describe(have)})"
        )


def slice_for(cpus: int, local_rank: int, ranks_per_node: int) -> list[int]:
    check(cpus, ranks_per_node)
    return allowed()[local_rank * cpus : (local_rank + 1) * cpus]


def confine(cores: list[int]) -> None:
    """Pin every thread of this process to ``cores`` and size the thread pools to them."""
    import torch

    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, cores)
    n = str(len(cores))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # children; numba sizes its pool once: FFCV caps it
        os.environ[var] = n
    torch.set_num_threads(len(cores))


def confine_rank(cpus: int) -> list[int] | None:
    """For `bench run --cpus N`: this rank's slice (LOCAL_RANK of LOCAL_WORLD_SIZE under torchrun),
    applied; None when the run is not confined."""
    if not cpus:
        return None
    local = int(os.environ.get("LOCAL_RANK", 0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = slice_for(cpus, local, per_node)
    confine(cores)
    return cores


def affinity_of_tree(proc=None) -> dict:
    """Which cores the threads of this process and of its children may run on, as the kernel says:
    the proof that a confinement held (the resource monitor records it in the result)."""
    import psutil

    proc = proc or psutil.Process()
    cores: set[int] = set()
    checked = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            tids = os.listdir(f"/proc/{p.pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker that ended meanwhile
        checked += 1
        for tid in tids:
            try:
                cores |= os.sched_getaffinity(int(tid))
            except (ProcessLookupError, PermissionError, OSError):
                pass
    return {"cores": sorted(cores), "processes": checked}
