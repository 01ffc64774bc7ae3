"""The `bench` command line."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import typing

from loaders.contract import LoaderError

from .doctor import DoctorError
from .report import ReportError
from .result import ResultError
from .sweep import SweepError
from .synth import SynthError
from .trainer import TrainError
from .tune import TuneError


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train with one loader and write a result of record",
                       description="Train a model with one loader; rank 0 writes a JSON result under --out.")
    p.add_argument("--loader", default="torch", help="backend name (see `bench backends`); default torch")
    p.add_argument("--data", help="ImageFolder root with train/ and val/; default: the generated dataset (cached)")
    p.add_argument("--model", default="small", help="small | resnet18 | resnet50 (default small)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="epochs to train (default 1)")
    length.add_argument("--steps", type=int, help="training steps to run instead of whole epochs")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps excluded from throughput (default 5)")
    p.add_argument("--patience", type=int, default=0, help="early stopping on val loss after N bad epochs; 0 = off")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpus", type=int, default=1, help="N > 1: N ranks through torchrun, one per GPU")
    p.add_argument("--cpu-ranks", type=int, default=0, help="N CPU ranks with gloo (DDP without a GPU)")
    p.add_argument("--on-bad-sample", default="stop", choices=("stop", "skip"),
                   help="stop (default): fail naming the file; skip: skip and count it in the result")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip validation")
    p.add_argument("--eval-with-autograd", dest="eval_inference_mode", action="store_false",
                   help="evaluate without torch.inference_mode (the naive baseline)")
    p.add_argument("--loader-only", action="store_true",
                   help="fetch batches with no model: the loader's own images/s (--model is ignored)")
    p.add_argument("--dist-timeout", dest="dist_timeout_s", type=int, default=300,
                   help="seconds a rank waits for the others before failing (default 300)")
    p.add_argument("--out", default="reports/runs", help="folder for the JSON result (default reports/runs)")
    p.add_argument("--label", default="", help="a name recorded in the result (reports group runs by it)")
    g = p.add_argument_group("loader options (the torch backend's knobs; -o KEY=VALUE for any backend option)")
    g.add_argument("--workers", type=int, dest="opt_num_workers", help="DataLoader worker processes")
    g.add_argument("--pin-memory", action="store_const", const=True, dest="opt_pin_memory",
                   help="pinned host memory + non_blocking copies")
    g.add_argument("--persistent-workers", action="store_const", const=True, dest="opt_persistent_workers")
    g.add_argument("--prefetch-factor", type=int, dest="opt_prefetch_factor")
    g.add_argument("--device-normalize", action="store_const", const=True, dest="opt_device_normalize",
                   help="uint8 batches, copy on a side CUDA stream, normalise on the device")
    g.add_argument("-o", "--loader-opt", action="append", default=[], metavar="KEY=VALUE")


def _coerce(backend: str, key: str, raw: str):
    """Turn a -o value into the type the backend's Options field declares."""
    import importlib

    from loaders.registry import get_backend

    module = importlib.import_module(get_backend(backend).module)
    hints = typing.get_type_hints(module.Options)
    if key not in hints:
        return raw  # options_for names the unknown key
    hint = str(hints[key])
    if "bool" in hint:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise LoaderError(f"-o {key}={raw}: expected true or false")
    if raw.lower() == "none" and "None" in hint:
        return None
    for kind in (int, float):
        if kind.__name__ in hint:
            try:
                return kind(raw)
            except ValueError:
                raise LoaderError(f"-o {key}={raw}: expected {kind.__name__}") from None
    return raw


def _run_config(args):
    from .runner import RunConfig

    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    for item in args.loader_opt:
        key, sep, raw = item.partition("=")
        if not sep:
            raise LoaderError(f"-o {item}: expected KEY=VALUE")
        options[key] = _coerce(args.loader, key, raw)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return RunConfig(**values, loader_options=tuple(sorted(options.items())))


def cmd_run(args, argv: list[str]) -> int:
    from . import runner

    cfg = _run_config(args)
    runner.check(cfg)
    launched = "WORLD_SIZE" in os.environ  # under torchrun / SLURM already: we are one rank
    if runner.nprocs(cfg) > 1 and not launched:
        train_dir, val_dir = runner.resolve_data(cfg)
        runner.prepare(cfg, train_dir, val_dir if cfg.eval and not cfg.loader_only else None)
        return runner.relaunch(cfg, argv, train_dir.parent)
    runner.run(cfg, argv)
    return 0


def _synth_parser(sub) -> None:
    from .synth import SynthSpec

    d = SynthSpec()
    p = sub.add_parser("synth", help="write the generated ImageFolder (train/, val/)")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--val-per-class", type=int, default=d.val_per_class)
    p.add_argument("--width", type=int, default=d.width, help="largest width (images vary down to 80%%)")
    p.add_argument("--height", type=int, default=d.height, help="largest height (images vary down to 89%%)")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")


def cmd_synth(args) -> int:
    from .synth import SynthSpec, generate

    spec = SynthSpec(classes=args.classes, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                     width=args.width, height=args.height, quality=args.quality, seed=args.seed)
    m = generate(args.out, spec, workers=args.workers)
    print(f"{args.out}: {m['images']['train']} train + {m['images']['val']} val images, mean "
          f"{m['mean_bytes'] / 1e3:.1f} KB at {m['mean_width']:.0f}x{m['mean_height']:.0f} px, q{spec.quality}")
    return 0


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert an ImageFolder root to .beton files (ffcv), tar shards (wds) "
                       "or a resized folder",
                       description="Convert an ImageFolder root (train/, val/) to another storage format.")
    p.add_argument("--to", required=True, choices=("ffcv", "wds", "folder"))
    p.add_argument("--data", help="ImageFolder root; default: the generated dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-resolution", type=int, help="longest side cap in px (folder: required; wds: re-encodes)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg", choices=("jpg", "raw", "proportion", "smart"),
                   help="ffcv: jpg (re-encoded), raw (decoded pixels), proportion (a mix), smart")
    p.add_argument("--compress-probability", type=float, default=0.5, help="ffcv --write-mode proportion")
    p.add_argument("--shard-samples", type=int, help="wds: samples per shard (default: from --shard-mb)")
    p.add_argument("--shard-mb", type=float, default=64.0,
                   help="wds: target shard size in MB when --shard-samples is not given (at least 16 shards)")
    p.add_argument("--seed", type=int, default=0, help="wds: seed of the sample order written")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")


def cmd_convert(args) -> int:
    from pathlib import Path

    from . import convert
    from .synth import default_dataset

    root = Path(args.data) if args.data else default_dataset()
    out = Path(args.out)
    if args.to == "folder":
        if args.max_resolution is None:
            raise LoaderError("--to folder needs --max-resolution")
        m = convert.to_folder(root, out, args.max_resolution, args.jpeg_quality, args.workers)
        print(f"{out}: {m['images']} images, mean {m['mean_bytes'] / 1e3:.1f} KB at {m['mean_width']:.0f}x"
              f"{m['mean_height']:.0f} px, q{m['jpeg_quality']}, in {m['seconds']:.1f} s")
        return 0
    if args.to == "wds":
        from loaders.wds import Sharding

        sharding = Sharding(args.shard_samples, args.shard_mb, args.max_resolution, args.jpeg_quality, args.seed)
        for m, split in zip(convert.to_wds(root, out, sharding, args.workers), convert.splits_of(root)):
            sizes = [s["bytes"] for s in m["shards"]]
            counts = [s["samples"] for s in m["shards"]]
            print(f"{out / split}: {len(sizes)} shards of {min(counts)}-{max(counts)} samples, "
                  f"{min(sizes) / 1e6:.1f}-{max(sizes) / 1e6:.1f} MB, in {m['seconds']:.1f} s"
                  + ("" if m["dali_index"] else " (no DALI index: DALI not installed)"))
        return 0
    from loaders.ffcv import Storage

    storage = Storage(args.write_mode, args.max_resolution, args.jpeg_quality, args.compress_probability)
    convert.to_ffcv(root, out, storage, args.workers)
    return 0


def cmd_backends(args) -> int:
    from loaders import backends

    for b in backends():
        state = "installed" if b.installed else f"not installed (pip install 'loaderbench[{b.extra}]')"
        print(f"{b.name:10s} {state:12s}  {b.summary}")
    return 0


def _sweep_parser(sub) -> None:
    from .sweep import TECHNIQUES, Settings

    d = Settings()
    p = sub.add_parser("sweep", help="the techniques ladder: each technique's end-to-end speedup",
                       description="Switch training-acceleration techniques on one at a time from a naive "
                       "baseline; every step several `bench run` trials. Writes sweep.json + results to --out "
                       "and renders them with `bench report`.")
    p.add_argument("--out", help="new folder for the ladder (default reports/sweep-<time>)")
    p.add_argument("--data", help="ImageFolder root; default: the generated dataset")
    p.add_argument("--model", default=d.model, help="small | resnet18 | resnet50")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps per trial (default {d.steps})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--trials", type=int, default=d.trials, help=f"trials per step (default {d.trials})")
    p.add_argument("--ceiling-trials", type=int, default=d.ceiling_trials,
                   help="synthetic-ceiling trials per model setting (0: no %% of ceiling)")
    p.add_argument("--techniques", default=",".join(TECHNIQUES),
                   help="comma-separated, in ladder order (default: all): " + ", ".join(TECHNIQUES))
    p.add_argument("--workers", type=int, default=0, help="workers / threads when switched on (default min(cores, 8))")
    p.add_argument("--ranks", type=int, default=0, help="DDP ranks (default: the GPUs; 2 CPU ranks without CUDA)")
    p.add_argument("--amp", default="auto", help="auto (bf16 where supported) | bf16 | fp16")
    p.add_argument("--early-stop-epochs", type=int, default=d.early_stop_epochs)
    p.add_argument("--target-accuracy", type=float, default=d.target_accuracy)
    p.add_argument("--keep-all", action="store_true", help="keep every technique, even one that slowed training")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--trial-timeout", type=float, default=d.trial_timeout,
                   help=f"seconds before a trial is called failed (default {d.trial_timeout:.0f})")
    p.add_argument("--title", help="report title")


def cmd_sweep(args, argv) -> int:
    import time
    from pathlib import Path

    from . import report
    from .sweep import Settings, Sweep

    s = Settings(model=args.model, data=args.data, batch_size=args.batch_size, image_size=args.image_size,
                 steps=args.steps, warmup_steps=args.warmup_steps, trials=args.trials,
                 ceiling_trials=args.ceiling_trials, seed=args.seed, workers=args.workers, ranks=args.ranks,
                 amp=args.amp, early_stop_epochs=args.early_stop_epochs, target_accuracy=args.target_accuracy,
                 keep_all=args.keep_all, trial_timeout=args.trial_timeout, techniques=tuple(t.strip() for t in args.techniques.split(",") if t.strip()))
    out = Path(args.out or f"reports/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.data is None:  # generate the default set once, here, not in the first trial's timing
        from .synth import default_dataset

        s.data = str(default_dataset())
    Sweep(s, out, ["bench", *argv]).run()
    path = report.render(out, args.title)
    print("\n".join(path.read_text().split("## Plots")[0].splitlines()[-40:]))
    print(f"report: {path}")
    return 0


def _doctor_parser(sub) -> None:
    p = sub.add_parser("doctor", help="input-bound or compute-bound? what to try first, with the numbers",
                       description="Probe the synthetic ceiling, the loader alone and the two together; say "
                       "which limits training and what to try first.")
    p.add_argument("--loader", default="torch")
    p.add_argument("--model", default="small")
    p.add_argument("--data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=0, help="workers / threads (default min(cores, 8))")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("-o", "--loader-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="skip the other backends' loader-only probes")
    p.add_argument("--out", help="folder for the probes' results (default reports/doctor-<time>)")


def cmd_doctor(args, argv) -> int:
    import time
    from pathlib import Path

    from .doctor import Probe, diagnose

    p = Probe(loader=args.loader, model=args.model, data=args.data, batch_size=args.batch_size,
              image_size=args.image_size, steps=args.steps, workers=args.workers, amp=args.amp,
              channels_last=args.channels_last, options=list(args.loader_opt))
    if p.data is None:
        from .synth import default_dataset

        p.data = str(default_dataset())
    out = Path(args.out or f"reports/doctor-{time.strftime('%Y%m%d-%H%M%S')}")
    doc = diagnose(p, out, ["bench", *argv], quick=args.quick)
    print(doc["verdict"])
    print(f"results: {out}")
    return 0


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="find the fastest worker / thread / prefetch settings for a backend",
                       description="Measure a backend over its worker (or thread) counts, then its prefetch "
                       "depth at the best count; print the winner as -o options.")
    p.add_argument("--loader", default="torch")
    p.add_argument("--data")
    p.add_argument("--model", default="small", help="with --end-to-end")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--max-workers", type=int, help="largest count tried (default: the cores)")
    p.add_argument("--end-to-end", action="store_true", help="tune with the model training (default: loader only)")
    p.add_argument("--out", help="folder for the results (default reports/tune-<loader>-<time>)")


def cmd_tune(args, argv) -> int:
    import time
    from pathlib import Path

    from .tune import tune

    data = args.data
    if data is None:
        from .synth import default_dataset

        data = str(default_dataset())
    common = ["--data", data, "--model", args.model, "--batch-size", str(args.batch_size), "--image-size",
              str(args.image_size), "--steps", str(args.steps), "--no-eval"]
    out = Path(args.out or f"reports/tune-{args.loader}-{time.strftime('%Y%m%d-%H%M%S')}")
    doc = tune(args.loader, common, out, ["bench", *argv], trials=args.trials, end_to_end=args.end_to_end,
               max_workers=args.max_workers)
    best = " ".join(doc["best_args"]) or "(the backend's defaults)"
    print(f"best for {args.loader} ({doc['mode']}): {best}  ->  {doc['best_ips']:,.1f} img/s "
          f"(defaults: {doc['default_ips'] or float('nan'):,.1f} img/s)")
    print(f"results: {out}")
    return 0


def _report_parsers(sub) -> None:
    p = sub.add_parser("report", help="render a folder of results into README.md with plots")
    p.add_argument("folder", help="folder holding result JSON files (and sweep.json / tune.json / doctor.json)")
    p.add_argument("--title")
    p.add_argument("--command", dest="produced_by", help="the command that produced the folder (default: the commands recorded in it)")
    p = sub.add_parser("compare", help="ratio per metric between two result files or folders (B / A)")
    p.add_argument("a")
    p.add_argument("b")


def cmd_report(args) -> int:
    from . import report

    print(report.render(args.folder, args.title, args.produced_by))
    return 0


def cmd_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import report

    rows = report.compare(args.a, args.b)
    t = Table(title=f"B / A   (A = {args.a}, B = {args.b})", title_justify="left")
    for col in ("configuration", "metric", "A", "B", "B / A"):
        t.add_column(col)
    fmt = lambda v: "n/a" if v is None else f"{v:,.4g}"  # noqa: E731
    for r in rows:
        t.add_row(r["group"], r["metric"], fmt(r["a"]), fmt(r["b"]), "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}")
    Console().print(t)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Data-loading acceleration benchmarks for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    data = sub.add_parser("data", help="generate or convert datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    _synth_parser(data_sub)
    _convert_parser(data_sub)
    sub.add_parser("backends", help="list the loader backends and whether each is installed")
    _sweep_parser(sub)
    _doctor_parser(sub)
    _tune_parser(sub)
    _report_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    from .runner import UsageError

    try:
        if args.command == "run":
            return cmd_run(args, argv)
        if args.command == "data":
            return cmd_synth(args) if args.data_command == "synth" else cmd_convert(args)
        if args.command == "sweep":
            return cmd_sweep(args, argv)
        if args.command == "doctor":
            return cmd_doctor(args, argv)
        if args.command == "tune":
            return cmd_tune(args, argv)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "compare":
            return cmd_compare(args)
        return cmd_backends(args)
    except (LoaderError, UsageError, SynthError, ResultError, TrainError, SweepError, ReportError, DoctorError,
            TuneError) as exc:
        if not _during_interrupt(exc):
            return _error(exc)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        # DataLoader's SIGCHLD handler raises a dead worker's error wherever the main thread is
        # (often inside the model), not only inside the loader's iteration.
        from loaders.contract import worker_failed

        died = worker_failed(exc, getattr(args, "loader", None) or "data")
        if died is None:
            raise
        if not _during_interrupt(exc):
            return _error(died)
    # Interrupted. Said outside the except block, so that the traceback's frames (and a loader
    # iterator they hold) are gone first: whatever they print on the way out comes before this line.
    gc.collect()
    print("bench: interrupted", file=sys.stderr)
    return 130


def _during_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a Ctrl-C was unwinding: a terminal's SIGINT reaches the
    loader's workers too, and one that dies of it is reported by DataLoader as a dead worker."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _error(exc: Exception) -> int:
    """One line naming the rank (when not rank 0), exit status 2."""
    rank = os.environ.get("RANK")
    prefix = f"bench: error (rank {rank}): " if rank not in (None, "0") else "bench: error: "
    print(prefix + str(exc), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
