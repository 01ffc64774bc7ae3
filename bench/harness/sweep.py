"""`bench sweep`: the techniques ladder.

From a naive baseline (DataLoader without workers, no pinned memory, fp32, NCHW, evaluation with
autograd on) each technique is switched on in turn on top of the ones kept so far, every step a
set of `bench run` trials in fresh processes. A technique is kept for the steps after it when it
made training faster (`--keep-all` keeps every one): the ladder then ends on the best stack this
machine found. Backend swaps are alternatives measured against the same stack; the fastest one is
carried on when it beats the baseline's loader. Early stopping and inference-mode evaluation change
time to accuracy and evaluation time, not images/s, and are measured as such.

Every step is a RunSpec derived with ``dataclasses.replace`` from the last one kept. Figures are not
stored here: `sweep.json` records the plan and which result files belong to which step, and
`bench report` computes every figure from the results themselves.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loaders import backends
from loaders.contract import available_cores
from loaders.stored import write_json

from ..errors import BenchError
from . import result as results
from .launch import Trial, run_trial
from .progress import Progress
from .spec import RunSpec

SCHEMA = "loaderbench.sweep/1"
BEFORE_SWAPS = (
    "workers",
    "pin_memory",
    "persistent",
    "device_normalize",
    "amp",
    "channels_last",
    "compile",
    "inference_eval",
)
AFTER_SWAPS = ("ddp", "shard_optimizer", "fsdp", "early_stop")


def swaps(base: str = RunSpec.loader) -> tuple[str, ...]:
    """Every other registered backend that reads data: the loader swaps."""
    return tuple(b.name for b in backends() if not b.is_ceiling and b.name != base)


def techniques(base: str = RunSpec.loader) -> tuple[str, ...]:
    return BEFORE_SWAPS + swaps(base) + AFTER_SWAPS


class SweepError(BenchError):
    pass


@dataclass(frozen=True)
class Stack:
    """What a step runs: the model-side settings live in the spec; the loader-side techniques are
    kept apart so that a backend swap carries them into the new backend's own options."""

    spec: RunSpec
    workers: int = 0
    pin_memory: bool = False
    persistent: bool = False
    prefetch: int | None = None
    device_normalize: bool = False
    ranks: int = 1

    def run_spec(self, cuda: bool) -> RunSpec:
        workers = self.workers
        if workers and not self.spec.cpus:  # the cores are shared by the ranks (--cpus: N per rank)
            workers = max(1, workers // self.ranks)
        spec = self.spec.with_loader(
            self.spec.loader,
            workers=workers,
            pin_memory=self.pin_memory,
            persistent=self.persistent,
            prefetch=self.prefetch,
            device_normalize=self.device_normalize,
        )
        if self.ranks > 1:
            spec = dataclasses.replace(spec, **({"gpus": self.ranks} if cuda else {"cpu_ranks": self.ranks}))
        return spec

    def replace(self, **change) -> Stack:
        spec_change = {k: change.pop(k) for k in list(change) if k in RunSpec.__dataclass_fields__}
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, **spec_change), **change)


@dataclass
class Settings:
    spec: RunSpec = field(default_factory=lambda: RunSpec(steps=30))  # the model, data and step budget
    trials: int = 2
    ceiling_trials: int = 1
    workers: int = 0  # 0: min(cores, 8)
    ranks: int = 0  # 0: the GPUs, or 2 CPU ranks without CUDA
    amp: str = "auto"  # auto: bf16 where supported, else fp16 on CUDA; bf16 on the CPU
    early_stop_epochs: int = 3
    target_accuracy: float = 0.6
    keep_all: bool = False
    techniques: tuple[str, ...] | None = None  # None: all
    cuda: bool = False
    trial_timeout: float = 900.0

    def record(self) -> dict:
        """As sweep.json records them: the ladder's settings and the base spec's model and budget."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        s = self.spec
        return {
            **d,
            "model": s.model,
            "data": s.data,
            "batch_size": s.batch_size,
            "image_size": s.image_size,
            "steps": s.steps,
            "warmup_steps": s.warmup_steps,
            "seed": s.seed,
            "spec": s.to_argv(),
        }


@dataclass
class Step:
    key: str
    title: str
    kind: str  # baseline | technique | swap | eval | early_stop
    status: str = "pending"  # ok | skipped | failed
    reason: str | None = None
    argv: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)  # result files, relative to the sweep folder
    errors: list[str] = field(default_factory=list)
    ceiling: str | None = None  # key of the ceiling (synthetic) runs for this step's model settings
    reference: str | None = None  # the step this one is compared with
    kept: bool | None = None
    seconds: float = 0.0


def default_workers(cpus: int = 0) -> int:
    return min(cpus or available_cores(), 8)


def resolve(s: Settings) -> Settings:
    s = dataclasses.replace(s)
    s.cuda = torch.cuda.is_available()
    known = techniques(s.spec.loader)
    s.techniques = tuple(s.techniques or known)
    unknown = [t for t in s.techniques if t not in known]
    if unknown:
        raise SweepError(f"unknown technique(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if s.trials < 1 or s.ceiling_trials < 0:
        raise SweepError("--trials must be >= 1 and --ceiling-trials >= 0")
    if s.spec.steps is None or s.spec.steps <= s.spec.warmup_steps:
        raise SweepError(
            f"--steps {s.spec.steps} leaves nothing to measure after {s.spec.warmup_steps} warm-up steps"
        )
    if s.workers < 0:
        raise SweepError(f"--workers must be >= 0, got {s.workers}")
    s.workers = s.workers or default_workers(s.spec.cpus)
    if s.ranks == 0:
        cores, per_rank = available_cores(), s.spec.cpus or 1
        s.ranks = torch.cuda.device_count() if s.cuda else (2 if cores >= 2 * per_rank else 1)
    if s.amp == "auto":
        s.amp = "bf16" if (not s.cuda or torch.cuda.is_bf16_supported()) else "fp16"
    if s.amp not in ("bf16", "fp16"):
        raise SweepError(f"--amp must be auto, bf16 or fp16, got {s.amp!r}")
    if s.amp == "fp16" and not s.cuda:
        raise SweepError("--amp fp16 needs CUDA")
    return s


def without_out(argv) -> list[str]:
    """`bench run` arguments without --out: a resumed folder may have been moved or copied."""
    kept, skip = [], False
    for a in argv:
        if not skip and a != "--out":
            kept.append(a)
        skip = a == "--out" and not skip
    return kept


def _median_ips(trials) -> float | None:
    v = [r.ips for r in trials]
    return statistics.median(v) if v else None


class Sweep:
    """``resume=True`` (`bench sweep --resume DIR`) replays the ladder in a folder an earlier,
    interrupted sweep left: a trial whose result (same step, same `bench run` arguments) is already
    under runs/ is taken from there instead of run again, so every decision comes out as before and
    the plan is the one an uninterrupted sweep would have made from those measurements."""

    def __init__(self, settings: Settings, out: Path, command: list[str], log=print, resume: bool = False):
        self.s = resolve(settings)
        self.out = Path(out)
        self.runs = self.out / "runs"
        self.command = command
        self.log = log
        self.resume = resume
        self.steps: list[Step] = []
        self.ceilings: dict[str, list[str]] = {}
        self.loaded: dict[str, dict] = {}
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.resumed: list[str] = []
        self.done: dict[tuple, list[str]] = {}  # (step key, argv) -> result files a resume takes

    def _pool(self) -> None:
        """The results already in the folder, by the step and arguments they were run with."""
        old = json.loads((self.out / "sweep.json").read_text())
        self.created = old.get("created", self.created)
        self.resumed = [*old.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S%z")]
        for path in sorted(self.runs.glob("*.json")):
            try:
                r = results.load(path)
            except results.ResultError:
                continue  # a result cut off mid-write is not a result
            key = (r.config.get("label", ""), tuple(without_out(r.config.get("argv", []))))
            self.done.setdefault(key, []).append(str(path.relative_to(self.out)))

    # -- bookkeeping -------------------------------------------------------------------------
    def _record(self) -> None:
        write_json(
            self.out / "sweep.json",
            {
                "schema": SCHEMA,
                "created": self.created,
                "resumed": self.resumed,
                "command": self.command,
                "settings": self.s.record(),
                "steps": [dataclasses.asdict(st) for st in self.steps],
                "ceilings": self.ceilings,
            },
        )

    def _trials(self, step: Step, stack: Stack, n: int):
        spec = dataclasses.replace(stack.run_spec(self.s.cuda), label=step.key)
        step.argv = spec.to_argv()
        start = time.perf_counter()
        got = []
        done = self.done.get((step.key, tuple(without_out(step.argv))), [])
        for i in range(n):
            if done:  # measured before the interruption
                rel = done.pop(0)
                result, how = results.load(self.out / rel), "kept from before"
            else:
                t: Trial = run_trial(spec, self.runs, timeout=self.s.trial_timeout)
                if t.path is None:
                    step.errors.append(t.error or "failed")
                    self.progress.advance(f"  {step.key} trial {i + 1}: FAILED: {t.error}")
                    self._record()
                    continue
                rel, result, how = str(t.path.relative_to(self.out)), t.result, ""
            step.results.append(rel)
            self.loaded[rel] = result
            got.append(result)
            self.progress.advance(f"  {step.key} trial {i + 1}: {result.ips:.1f} img/s {how}".rstrip())
            self._record()  # an interruption loses at most the trial under way
        step.seconds = time.perf_counter() - start
        step.status = "ok" if got else "failed"
        if not got:
            step.reason = step.errors[-1]
        return got

    def _ceiling(self, stack: Stack) -> str | None:
        """Synthetic-loader runs with this stack's model settings: the rate without any input cost."""
        if not self.s.ceiling_trials:
            return None
        spec = stack.spec
        key = (
            f"ceiling-{spec.amp}-{'cl' if spec.channels_last else 'nchw'}-"
            f"{'compiled' if spec.compile else 'eager'}-{stack.ranks}r"
        )
        if key not in self.ceilings:
            loader = next(b.name for b in backends() if b.is_ceiling)
            ceiling = Stack(
                dataclasses.replace(
                    spec.with_loader(loader), eval=False, epochs=None, steps=self.s.spec.steps
                ),
                ranks=stack.ranks,
            )
            step = Step(key, f"{loader} ceiling", "ceiling")
            self.log(f"{key}: the {loader} ceiling for these model settings")
            self.ceilings[key] = step.results  # filled (and recorded) trial by trial
            self._trials(step, ceiling, self.s.ceiling_trials)
        return key

    def _skip(self, step: Step, reason: str) -> None:
        step.status, step.reason = "skipped", reason
        self.log(f"{step.key}: skipped ({reason})")

    # -- the ladder ----------------------------------------------------------------------------
    def run(self) -> Path:
        # every technique's trials and one ceiling per model setting (an estimate: steps a machine
        # cannot run are skipped, and each distinct amp / channels_last / ranks needs its own ceiling)
        trials = (len(self.s.techniques) + 1) * self.s.trials + 2 * self.s.ceiling_trials
        with Progress("sweep", trials, self.log) as self.progress:
            log, self.log = self.log, self.progress.line
            try:
                return self._run()
            finally:
                self.log = log

    def _run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            if not (self.out / "sweep.json").exists():
                raise SweepError(f"--resume {self.out}: no sweep.json there, nothing to resume")
            self._pool()
        elif (self.out / "sweep.json").exists():
            raise SweepError(
                f"{self.out} already holds a sweep; choose a new --out (results are never overwritten), "
                f"or `bench sweep --resume {self.out}` to finish it"
            )
        self._record()  # from here on the folder can be resumed
        s = self.s
        # the naive baseline evaluates with autograd on
        stack = Stack(dataclasses.replace(s.spec, eval_inference_mode=False))
        best = self._step(
            Step(
                "baseline",
                f"naive baseline: {s.spec.loader} loader, 0 workers, fp32, NCHW, eval with autograd",
                "baseline",
            ),
            stack,
        )
        if best is None:
            self._record()
            raise SweepError(f"the baseline failed: {self.steps[-1].reason}")
        ref_key, ref_ips = "baseline", best

        def technique(
            key: str,
            title: str,
            change: dict,
            needs: str | None = None,
            carry: bool = True,
            apart: str = "measured apart, not carried into later steps (each process compiles again)",
            reference: str | None = None,
        ):
            nonlocal stack, ref_key, ref_ips
            if key not in s.techniques:
                return
            step = Step(key, title, "technique", reference=reference or ref_key)
            if needs:
                self.steps.append(step)
                self._skip(step, needs)
                self._record()
                return
            trial_stack = stack.replace(**change)
            ips = self._step(step, trial_stack)
            if ips is None:
                step.kept = False
            else:
                step.kept = s.keep_all or ips > ref_ips
                if step.kept and carry:
                    stack, ref_key, ref_ips = trial_stack, key, ips
                elif not carry:
                    step.kind = "apart"
                    step.reason = apart
            self._record()

        technique("workers", f"DataLoader workers ({s.workers})", {"workers": s.workers})
        technique(
            "pin_memory",
            "pinned host memory + non_blocking copies",
            {"pin_memory": True},
            needs=None if s.cuda else "pinned memory speeds host-to-GPU copies; no CUDA here",
        )
        technique(
            "persistent",
            "persistent workers + prefetch_factor 4",
            {"persistent": True, "prefetch": 4},
            needs=None if stack.workers else "needs workers (the workers step was not kept)",
        )
        technique("device_normalize", "uint8 batches, normalised on the device", {"device_normalize": True})
        technique("amp", f"mixed precision ({s.amp})", {"amp": s.amp})
        technique("channels_last", "channels_last memory format", {"channels_last": True})
        # Measured on the stack so far but not carried on: every later step's processes would pay the
        # compilation again (minutes for a ResNet), which the ladder's budget cannot afford.
        technique(
            "compile", "torch.compile (compilation inside the warm-up steps)", {"compile": True}, carry=False
        )
        if "inference_eval" in s.techniques:
            self._eval_step(stack, ref_key)
            stack = stack.replace(eval_inference_mode=True)
        swap = self._swaps(stack, ref_key, ref_ips)
        if swap is not None:
            stack, ref_key, ref_ips = swap
        ddp_needs = None
        if s.ranks < 2:
            ddp_needs = "one GPU on this machine" if s.cuda else "one core on this machine"
        elif s.spec.cpus and s.spec.cpus * s.ranks > available_cores():
            ddp_needs = f"{s.ranks} ranks x --cpus {s.spec.cpus} needs more than this machine's {available_cores()} cores"
        if not s.cuda and s.ranks < 2 and s.spec.cpus:
            ddp_needs = (
                f"2 CPU ranks x --cpus {s.spec.cpus} need more cores than this machine's {available_cores()}"
            )
        technique(
            "ddp",
            f"DDP over {s.ranks} {'GPUs' if s.cuda else 'CPU ranks (gloo)'}",
            {"ranks": s.ranks},
            needs=ddp_needs,
        )
        # Memory techniques: each rank holds a share of the training state (memory_per_rank in the
        # results); measured on the DDP stack and compared with it, not carried on.
        sharded = "a memory technique: measured against ddp (memory per rank beside images/s), not carried on"
        for key, title, flag in (
            (
                "shard_optimizer",
                "ZeRO-1: optimizer state sharded (ZeroRedundancyOptimizer)",
                "shard_optimizer",
            ),
            ("fsdp", "FSDP2: weights, gradients and optimizer state sharded (fully_shard)", "fsdp"),
        ):
            technique(
                key,
                f"{title} over {s.ranks} {'GPUs' if s.cuda else 'CPU ranks'}",
                {"ranks": s.ranks, flag: True},
                needs=ddp_needs,
                carry=False,
                apart=sharded,
                reference="ddp" if "ddp" in s.techniques else None,
            )
        if "early_stop" in s.techniques:
            self._early_stop(stack, ref_key)
        self._record()
        return self.out / "sweep.json"

    def _step(self, step: Step, stack: Stack, trials: int | None = None) -> float | None:
        self.steps.append(step)
        self.log(f"{step.key}: {step.title}")
        got = self._trials(step, stack, trials or self.s.trials)
        if got:
            step.ceiling = self._ceiling(stack)
        self._record()
        return _median_ips(got)

    def _eval_step(self, stack: Stack, ref_key: str) -> None:
        step = Step("inference_eval", "evaluation under torch.inference_mode", "eval", reference=ref_key)
        self._step(step, stack.replace(eval_inference_mode=True))
        step.kept = step.status == "ok"
        self._record()

    def _swaps(self, stack: Stack, ref_key: str, ref_ips: float):
        best = None
        for backend in backends():
            name = backend.name
            if name not in swaps(self.s.spec.loader) or name not in self.s.techniques:
                continue
            step = Step(name, f"loader swap: {name}", "swap", reference=ref_key)
            if not backend.installed:
                self.steps.append(step)
                self._skip(step, f"{name} is not installed ({backend.install_hint()})")
                step.kept = False
                self._record()
                continue
            workers = stack.workers or self.s.workers
            swapped = stack.replace(loader=name, options=None, workers=workers)
            ips = self._step(step, swapped)
            step.kept = False
            if ips is not None and ips > ref_ips and (best is None or ips > best[2]):
                best = (swapped, name, ips)
        if best is not None:
            for st in self.steps:
                if st.key == best[1]:
                    st.kept = True
        self._record()
        return best

    def _early_stop(self, stack: Stack, ref_key: str) -> None:
        s = self.s
        step = Step(
            "early_stop",
            f"early stopping at val accuracy {s.target_accuracy:g} (of {s.early_stop_epochs} epochs)",
            "early_stop",
            reference=ref_key,
        )
        # One run of every epoch, evaluated each epoch: stopping at the first epoch that reaches the
        # target would have produced exactly that run's first epochs, so time to target is read
        # from it and compared with the whole run, not extrapolated.
        self._step(step, stack.replace(steps=None, epochs=s.early_stop_epochs), trials=1)
        step.kept = step.status == "ok"
        self._record()
