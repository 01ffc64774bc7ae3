"""One result object per run: JSON of record, plus renderers over it."""
from __future__ import annotations

import json
import os
import secrets
import statistics
import time
from pathlib import Path

SCHEMA = "loaderbench.result/1"
REQUIRED = ("schema", "created", "status", "command", "config", "environment", "data", "loader", "metrics")


class ResultError(Exception):
    pass


def _spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p10": None, "p90": None, "min": None, "max": None, "n": 0}
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "min": min(values), "max": max(values),
            "n": len(values)}


def metrics_from(train, skipped: int) -> dict:
    """Summarise a TrainResult. Throughput comes from total images / wall time, never from a
    mean of per-step rates."""
    last = train.epochs[-1] if train.epochs else None
    wait, step = sum(train.data_wait), sum(train.step_time)
    return {
        "images_per_second": train.images_per_second,
        "measured_images": train.measured_images,
        "measured_seconds": train.measured_seconds,
        "steps": train.steps,
        "step_time_s": _spread(train.step_time),
        "compute_time_s": _spread(train.compute),
        "data_wait_s": _spread(train.data_wait),
        "data_wait_share": wait / step if step > 0 else None,
        "epoch_seconds": [e.train_seconds for e in train.epochs],
        "eval_seconds": [e.eval_seconds for e in train.epochs],
        "epochs": [vars(e) for e in train.epochs],
        "final_train_loss": last.train_loss if last else None,
        "final_val_loss": last.val_loss if last else None,
        "final_val_accuracy": last.val_accuracy if last else None,
        "stopped_early": train.stopped_early,
        "skipped_samples": skipped,
    }


def new_result(command: list[str], config: dict, environment: dict, data: dict, loader: dict, metrics: dict,
               samples: dict) -> dict:
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "ok",
        "command": command,
        "config": config,
        "environment": environment,
        "data": data,
        "loader": loader,
        "metrics": metrics,
        "samples": samples,  # raw per-step values, for renderers that want more than the summary
    }


def save(result: dict, out_dir: Path | str) -> Path:
    """Write under a new, unique name: never overwrites, never leaves a partial file
    (written to a hidden temporary, then hard-linked into place)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return _save(result, out_dir)
    except OSError as exc:
        raise ResultError(f"cannot write the result under {out_dir}: {exc.strerror or exc}") from None


def _save(result: dict, out_dir: Path) -> Path:
    c = result["config"]
    what = "loaderonly" if c.get("loader_only") else c["model"]
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{c['loader']}-{what}-{c['world_size']}r"
    tmp = out_dir / f".{stem}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(result, indent=1, default=str))  # inside: a full disk leaves no partial file
        while True:
            path = out_dir / f"{stem}-{secrets.token_hex(2)}.json"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path | str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ResultError(f"cannot read result {path}: {exc}") from None
    missing = [k for k in REQUIRED if k not in result]
    if missing or result.get("schema") != SCHEMA:
        raise ResultError(f"{path} is not a {SCHEMA} result (missing: {', '.join(missing) or 'schema match'})")
    return result


def table(result: dict, path: Path | None = None):
    """A short rich table of one result."""
    from rich.markup import escape
    from rich.table import Table

    c, m = result["config"], result["metrics"]
    what = "loader only" if c.get("loader_only") else c["model"]
    t = Table(title=f"bench run: {c['loader']} / {what}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    rows = [
        ("ranks x device", f"{c['world_size']} x {c['device']}"),
        ("amp / channels_last / compile", f"{c['amp']} / {c['channels_last']} / {c['compile']}"),
        ("images/s (after warm-up)", fmt(m["images_per_second"], ",.1f")),
        ("step time median [p10, p90]",
         f"{fmt(m['step_time_s']['median'], '.4f')} s [{fmt(m['step_time_s']['p10'], '.4f')}, "
         f"{fmt(m['step_time_s']['p90'], '.4f')}]"),
        ("data-wait share", fmt(m["data_wait_share"], ".1%")),
        ("final train loss", fmt(m["final_train_loss"], ".4f")),
        ("val loss / accuracy", f"{fmt(m['final_val_loss'], '.4f')} / {fmt(m['final_val_accuracy'], '.3f')}"),
        ("skipped bad samples", str(m["skipped_samples"])),
    ]
    if path is not None:
        rows.append(("result", str(path)))
    for k, v in rows:
        t.add_row(escape(k), escape(v))  # "[p10, p90]" is text, not rich markup
    return t
