"""The `bench` command line: parsers and dispatch only; the work lives in harness/ and data/."""

from __future__ import annotations

import _thread
import argparse
import dataclasses
import faulthandler
import gc
import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

from loaders import launch
from loaders.contract import LoaderError

from .errors import BenchError, Preempted, UsageError
from .harness.spec import COMMAND_FIELDS, STORAGE_FIELDS, RunSpec, add_flags


def _default_data(spec: RunSpec) -> RunSpec:
    """The generated default set, made once here rather than inside the first trial's timing."""
    if spec.data is not None:
        return spec
    from .data.synth import default_dataset

    return dataclasses.replace(spec, data=str(default_dataset()))


# -- run -----------------------------------------------------------------------------------------


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="train with one loader and write a result of record",
        description="Train a model with one loader; rank 0 writes a JSON result under --out.",
    )
    add_flags(p)
    p.add_argument(
        "--resume",
        dest="resume_dir",
        metavar="DIR",
        help="continue the run whose checkpoints are in DIR, with its settings (flags given here "
        "override them, e.g. --cpu-ranks N to resume on another number of ranks)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no verdict after the table (the result records it anyway)"
    )


def cmd_run(args, argv: list[str]) -> int:
    from .harness import runner

    try:  # under srun: torchrun's variables from SLURM's, before anything reads them
        launch.adopt()
    except launch.LaunchError as exc:
        raise UsageError(str(exc)) from None
    spec = RunSpec.from_args(args)
    runner.check(spec)
    launched = "WORLD_SIZE" in os.environ  # under torchrun / srun already: we are one rank
    if spec.nprocs > 1 and not launched:
        train_dir, val_dir = runner.resolve_data(spec)
        runner.prepare(spec, train_dir, val_dir if spec.eval and not spec.loader_only else None)
        return runner.relaunch(spec, argv, train_dir.parent)
    runner.run(spec, argv, quiet=args.quiet)
    return 0


# -- data ----------------------------------------------------------------------------------------


def _synth_parser(sub) -> None:
    from .data.synth import SynthSpec

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
    from .data.synth import SynthSpec, generate

    spec = SynthSpec(
        classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        width=args.width,
        height=args.height,
        quality=args.quality,
        seed=args.seed,
    )
    m = generate(args.out, spec, workers=args.workers)
    print(
        f"{args.out}: {m['images']['train']} train + {m['images']['val']} val images, mean "
        f"{m['mean_bytes'] / 1e3:.1f} KB at {m['mean_width']:.0f}x{m['mean_height']:.0f} px, q{spec.quality}"
    )
    return 0


# storage flags of `bench data convert` -> the backends' option names (each passed only when given)
STORAGE_FLAGS = {
    "--max-resolution": ("max_resolution", int, "longest side cap in px (folder: required; wds: re-encodes)"),
    "--jpeg-quality": ("jpeg_quality", int, "JPEG quality of re-encoded images (default 90)"),
    "--write-mode": ("write_mode", str, "ffcv: jpg (re-encoded), raw (pixels), proportion (a mix), smart"),
    "--compress-probability": ("compress_probability", float, "ffcv --write-mode proportion"),
    "--shard-samples": ("shard_samples", int, "wds: samples per shard (default: from --shard-mb)"),
    "--shard-mb": ("shard_mb", float, "wds: shard size in MB without --shard-samples (>= 16 shards)"),
    "--seed": ("shard_seed", int, "wds: seed of the sample order written"),
}


def _convert_parser(sub) -> None:
    from loaders import backends

    targets = [b.name for b in backends() if b.stored_format] + ["folder"]
    p = sub.add_parser(
        "convert",
        help="convert an ImageFolder root to a backend's stored format or a resized folder",
        description="Convert an ImageFolder root (train/, val/) to another storage format: "
        + "; ".join(f"{b.name}: {b.stored_format}" for b in backends() if b.stored_format)
        + "; folder: a resized ImageFolder.",
    )
    p.add_argument("--to", required=True, choices=targets)
    p.add_argument("--data", help="ImageFolder root; default: the generated dataset")
    p.add_argument("--out", required=True, help="output folder")
    for flag, (dest, kind, help_) in STORAGE_FLAGS.items():
        p.add_argument(flag, dest=f"store_{dest}", type=kind, help=help_)
    p.add_argument(
        "-o",
        "--loader-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other option of the target backend",
    )
    p.add_argument("--workers", type=int, help="processes (default: all cores)")


def _upload_parser(sub) -> None:
    p = sub.add_parser(
        "upload",
        help="put what a backend reads into an S3 bucket (once; manifest last)",
        description="Upload the train and val splits as --loader reads them (its stored format, converted "
        "first if needed) to --s3-bucket; `bench run --storage s3` then reads them. Without --s3-endpoint "
        "the loopback store lives only as long as this command: useful to check an upload, not to keep it.",
    )
    add_flags(p, fields=("loader", "data", "s3_endpoint", "s3_bucket"), knobs=False)


def cmd_upload(args) -> int:
    from .harness.runner import resolve_data
    from .storage import upload

    spec = _default_data(RunSpec.from_args(args, storage="s3"))
    with spec.storage_session():
        for split in resolve_data(spec):
            if split is not None:
                stored = spec.backend.stored(split, spec.options)
                print(upload.upload(stored, spec.s3_bucket, create_bucket=spec.s3_endpoint is None))
    return 0


def cmd_convert(args) -> int:
    from loaders import get_backend

    from .data import convert
    from .data.synth import default_dataset

    root = Path(args.data) if args.data else default_dataset()
    out = Path(args.out)
    given = {k[6:]: v for k, v in vars(args).items() if k.startswith("store_") and v is not None}
    if args.to == "folder":
        if "max_resolution" not in given:
            raise LoaderError("--to folder needs --max-resolution")
        m = convert.to_folder(root, out, given["max_resolution"], given.get("jpeg_quality", 90), args.workers)
        print(
            f"{out}: {m['images']} images, mean {m['mean_bytes'] / 1e3:.1f} KB at {m['mean_width']:.0f}x"
            f"{m['mean_height']:.0f} px, q{m['jpeg_quality']}, in {m['seconds']:.1f} s"
        )
        return 0
    backend = get_backend(args.to)
    flags = {dest: flag for flag, (dest, _, _) in STORAGE_FLAGS.items()}
    unknown = [flags[k] for k in given if k not in backend.option_types()]
    if unknown:
        raise LoaderError(f"--to {args.to} has no storage setting {', '.join(unknown)}")
    base = RunSpec.from_args(argparse.Namespace(loader=args.to, loader_opt=args.loader_opt))
    for line in convert.to_backend(backend, root, out, base.with_options(**given).options, args.workers):
        print(line)
    return 0


def cmd_backends(args) -> int:
    from loaders import backends

    for b in backends():
        state = "installed" if b.installed else f"not installed ({b.install_hint()})"
        print(f"{b.name:10s} {state:12s}  {b.summary}")
    return 0


# -- the harness ---------------------------------------------------------------------------------

# name: (help, description, default --out); the run-spec fields each varies from: COMMAND_FIELDS
HARNESS = {
    "sweep": (
        "the techniques ladder: each technique's end-to-end speedup",
        "Switch training-acceleration techniques on one at a time from a naive baseline; every step several "
        "`bench run` trials. Writes sweep.json + results to a new --out folder and renders them with "
        "`bench report`.",
        "reports/sweep-<time>",
    ),
    "doctor": (
        "input-bound or compute-bound? what to try first, with the numbers",
        "Probe the synthetic ceiling, the loader alone and the two together; say which limits training "
        "and what to try first.",
        "reports/doctor-<time>",
    ),
    "tune": (
        "find the fastest worker / thread / prefetch settings for a backend",
        "Measure a backend over its worker (or thread) counts, then its prefetch depth at the best count; "
        "print the winner as -o options.",
        "reports/tune-<loader>-<time>",
    ),
}


WORKERS = {  # each command's parallelism flag: (flag, default, help)
    "sweep": ("--workers", 0, "workers / threads when switched on (default min(cores, 8); cores: --cpus)"),
    "doctor": ("--workers", 0, "workers / threads (default min(cores, 8); cores: --cpus)"),
    "tune": ("--max-workers", None, "largest count tried (default: the cores, or --cpus)"),
}


def _harness_parsers(sub) -> None:
    """sweep, doctor, tune: the run-spec flags each varies from (at 30 steps), --out, and their own."""
    from .harness.sweep import Settings, techniques

    p = {}
    for name, (help_, description, out) in HARNESS.items():
        p[name] = sub.add_parser(name, help=help_, description=description)
        add_flags(p[name], fields=COMMAND_FIELDS[name], knobs=False, options=name == "doctor", steps=30)
        p[name].add_argument("--out", help=f"folder for the results (default {out})")
        flag, default, what = WORKERS[name]
        p[name].add_argument(flag, type=int, default=default, help=what)
    d = Settings()
    sw = p["sweep"]
    sw.add_argument("--trials", type=int, default=d.trials, help=f"trials per step (default {d.trials})")
    sw.add_argument(
        "--ceiling-trials",
        type=int,
        default=d.ceiling_trials,
        help="synthetic-ceiling trials per model setting (0: no %% of ceiling)",
    )
    sw.add_argument(
        "--techniques",
        default=",".join(techniques()),
        help="comma-separated, in ladder order (default: all): " + ", ".join(techniques()),
    )
    sw.add_argument(
        "--ranks", type=int, default=0, help="DDP ranks (default: the GPUs; 2 CPU ranks without CUDA)"
    )
    sw.add_argument("--amp", default="auto", help="auto (bf16 where supported) | bf16 | fp16")
    sw.add_argument("--early-stop-epochs", type=int, default=d.early_stop_epochs)
    sw.add_argument("--target-accuracy", type=float, default=d.target_accuracy)
    sw.add_argument(
        "--keep-all", action="store_true", help="keep every technique, even one that slowed training"
    )
    sw.add_argument(
        "--trial-timeout",
        type=float,
        default=d.trial_timeout,
        help=f"seconds before a trial is called failed (default {d.trial_timeout:.0f})",
    )
    sw.add_argument("--title", help="report title")
    sw.add_argument(
        "--resume",
        metavar="DIR",
        help="finish the interrupted sweep in DIR with the settings it recorded: trials whose results "
        "are there are not run again",
    )
    p["doctor"].add_argument(
        "--quick", action="store_true", help="skip the other backends' loader-only probes"
    )
    p["tune"].add_argument("--trials", type=int, default=1)
    p["tune"].add_argument(
        "--end-to-end", action="store_true", help="tune with the model training (default: loader only)"
    )


def cmd_sweep(args, argv) -> int:
    from .harness import report
    from .harness.sweep import Settings, Sweep

    s = Settings(
        spec=_default_data(RunSpec.from_args(args)),
        trials=args.trials,
        ceiling_trials=args.ceiling_trials,
        workers=args.workers,
        ranks=args.ranks,
        amp=args.amp,
        early_stop_epochs=args.early_stop_epochs,
        target_accuracy=args.target_accuracy,
        keep_all=args.keep_all,
        trial_timeout=args.trial_timeout,
        techniques=tuple(t.strip() for t in args.techniques.split(",") if t.strip()),
    )
    out = Path(args.out or f"reports/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    Sweep(s, out, ["bench", *argv], resume=bool(args.resume)).run()
    path = report.render(out, args.title)
    print("\n".join(path.read_text().split("## Plots")[0].splitlines()[-40:]))
    print(f"report: {path}")
    return 0


def cmd_doctor(args, argv) -> int:
    from .harness.doctor import diagnose

    spec = _default_data(RunSpec.from_args(args))
    out = Path(args.out or f"reports/doctor-{time.strftime('%Y%m%d-%H%M%S')}")
    doc = diagnose(spec, out, ["bench", *argv], workers=args.workers, quick=args.quick)
    print(doc["verdict"])
    print(f"results: {out}")
    return 0


def cmd_tune(args, argv) -> int:
    from .harness.tune import tune

    spec = _default_data(RunSpec.from_args(args, eval=False))
    out = Path(args.out or f"reports/tune-{spec.loader}-{time.strftime('%Y%m%d-%H%M%S')}")
    doc = tune(
        spec,
        out,
        ["bench", *argv],
        trials=args.trials,
        end_to_end=args.end_to_end,
        max_workers=args.max_workers,
    )
    best = " ".join(doc["best_args"]) or "(the backend's defaults)"
    print(
        f"best for {spec.loader} ({doc['mode']}): {best}  ->  {doc['best_ips']:,.1f} img/s "
        f"(defaults: {doc['default_ips'] or float('nan'):,.1f} img/s)"
    )
    print(f"results: {out}")
    return 0


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict which loader wins at a CPU budget, and how many cores N GPUs need",
        description="Measure each installed backend's loader-only images/s at 1..K cores here, the model's "
        "rate (on these cores, or --gpu-rate / --gpu) and the storage read rate, then predict end-to-end "
        "images/s per backend for --gpus G on --cores-per-node C. Writes plan.json and plan.png (the "
        "crossover map) to --out. Model and validation: docs/plan.md.",
    )
    add_flags(
        p,
        fields=COMMAND_FIELDS["plan"],
        knobs=False,
        options=False,
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node of the target (default 1)")
    p.add_argument(
        "--cores-per-node", type=int, default=0, help="cores per node of the target (default: here)"
    )
    p.add_argument("--nodes", type=int, default=1)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--gpu-rate", type=float, help="one GPU's training rate for this model, images/s")
    rate.add_argument("--gpu", help="a GPU from the table of published rates (docs/plan.md), e.g. a100-80gb")
    p.add_argument(
        "--cpu-nodes",
        type=int,
        default=0,
        help="a pool of K CPU nodes that decodes for every GPU (the ray backend on a cluster): predicted "
        "from Ray's per-image costs measured here, with the nodes needed for 95 %% of the GPU",
    )
    p.add_argument("--cores-per-cpu-node", type=int, default=0, help="cores of each CPU node in the pool")
    p.add_argument(
        "--network-gbps",
        type=float,
        help="each trainer node's link to the pool, Gbit/s (default: not modelled)",
    )
    p.add_argument("--loaders", help="comma-separated backends (default: every installed one)")
    p.add_argument("--max-cores", type=int, default=0, help="measure at 1..N cores (default: all here)")
    p.add_argument("--steps", type=int, default=16, help="batches per measurement (3 of them warm-up)")
    p.add_argument(
        "--trials", type=int, default=1, help="loader measurements per core count, median taken (default 1)"
    )
    p.add_argument(
        "--measured",
        help="folder of `bench run` results: `--cpus N` ones are drawn on the map; CUDA training ones give "
        "each loader's GPU cost (its GPU time per step over synthetic's)",
    )
    p.add_argument(
        "--gpu-cost",
        action="append",
        metavar="NAME=RATIO",
        help="a loader's GPU time per step over synthetic's (e.g. dali=1.3: its GPU decode slows the model); "
        "repeatable, overrides --measured",
    )
    p.add_argument("--out", help="folder for plan.json and plan.png (default reports/plan-<time>)")


def cmd_plan(args, argv) -> int:
    from .harness import plan

    spec = _default_data(RunSpec.from_args(args, eval=False))
    target = plan.target_from(args, spec.model)
    out = Path(args.out or f"reports/plan-{time.strftime('%Y%m%d-%H%M%S')}")
    loaders = [n.strip() for n in args.loaders.split(",")] if args.loaders else None
    doc = plan.plan(
        spec,
        target,
        out,
        ["bench", *argv],
        loaders,
        args.max_cores,
        Path(args.measured) if args.measured else None,
        args.steps,
        args.trials,
    )
    _print_plan(doc)
    print(
        f"plan: {out / 'plan.json'}, map: {out / 'plan.png'} (measured in {doc['measured']['seconds']:.0f} s)"
    )
    return 0


def _print_plan(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = doc["target"]
    where = (
        f"{t['nodes']} node(s) x {t['gpus']} GPU(s) at {t['gpu_rate']:,.0f} img/s each, "
        f"{t['cores_per_node']} cores per node ({t['cores_per_node'] / t['gpus']:g} per GPU)"
        if t["gpu_rate"]
        else f"the CPU: {t['cores_per_node']} cores, the model trains on them too"
    )
    table = Table(title=f"{doc['spec']['model']} on {where}", title_justify="left")
    for col in ("loader", "img/s per GPU", "img/s in all", "bound", "cores/GPU for 95 %", "what to change"):
        table.add_column(col)
    for r in sorted(doc["predictions"], key=lambda r: -r["per_gpu_ips"]):
        need = r["cores_per_gpu_for_95"]
        nodes = r.get("cpu_nodes_for_95")
        table.add_row(
            r["loader"],
            f"{r['per_gpu_ips']:,.0f}",
            f"{r['total_ips']:,.0f}",
            r["bound"],
            f"{nodes} CPU node(s)" if nodes else "-" if need is None else str(need),
            r["advice"],
        )
    Console(width=160).print(table)


def _report_parsers(sub) -> None:
    p = sub.add_parser("report", help="render a folder of results into README.md with plots")
    p.add_argument(
        "folder",
        nargs="?",
        help="folder holding result JSON files (and sweep.json / tune.json / doctor.json); with --check: "
        "the folder of results folders (default reports)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="list the results folders whose producing commit predates a change to the code they measure "
        "(loaders/, bench/trainer/); exit 1 if one of them does not say which commit and machine it is from",
    )
    p.add_argument("--title")
    p.add_argument(
        "--command",
        dest="produced_by",
        help="the command that produced the folder (default: the commands recorded in it)",
    )
    p.add_argument(
        "--html",
        action="store_true",
        help="write only index.html, from the folder's README.md as it is and its results (for folders "
        "whose README a script wrote); without it, README.md and index.html are both rendered",
    )
    p = sub.add_parser("compare", help="ratio per metric between two result files or folders (B / A)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--html", metavar="FILE", help="also write the comparison as a self-contained HTML page")


def cmd_report(args) -> int:
    from .harness import report

    if args.check:
        rows = report.check(args.folder or "reports")
        for r in rows:
            mark = "ok" if r["ok"] else "UNLABELLED"
            label = " (labelled with its commit and machine)" if r["labelled"] and r["changes"] else ""
            print(f"{mark:10s} {r['folder']:24s} {r['commit'] or '-':10s} {r['status']}{label}")
        bad = [r["folder"] for r in rows if not r["ok"]]
        if bad:
            raise UsageError(
                f"{len(bad)} results folder(s) predate the code they measure and do not say so: {', '.join(bad)} "
                "(re-measure them, or name the commit and machine in their README.md)"
            )
        return 0
    if args.folder is None:
        raise UsageError("bench report: a results folder is needed (or --check)")
    if args.html:
        print(report.render_html(args.folder))
        return 0
    path = report.render(args.folder, args.title, args.produced_by)
    print(path)
    print(path.parent / "index.html")
    return 0


def cmd_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .harness import report

    rows = report.compare(args.a, args.b)
    t = Table(title=f"B / A   (A = {args.a}, B = {args.b})", title_justify="left")
    for col in ("configuration", "metric", "A", "B", "B / A"):
        t.add_column(col)
    fmt = lambda v: "n/a" if v is None else f"{v:,.4g}"  # noqa: E731
    for r in rows:
        t.add_row(
            r["group"],
            r["metric"],
            fmt(r["a"]) if r["a"] is not None or "joules" not in r["metric"] else "not measured",
            fmt(r["b"]) if r["b"] is not None or "joules" not in r["metric"] else "not measured",
            "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}",
        )
    Console().print(t)
    if args.html:
        from .harness import html

        print(html.render_compare(rows, args.a, args.b, Path(args.html)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Data-loading acceleration benchmarks for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    data = sub.add_parser("data", help="generate or convert datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    _synth_parser(data_sub)
    _convert_parser(data_sub)
    _upload_parser(data_sub)
    sub.add_parser("backends", help="list the loader backends and whether each is installed")
    _harness_parsers(sub)
    _plan_parser(sub)
    _report_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    previous = sys.unraisablehook
    sys.unraisablehook = _keep_interrupts(previous)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how a stuck run says where it is
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (io.UnsupportedOperation, ValueError):  # called in-process with a captured stderr (tests)
        pass
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        sys.unraisablehook = previous
    if argv is None and launch.is_rank():  # a rank of a multi-process job, as a program
        launch.exit_now(code)
    return code


def _keep_interrupts(default):
    """A Ctrl-C that lands while a weakref callback or ``__del__`` runs is printed and dropped by
    Python ("Exception ignored in ..."), and the run goes on to the end. DataLoader's shared-memory
    cache runs such callbacks for every batch it receives, so that happened (one Ctrl-C test run in
    some dozens). The dropped interrupt is raised again in the main thread once the callback is over
    (from another thread: raised from the hook, it would be dropped with the hook's own error)."""

    def again():
        time.sleep(0.01)
        _thread.interrupt_main()

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Thread(target=again, daemon=True).start()
        elif not numba_finaliser_keyerror(unraisable):
            default(unraisable)

    return hook


def resumed(args, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`bench sweep --resume DIR [--title T]`: the arguments of the sweep that DIR records."""
    import json

    folder = Path(args.resume)
    own = {"sweep", "--resume", args.resume, "--title", args.title}
    extra = [a for a in argv if a not in own and not a.startswith(("--resume=", "--title="))]
    if extra:
        raise UsageError(
            f"--resume takes the settings recorded in {folder / 'sweep.json'}; drop {' '.join(extra)}"
        )
    try:
        command = json.loads((folder / "sweep.json").read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resume {folder}: no readable sweep.json there ({exc})") from None
    old = parser().parse_args(command[1:])
    old.out, old.resume, old.title = str(folder), str(folder), args.title or old.title
    return old, command[1:]


def numba_finaliser_keyerror(unraisable) -> bool:
    """numba's dispatcher finaliser raises KeyError when the cyclic GC has already cleared its
    overloads dict (FFCV builds new numba functions per Loader); harmless, upstream."""
    tb = unraisable.exc_traceback
    if not isinstance(unraisable.exc_value, KeyError) or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return code.co_name == "finalizer" and "numba" in code.co_filename


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    with_argv = {"run": cmd_run, "sweep": cmd_sweep, "doctor": cmd_doctor, "tune": cmd_tune, "plan": cmd_plan}
    try:
        if args.command == "sweep" and args.resume:
            args, argv = resumed(args, argv)
        if args.command == "run" and args.resume_dir:  # before the storage session: it may be s3
            from .harness.resume import resumed_run

            args, _ = resumed_run(args, argv, parser())  # the result records the command as typed
        if args.command in with_argv:
            # One object store (and shaper) for the whole command: every trial, every rank.
            spec = RunSpec(
                **{f: getattr(args, f) for f in STORAGE_FIELDS if getattr(args, f, None) is not None}
            )
            with spec.storage_session():
                return with_argv[args.command](args, argv)
        if args.command == "data":
            return {"synth": cmd_synth, "convert": cmd_convert, "upload": cmd_upload}[args.data_command](args)
        return {"report": cmd_report, "compare": cmd_compare, "backends": cmd_backends}[args.command](args)
    except Preempted as exc:  # checkpointed on SIGTERM: the status a requeue script looks for
        if os.environ.get("RANK", "0") == "0":
            print(f"bench: preempted: {exc}", file=sys.stderr)
        return exc.exit_code
    except (LoaderError, BenchError) as exc:
        if not _during_interrupt(exc):
            return _error(exc)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        # DataLoader's SIGCHLD handler raises a dead worker's error wherever the main thread is
        # (often inside the model), not only inside the loader's iteration.
        from loaders.workers import worker_failed

        died = worker_failed(exc, getattr(args, "loader", None) or RunSpec.loader)
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
