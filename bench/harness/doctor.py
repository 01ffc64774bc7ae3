"""`bench doctor`: is this set-up input-bound or compute-bound, by how much, and what to try first.

Three probes, each a short `bench run` in its own process: the synthetic ceiling (the model with no
input cost), the loader alone (no model) and the two together; plus, unless --quick, the loader
alone for every other installed backend, so the advice names the numbers behind it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from loaders import backends, get_backend
from loaders.contract import available_cores
from loaders.stored import write_json

from ..errors import BenchError
from .launch import run_trial
from .progress import Progress
from .spec import COMMAND_FIELDS, RunSpec

INPUT_BOUND = 0.9  # the loader alone below 90% of the model's own rate: the model waits for data


def probe_spec(spec: RunSpec, loader: str, workers: int, cuda: bool) -> RunSpec:
    """``spec`` on ``loader`` with ``workers`` and, on CUDA, pinned memory; for the loader under test
    the options given on the command line win over these."""
    probe = spec.with_loader(loader, workers=workers, pin_memory=cuda)
    if loader == spec.loader:
        defaults = type(spec.options)()
        given = {
            f.name: getattr(spec.options, f.name)
            for f in dataclasses.fields(spec.options)
            if getattr(spec.options, f.name) != getattr(defaults, f.name)
        }
        probe = probe.with_options(**given)
    return dataclasses.replace(probe, eval=False)


def verdict(
    loader: str,
    ceiling: float,
    end_to_end: float,
    loader_only: float,
    data_wait: float | None,
    alternatives: dict[str, float],
    cuda: bool,
    amp: str,
    workers: int,
    cores: int,
) -> tuple[str, list[str]]:
    """(the verdict in words, the things to try in order), from measured rates."""
    lines = [
        f"synthetic ceiling (model, no input): {ceiling:,.1f} img/s",
        f"{loader} alone (no model): {loader_only:,.1f} img/s",
        f"{loader} + model, end to end: {end_to_end:,.1f} img/s"
        + (f" ({data_wait:.0%} of each step waiting for data)" if data_wait is not None else ""),
    ]
    tries: list[str] = []
    if loader_only < INPUT_BOUND * ceiling:
        lines.append(
            f"verdict: INPUT-BOUND by {ceiling / loader_only:.1f}x: the loader delivers "
            f"{loader_only:,.1f} img/s and the model could take {ceiling:,.1f}; end to end reaches "
            f"{end_to_end / ceiling:.0%} of the ceiling."
        )
        better = sorted(((v, k) for k, v in alternatives.items() if v > 1.1 * loader_only), reverse=True)
        for v, k in better:
            tries.append(
                f"--loader {k}: {v:,.1f} img/s alone here, {v / loader_only:.1f}x the {loader} loader"
            )
        if "workers" in get_backend(loader, installed=False).knobs and workers < cores:
            tries.append(f"more workers: {workers} of {cores} cores in use (bench tune --loader {loader})")
        if not tries:
            tries.append(
                f"bench tune --loader {loader} (workers, prefetch); smaller stored images "
                "(bench data convert --to folder|ffcv --max-resolution 256)"
            )
    else:
        lines.append(
            f"verdict: COMPUTE-BOUND: the loader alone ({loader_only:,.1f} img/s) outpaces the model "
            f"({ceiling:,.1f} img/s); end to end reaches {end_to_end / ceiling:.0%} of the ceiling."
        )
        if amp == "off":
            tries.append("--amp bf16" + ("" if cuda else " (on a CPU without bf16 units this can be slower)"))
        tries.append("--channels-last")
        tries.append("--compile")
        if cuda and torch.cuda.device_count() > 1:
            tries.append(f"--gpus {torch.cuda.device_count()}")
    if end_to_end < 0.8 * min(loader_only, ceiling):
        lines.append(
            f"note: end to end is {end_to_end / min(loader_only, ceiling):.0%} of the slower of the two "
            "alone: the loader and the model compete for the same "
            + ("cores (decode and training share the CPU)" if not cuda else "CPU cores or PCIe bandwidth")
        )
    return "\n".join(lines), tries


def next_command(command: str, spec: RunSpec, default_data: str | None = None) -> str:
    """`bench COMMAND` with the settings of ``spec`` that it takes and that differ from the defaults
    (the generated default set is left implicit)."""
    kept = RunSpec(**{f: getattr(spec, f) for f in COMMAND_FIELDS[command] if f != "loader"})
    if default_data is not None and kept.data == default_data:
        kept = dataclasses.replace(kept, data=None)
    loader = ["--loader", spec.loader] if "loader" in COMMAND_FIELDS[command] else []
    return " ".join(["bench", command, *loader, *kept.to_argv()])


def run_verdict(spec: RunSpec, metrics, cuda: bool, cores: int, default_data: str | None = None) -> dict:
    """What one `bench run` can say about its own bottleneck, from the figures doctor reads: the
    data-wait share of the end-to-end steps stands in for the loader-only probe (a run that waited
    share w of its time would reach ips / (1 - w) if the input cost nothing: the synthetic ceiling,
    estimated). {kind, text, next, why}; kind "none" when the run cannot tell."""
    ips, wait = metrics.images_per_second, metrics.data_wait_share
    backend = get_backend(spec.loader, installed=False)
    doctor = next_command("doctor", spec, default_data)
    if not metrics.measured_images or wait is None or math.isnan(ips):
        return {
            "kind": "none",
            "text": "no verdict: no step was measured after the warm-up (raise --steps above --warmup-steps)",
            "next": None,
            "why": None,
        }
    if backend.is_ceiling:
        return {
            "kind": "ceiling",
            "text": f"verdict: none needed: {ips:,.1f} img/s is the synthetic ceiling, the most this model "
            "takes here with no input cost",
            "next": next_command("doctor", spec.with_loader("torch"), default_data),
            "why": "a real loader against this ceiling",
        }
    if spec.loader_only:
        return {
            "kind": "none",
            "text": f"no verdict: {spec.loader} alone delivers {ips:,.1f} img/s; with no model, this run cannot "
            "tell whether training would wait for it",
            "next": doctor,
            "why": "the model's ceiling, the loader alone and the two together",
        }
    ceiling = ips / (1 - wait) if wait < 1 else math.inf
    knob = backend.knobs.get("workers")
    workers = getattr(spec.options, knob) if knob else None
    if wait > 1 - INPUT_BOUND:
        if workers is not None and workers < cores:
            nxt, why = next_command("tune", spec, default_data), f"{knob}={workers} on {cores} cores"
        elif cuda:
            nxt, why = (
                next_command("plan", spec, default_data),
                "which backend feeds this GPU from these cores",
            )
        else:
            nxt, why = doctor, "the other backends on this machine"
        return {
            "kind": "input-bound",
            "text": f"verdict: INPUT-BOUND: {wait:.0%} of each step waits for data; without the wait about "
            f"{ceiling:,.1f} img/s ({ceiling / ips:.1f}x, estimated: the synthetic ceiling measures it)",
            "next": nxt,
            "why": why,
            "ceiling_estimate": ceiling,
        }
    if not cuda and workers:
        return {
            "kind": "unclear",
            "text": f"verdict: UNCLEAR: {wait:.0%} of each step waits for data, but the {workers} worker(s) "
            "decode on the CPU cores the model trains on, so the wait hides what the loader costs",
            "next": doctor,
            "why": "the loader alone and the model alone",
            "ceiling_estimate": ceiling,
        }
    return {
        "kind": "compute-bound",
        "text": f"verdict: COMPUTE-BOUND: {wait:.0%} of each step waits for data; a faster loader buys at "
        f"most {1 / (1 - wait):.2f}x",
        "next": next_command("sweep", spec, default_data),
        "why": "what AMP, channels_last, compile and more ranks buy",
        "ceiling_estimate": ceiling,
    }


def verdict_lines(v: dict) -> str:
    return v["text"] + (f"\nnext: {v['next']}   ({v['why']})" if v.get("next") else "")


def storage_verdict(
    spec: RunSpec, regime_ips: float, warm_ips: float | None, ceiling: float, storage: dict
) -> tuple[list[str], list[str]]:
    """(lines, things to try) about where the data lives: the read rate the loader reached from this
    storage against what the model needs, and what would close the gap."""
    regime = spec.storage
    if regime == "warm" or warm_ips is None:
        return [
            "storage: warm page cache; this says nothing about a first epoch from disk or a bucket "
            "(--storage cold or --storage s3)"
        ], []
    images = storage.get("images") or 1
    moved = storage.get("bytes_from_store") if regime == "s3" else storage.get("bytes_read_from_disk")
    per_image = (moved or 0) / images
    lines = [
        f"storage: {regime}: {spec.loader} alone reads {regime_ips:,.1f} img/s "
        f"({regime_ips * per_image / 1e6:,.1f} MB/s) against {warm_ips:,.1f} img/s from a warm cache; the "
        f"model needs {ceiling:,.1f} img/s ({ceiling * per_image / 1e6:,.1f} MB/s)"
    ]
    tries: list[str] = []
    if regime_ips >= 0.9 * warm_ips:
        lines.append("storage verdict: not the limit (within 10% of the warm rate)")
        return lines, tries
    lines.append(
        f"storage verdict: STORAGE-BOUND: {warm_ips / regime_ips:.1f}x slower than from a warm cache"
    )
    requests = storage.get("requests")
    if regime == "s3" and requests is not None:
        per = requests / images
        lines.append(f"{requests:,} requests for {images:,} images ({per:.2f} per image)")
        if per > 0.5:
            tries.append(
                "shards: --loader wds streams whole shards, one request per shard instead of per image"
            )
        if "s3_requests" in {f.name for f in dataclasses.fields(spec.options)}:
            tries.append(
                f"more requests in flight: -o s3_requests={2 * spec.options.s3_requests} (per worker)"
            )
        tries.append("local staging: copy the bucket to a local disk once (as ffcv does) when it fits")
    if regime == "cold":
        tries.append("fewer, larger sequential reads: shards (--loader wds) or a .beton (--loader ffcv)")
        tries.append(
            "a page cache that holds the data (RAM above the dataset size) makes every epoch after the first warm"
        )
    return lines, tries


def diagnose(
    spec: RunSpec, out: Path, command: list[str], workers: int = 0, quick: bool = False, log=print
) -> dict:
    runs = out / "runs"
    cores = spec.cpus or available_cores()
    workers = workers or min(cores, 8)
    cuda = torch.cuda.is_available()
    ceiling = next(b.name for b in backends() if b.is_ceiling)
    tested = probe_spec(spec, spec.loader, workers, cuda)
    probes = {
        "ceiling": dataclasses.replace(spec.with_loader(ceiling), eval=False),
        "end_to_end": tested,
        "loader_only": dataclasses.replace(tested, loader_only=True),
    }
    if spec.storage != "warm":  # the same loader from a warm cache: what the storage costs
        probes["loader_only_warm"] = dataclasses.replace(
            probes["loader_only"], storage="warm", s3_endpoint=None, s3_latency_ms=0.0, s3_mbps=0.0
        )
    if not quick:
        for b in backends():
            if not b.is_ceiling and b.name != spec.loader and b.installed:
                probes[f"alt_{b.name}"] = dataclasses.replace(
                    probe_spec(spec, b.name, workers, cuda), loader_only=True
                )
    measured, errors, files = {}, {}, {}
    with Progress("doctor", len(probes), log) as progress:
        for key, probe in probes.items():
            t = run_trial(dataclasses.replace(probe, label=f"doctor-{key}"), runs)
            if t.path is None:
                errors[key] = t.error
                progress.advance(f"doctor: {key.replace('_', ' ')}: failed: {t.error}")
                continue
            files[key] = str(t.path.relative_to(out))
            measured[key] = t.result.metrics
            progress.advance(f"doctor: {key.replace('_', ' ')}: {t.result.ips:,.1f} img/s")
    for key in ("ceiling", "end_to_end", "loader_only"):
        if key not in measured:
            raise DoctorError(f"the {key.replace('_', ' ')} probe failed: {errors.get(key)}")
    alts = {k[4:]: m.images_per_second for k, m in measured.items() if k.startswith("alt_")}
    lo = measured["loader_only"]
    warm = measured.get("loader_only_warm")
    storage = dict(
        lo.storage or {}, images=(lo.steps or 0) * spec.batch_size or lo.measured_images
    )  # all read
    text, tries = verdict(
        spec.loader,
        measured["ceiling"].images_per_second,
        measured["end_to_end"].images_per_second,
        measured["loader_only"].images_per_second,
        measured["end_to_end"].data_wait_share,
        alts,
        cuda,
        spec.amp,
        workers,
        cores,
    )
    s_lines, s_tries = storage_verdict(
        spec,
        lo.images_per_second,
        warm.images_per_second if warm else None,
        measured["ceiling"].images_per_second,
        storage,
    )
    text += "\n" + "\n".join(s_lines)
    tries = (
        s_tries + tries
        if s_tries and lo.images_per_second < INPUT_BOUND * measured["ceiling"].images_per_second
        else tries + s_tries
    )
    if tries:
        text += "\ntry first: " + tries[0] + "".join(f"\nthen: {t}" for t in tries[1:])
    failed = "".join(f"\nnot measured: {k} ({v})" for k, v in errors.items())
    doc = {
        "schema": "loaderbench.doctor/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "probe": spec.record(),
        "workers": workers,
        "results": files,
        "images_per_second": {k: m.images_per_second for k, m in measured.items()},
        "verdict": text + failed,
        "try": tries,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "doctor.json", doc)
    return doc


class DoctorError(BenchError):
    pass
