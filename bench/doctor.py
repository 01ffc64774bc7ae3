"""`bench doctor`: is this set-up input-bound or compute-bound, by how much, and what to try first.

Three probes, each a short `bench run` in its own process: the synthetic ceiling (the model with no
input cost), the loader alone (no model) and the two together; plus, unless --quick, the loader
alone for every other installed backend, so the advice names the numbers behind it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loaders.registry import BACKENDS

from .launch import run_trial
from .sweep import Stack, loader_args

INPUT_BOUND = 0.9  # the loader alone below 90% of the model's own rate: the model waits for data


@dataclass
class Probe:
    loader: str = "torch"
    model: str = "small"
    data: str | None = None
    batch_size: int = 64
    image_size: int = 224
    steps: int = 30
    workers: int = 0  # 0: min(cores, 8)
    amp: str = "off"
    channels_last: bool = False
    options: list[str] = field(default_factory=list)  # extra -o KEY=VALUE for the loader under test


def _common(p: Probe) -> list[str]:
    a = ["--model", p.model, "--batch-size", str(p.batch_size), "--image-size", str(p.image_size),
         "--steps", str(p.steps), "--no-eval"]
    if p.data:
        a += ["--data", p.data]
    if p.amp != "off":
        a += ["--amp", p.amp]
    if p.channels_last:
        a.append("--channels-last")
    return a


def _loader(name: str, workers: int, extra: list[str] | None = None) -> list[str]:
    pin = torch.cuda.is_available() and name in ("torch", "wds")
    opts = loader_args(Stack(loader=name, workers=workers, pin_memory=pin), workers)
    for item in extra or []:
        opts += ["-o", item]
    return ["--loader", name, *opts]


def verdict(loader: str, ceiling: float, end_to_end: float, loader_only: float, data_wait: float | None,
            alternatives: dict[str, float], cuda: bool, amp: str, workers: int, cores: int) -> tuple[str, list[str]]:
    """(the verdict in words, the things to try in order), from measured rates."""
    lines = [f"synthetic ceiling (model, no input): {ceiling:,.1f} img/s",
             f"{loader} alone (no model): {loader_only:,.1f} img/s",
             f"{loader} + model, end to end: {end_to_end:,.1f} img/s"
             + (f" ({data_wait:.0%} of each step waiting for data)" if data_wait is not None else "")]
    tries: list[str] = []
    if loader_only < INPUT_BOUND * ceiling:
        lines.append(f"verdict: INPUT-BOUND by {ceiling / loader_only:.1f}x: the loader delivers "
                     f"{loader_only:,.1f} img/s and the model could take {ceiling:,.1f}; end to end reaches "
                     f"{end_to_end / ceiling:.0%} of the ceiling.")
        better = sorted(((v, k) for k, v in alternatives.items() if v > 1.1 * loader_only), reverse=True)
        for v, k in better:
            tries.append(f"--loader {k}: {v:,.1f} img/s alone here, {v / loader_only:.1f}x the {loader} loader")
        if loader in ("torch", "wds") and workers < cores:
            tries.append(f"more workers: {workers} of {cores} cores in use (bench tune --loader {loader})")
        if not tries:
            tries.append(f"bench tune --loader {loader} (workers, prefetch); smaller stored images "
                         "(bench data convert --to folder|ffcv --max-resolution 256)")
    else:
        lines.append(f"verdict: COMPUTE-BOUND: the loader alone ({loader_only:,.1f} img/s) outpaces the model "
                     f"({ceiling:,.1f} img/s); end to end reaches {end_to_end / ceiling:.0%} of the ceiling.")
        if amp == "off":
            tries.append("--amp bf16" + ("" if cuda else " (on a CPU without bf16 units this can be slower)"))
        tries.append("--channels-last")
        tries.append("--compile")
        if cuda and torch.cuda.device_count() > 1:
            tries.append(f"--gpus {torch.cuda.device_count()}")
    if end_to_end < 0.8 * min(loader_only, ceiling):
        lines.append(f"note: end to end is {end_to_end / min(loader_only, ceiling):.0%} of the slower of the two "
                     "alone: the loader and the model compete for the same "
                     + ("cores (decode and training share the CPU)" if not cuda else "CPU cores or PCIe bandwidth"))
    return "\n".join(lines), tries


def diagnose(p: Probe, out: Path, command: list[str], quick: bool = False, log=print) -> dict:
    runs = out / "runs"
    cores = os.cpu_count() or 1
    workers = p.workers or min(cores, 8)
    cuda = torch.cuda.is_available()
    common = _common(p)
    probes = {"ceiling": ["--loader", "synthetic", *common],
              "end_to_end": [*_loader(p.loader, workers, p.options), *common],
              "loader_only": [*_loader(p.loader, workers, p.options), *common, "--loader-only"]}
    if not quick:
        for name, b in BACKENDS.items():
            if name not in ("synthetic", p.loader) and b.installed:
                probes[f"alt_{name}"] = [*_loader(name, workers), *common, "--loader-only"]
    measured, errors, files = {}, {}, {}
    for key, argv in probes.items():
        log(f"doctor: {key.replace('_', ' ')} ...")
        t = run_trial(argv + ["--label", f"doctor-{key}"], runs)
        if t.path is None:
            errors[key] = t.error
            log(f"doctor: {key}: failed: {t.error}")
            continue
        files[key] = str(t.path.relative_to(out))
        measured[key] = t.result["metrics"]
    for key in ("ceiling", "end_to_end", "loader_only"):
        if key not in measured:
            raise DoctorError(f"the {key.replace('_', ' ')} probe failed: {errors.get(key)}")
    alts = {k[4:]: m["images_per_second"] for k, m in measured.items() if k.startswith("alt_")}
    text, tries = verdict(p.loader, measured["ceiling"]["images_per_second"],
                          measured["end_to_end"]["images_per_second"], measured["loader_only"]["images_per_second"],
                          measured["end_to_end"]["data_wait_share"], alts, cuda, p.amp, workers, cores)
    if tries:
        text += "\ntry first: " + tries[0] + "".join(f"\nthen: {t}" for t in tries[1:])
    failed = "".join(f"\nnot measured: {k} ({v})" for k, v in errors.items())
    doc = {"schema": "loaderbench.doctor/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
           "probe": asdict(p), "workers": workers, "results": files,
           "images_per_second": {k: m["images_per_second"] for k, m in measured.items()},
           "verdict": text + failed, "try": tries}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".doctor.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "doctor.json")
    return doc


class DoctorError(Exception):
    pass
