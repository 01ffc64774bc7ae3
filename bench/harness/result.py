"""One result object per run: ``Result``, written once as JSON of record and read back typed by
every renderer (the table here, ``report``, ``compare``)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from loaders import LoaderError, get_backend
from loaders.stored import temp_output

from ..errors import BenchError

SCHEMA = "loaderbench.result/1"
REQUIRED = ("schema", "created", "status", "command", "config", "environment", "data", "loader", "metrics")


class ResultError(BenchError):
    pass


@dataclass
class Metrics:
    """A run's figures. Throughput is total images / wall time after warm-up, never a mean of
    per-step rates; the spreads are {median, p10, p90, min, max, n} of per-step seconds."""

    images_per_second: float
    measured_images: int | None = None
    measured_seconds: float | None = None
    steps: int | None = None
    step_time_s: dict = field(default_factory=dict)
    compute_time_s: dict = field(default_factory=dict)
    data_wait_s: dict = field(default_factory=dict)
    data_wait_share: float | None = None
    epoch_seconds: list = field(default_factory=list)
    eval_seconds: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    final_val_accuracy: float | None = None
    stopped_early: bool = False
    skipped_samples: int = 0
    resources: dict = field(default_factory=dict)
    # per rank: its shard of parameters, gradients, optimizer state and its peak memory (MiB)
    memory_per_rank: dict | None = None
    storage: dict = field(
        default_factory=dict
    )  # regime, bytes read, requests, staging (bench.storage.regime)
    first_batch_seconds: float | None = None  # the measured loop's start to its first batch
    start_to_first_batch_seconds: float | None = None  # the process's start to it (a restart's cost)
    checkpoint: dict | None = None  # saves, their cost, where it resumed from (bench run --checkpoint)
    energy: dict = field(default_factory=dict)  # GPU joules over the measured window (energy_fields)
    verdict: dict | None = None  # input- or compute-bound and the next command (doctor.run_verdict)
    profile: dict | None = None  # torch.profiler summary of --profile-steps steps (trainer/profile.py)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    @classmethod
    def from_dict(cls, d: dict) -> Metrics:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known}
        )

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    def resource(self, key: str):
        return (self.resources or {}).get(key)

    @property
    def joules_per_1000_images(self) -> float | None:
        return (self.energy or {}).get("joules_per_1000_images")

    @property
    def median_eval_seconds(self) -> float | None:
        values = [v for v in self.eval_seconds or [] if v is not None]
        return statistics.median(values) if values else None


@dataclass
class Result:
    command: list[str]
    config: dict  # the RunSpec as recorded (RunSpec.record) plus what the run resolved
    environment: dict
    data: dict
    loader: dict
    metrics: Metrics
    samples: dict = field(default_factory=dict)  # raw per-step values
    schema: str = SCHEMA
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    status: str = "ok"

    @property
    def ips(self) -> float:
        return self.metrics.images_per_second

    @property
    def label(self) -> str:
        return self.config.get("label") or ""

    @property
    def loader_only(self) -> bool:
        return bool(self.config.get("loader_only"))

    @property
    def mode(self) -> str:
        return "loader only" if self.loader_only else self.config["model"]

    @property
    def options(self) -> dict:
        return self.config.get("loader_options", {})

    @property
    def workers(self):
        """The backend's parallelism (workers or threads), as its own option recorded it."""
        try:
            return get_backend(self.config["loader"], installed=False).workers_of(self.options)
        except LoaderError:  # a backend this installation does not know
            return None

    def to_dict(self) -> dict:
        return {
            "schema": self.schema,
            "created": self.created,
            "status": self.status,
            "command": self.command,
            "config": self.config,
            "environment": self.environment,
            "data": self.data,
            "loader": self.loader,
            "metrics": self.metrics.to_dict(),
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        return cls(
            command=d["command"],
            config=d["config"],
            environment=d["environment"],
            data=d["data"],
            loader=d["loader"],
            metrics=Metrics.from_dict(d["metrics"]),
            samples=d.get("samples", {}),
            schema=d["schema"],
            created=d["created"],
            status=d["status"],
        )


def _spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p10": None, "p90": None, "min": None, "max": None, "n": 0}
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {
        "median": statistics.median(values),
        "p10": q[0],
        "p90": q[-1],
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def metrics_from(train, skipped: int, resources: dict | None = None) -> Metrics:
    """Summarise a TrainResult."""
    last = train.epochs[-1] if train.epochs else None
    wait, step = sum(train.data_wait), sum(train.step_time)
    return Metrics(
        images_per_second=train.images_per_second,
        measured_images=train.measured_images,
        measured_seconds=train.measured_seconds,
        steps=train.steps,
        step_time_s=_spread(train.step_time),
        compute_time_s=_spread(train.compute),
        data_wait_s=_spread(train.data_wait),
        data_wait_share=wait / step if step > 0 else None,
        epoch_seconds=[e.train_seconds for e in train.epochs],
        eval_seconds=[e.eval_seconds for e in train.epochs],
        epochs=[vars(e) for e in train.epochs],
        final_train_loss=last.train_loss if last else None,
        final_val_loss=last.val_loss if last else None,
        final_val_accuracy=last.val_accuracy if last else None,
        stopped_early=train.stopped_early,
        skipped_samples=skipped,
        resources=resources or {},
        memory_per_rank=getattr(train, "memory", None),
    )


def energy_fields(energy: dict, measured_images: int, epoch_images: int) -> dict:
    """What the GPUs drew over the measured window, per 1,000 images and per epoch (an epoch's
    images at the measured rate of joules per image: warm-up and evaluation are not in it)."""
    if not energy.get("measured") or not measured_images:
        return {"measured": False, "why": energy.get("why", "nothing was measured after warm-up")}
    per_image = energy["joules"] / measured_images
    return {
        **energy,
        "joules_per_1000_images": per_image * 1000,
        "joules_per_epoch": per_image * epoch_images,
        "mean_watts": energy["joules"] / energy["seconds"] if energy["seconds"] > 0 else None,
    }


def energy_line(e: dict) -> str:
    if not e:
        return "not recorded (a result from before energy was measured)"
    if not e.get("measured"):
        return f"not measured ({e.get('why', 'no GPU')})"
    return (
        f"{e['joules_per_1000_images']:,.1f} J per 1,000 images, {e['joules_per_epoch']:,.0f} J per epoch, "
        f"{e['mean_watts']:,.0f} W drawn by {e.get('gpus', 1)} GPU(s) ({e['source']})"
    )


def new_result(
    command: list[str],
    config: dict,
    environment: dict,
    data: dict,
    loader: dict,
    metrics,
    samples: dict | None = None,
) -> Result:
    metrics = metrics if isinstance(metrics, Metrics) else Metrics.from_dict(metrics)
    return Result(
        command=command,
        config=config,
        environment=environment,
        data=data,
        loader=loader,
        metrics=metrics,
        samples=samples or {},
    )


def save(result: Result, out_dir: Path | str) -> Path:
    """Write under a new, unique name: never overwrites, never leaves a partial file (written to a
    temporary sibling, then hard-linked into place)."""
    out_dir = Path(out_dir)
    c = result.config
    stem = (
        f"{time.strftime('%Y%m%d-%H%M%S')}-{c['loader']}-{'loaderonly' if result.loader_only else c['model']}-"
        f"{c['world_size']}r"
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with temp_output(out_dir / f"{stem}.json") as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=1, default=str))
            while True:
                path = out_dir / f"{stem}-{secrets.token_hex(2)}.json"
                try:
                    os.link(tmp, path)  # never replaces a result of the same name
                    break
                except FileExistsError:
                    continue
            tmp.unlink()
        return path
    except (OSError, LoaderError) as exc:
        raise ResultError(
            f"cannot write the result under {out_dir}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def load(path: Path | str) -> Result:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ResultError(f"cannot read result {path}: {exc}") from None
    missing = [k for k in REQUIRED if k not in d] if isinstance(d, dict) else list(REQUIRED)
    if missing or d.get("schema") != SCHEMA:
        raise ResultError(
            f"{path} is not a {SCHEMA} result (missing: {', '.join(missing) or 'schema match'})"
        )
    try:
        return Result.from_dict(d)
    except (TypeError, KeyError) as exc:
        raise ResultError(f"{path} is not a readable {SCHEMA} result: {exc}") from None


def storage_line(s: dict) -> str:
    """Where the data lived and what the storage served, in one line."""
    parts = [s.get("regime", "warm")]
    store = s.get("object_store")
    if store:
        parts[0] += f" ({store['latency_ms']:g} ms added)" if store.get("latency_ms") else ""
    if s.get("epochs"):
        parts.append(
            "resident after eviction " + ", ".join(f"{e['resident_after']:.0%}" for e in s["epochs"])
        )
    if s.get("bytes_read_from_disk") is not None:
        parts.append(f"{s['bytes_read_from_disk'] / 1e6:,.1f} MB read from disk")
    if s.get("requests") is not None:
        parts.append(
            f"{s['requests']:,} requests, {s.get('bytes_from_store', 0) / 1e6:,.1f} MB from the store"
        )
    if s.get("staging_s") is not None:
        parts.append(f"staged in {s['staging_s']:.1f} s")
    return "; ".join(parts)


def table(result: Result, path: Path | None = None):
    """A short rich table of one result."""
    from rich.markup import escape
    from rich.table import Table

    c, m = result.config, result.metrics
    t = Table(
        title=f"bench run: {c['loader']} / {'loader only' if result.loader_only else c['model']}",
        show_header=False,
        title_justify="left",
    )
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    st = m.step_time_s
    rows = [
        ("ranks x device", f"{c['world_size']} x {c['device']}"),
        ("amp / channels_last / compile", f"{c['amp']} / {c['channels_last']} / {c['compile']}"),
        ("images/s (after warm-up)", fmt(m.images_per_second, ",.1f")),
        (
            "step time median [p10, p90]",
            f"{fmt(st.get('median'), '.4f')} s [{fmt(st.get('p10'), '.4f')}, {fmt(st.get('p90'), '.4f')}]",
        ),
        ("data-wait share", fmt(m.data_wait_share, ".1%")),
        ("final train loss", fmt(m.final_train_loss, ".4f")),
        ("val loss / accuracy", f"{fmt(m.final_val_loss, '.4f')} / {fmt(m.final_val_accuracy, '.3f')}"),
        ("skipped bad samples", str(m.skipped_samples)),
    ]
    if m.storage:
        rows.append(("storage", storage_line(m.storage)))
    rows.append(("GPU energy", energy_line(m.energy)))
    if m.profile:
        from ..trainer.profile import line

        rows.append(("profiled (images/s includes it)", line(m.profile)))
    resumed = (m.checkpoint or {}).get("resumed_from")
    if resumed:
        rows.append(
            ("resumed from", f"step {resumed['step']} (epoch {resumed['epoch']}), {resumed['checkpoint']}")
        )
    if path is not None:
        rows.append(("result", str(path)))
    for k, v in rows:
        t.add_row(escape(k), escape(v))  # "[p10, p90]" is text, not rich markup
    return t
