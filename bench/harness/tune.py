"""`bench tune`: the worker / thread / prefetch settings that make a backend fastest here.

Two stages, each a set of short `bench run --loader-only` trials (or end to end with --end-to-end):
first the backend's parallelism knob (workers or threads) over 1, 2, 4, ... up to the cores, then
its prefetch depth at the best of those. Prints the winner as the options to pass. The knobs and
the values worth trying are the backend's own (``Backend.knobs``, ``prefetch_values``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

from loaders.contract import available_cores
from loaders.stored import write_json

from ..errors import BenchError
from .launch import run_trial
from .progress import Progress
from .spec import RunSpec, format_value


class TuneError(BenchError):
    pass


def candidates(cores: int, with_zero: bool) -> list[int]:
    """1, 2, 4, ... below the cores, then the cores and 1.5x them (I/O-bound workers can use more)."""
    xs, n = [], 1
    while n < cores:
        xs.append(n)
        n *= 2
    xs += [cores, max(cores + 1, int(cores * 1.5))]
    return ([0] if with_zero else []) + sorted(set(xs))


def tune(
    spec: RunSpec,
    out: Path,
    command: list[str],
    trials: int = 1,
    end_to_end: bool = False,
    max_workers: int | None = None,
    log=print,
) -> dict:
    backend = spec.backend
    par, pre = backend.knobs.get("workers"), backend.knobs.get("prefetch")
    if par is None:
        raise TuneError(f"loader {spec.loader!r} has no parallelism knob: nothing to tune")
    cores = max_workers or spec.cpus or available_cores()
    mode = "end to end" if end_to_end else "loader only"
    base = dataclasses.replace(spec, loader_only=not end_to_end)
    runs = out / "runs"
    tried: list[dict] = []
    counts = candidates(cores, with_zero=backend.min_workers == 0)
    progress = Progress(
        f"tune {spec.loader}", 1 + len(counts) + (len(backend.prefetch_values) if pre else 0), log
    )

    def measure(opts: dict, label: str) -> float | None:
        trial_spec = dataclasses.replace(base.with_options(**opts), label=label)
        rates = []
        for _ in range(trials):
            t = run_trial(trial_spec, runs)
            if t.path is None:
                progress.advance(f"tune: {opts or 'defaults'}: failed: {t.error}")
                tried.append({"options": opts, "error": t.error})
                return None
            rates.append(t.result.ips)
        ips = statistics.median(rates)
        tried.append({"options": opts, "images_per_second": ips, "trials": rates})
        progress.advance(
            f"tune: {', '.join(f'{k}={v}' for k, v in opts.items()) or 'defaults'}: {ips:,.1f} img/s ({mode})"
        )
        return ips

    with progress:
        default_ips = measure({}, "tune-defaults")
        best_opts, best_ips = {}, default_ips or 0.0
        stage1 = {}
        for n in counts:
            ips = measure({par: n}, f"tune-{par}")
            if ips is not None:
                stage1[n] = ips
        if stage1:
            n = max(stage1, key=stage1.get)
            if stage1[n] > best_ips:
                best_opts, best_ips = {par: n}, stage1[n]
            if pre and n > 0:  # prefetching needs workers
                for v in backend.prefetch_values:
                    ips = measure({par: n, pre: v}, f"tune-{pre}")
                    if ips is not None and ips > best_ips:
                        best_opts, best_ips = {par: n, pre: v}, ips
    if not tried or all("error" in t for t in tried):
        raise TuneError(
            f"every {spec.loader} run failed; last error: {tried[-1]['error'] if tried else 'none ran'}"
        )
    doc = {
        "schema": "loaderbench.tune/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "loader": spec.loader,
        "mode": mode,
        "tried": tried,
        "default_ips": default_ips,
        "best_options": best_opts,
        "best_args": [a for k, v in best_opts.items() for a in ("-o", f"{k}={format_value(v)}")],
        "best_ips": best_ips,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tune.json", doc)
    return doc
