"""One run's resolved settings: a frozen ``RunSpec`` holding the backend's typed Options.

Built once from the command line (``add_flags`` is the one flag group of run, sweep, doctor and
tune), carried to a child process with ``to_argv`` / ``from_argv`` (exact inverses), varied with
``dataclasses.replace`` and recorded in the result as it is. Strings exist only at the edges.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from loaders import LoaderError, get_backend
from loaders.backend import Backend

from ..errors import UsageError


@dataclass(frozen=True)
class RunSpec:
    loader: str = "torch"
    options: Any = None  # the backend's Options instance; None: its defaults
    data: str | None = None  # ImageFolder root with train/ (and val/); None: the generated default
    model: str = "small"
    batch_size: int = 64
    image_size: int = 224
    epochs: int | None = None
    steps: int | None = None
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    shard_optimizer: bool = False  # ZeRO-1 (ZeroRedundancyOptimizer) over the ranks
    fsdp: bool = False  # FSDP2 (fully_shard): parameters, gradients and optimizer state sharded
    lr: float = 0.05
    seed: int = 0
    warmup_steps: int = 5
    patience: int = 0
    profile_steps: int = 0  # > 0: torch.profiler over this many steps after warm-up (bench.trainer.profile)
    device: str = "auto"  # auto | cpu | cuda
    gpus: int = 1
    cpu_ranks: int = 0
    cpus: int = 0  # cores per rank the run is confined to (affinity); 0: every core it may use
    on_bad_sample: str = "stop"
    eval: bool = True
    eval_inference_mode: bool = True
    loader_only: bool = False  # fetch batches with no model: the loader's own images/s
    dist_timeout_s: int = 300
    storage: str = "warm"  # warm | cold (evicted from the page cache each epoch) | s3 (object store)
    s3_endpoint: str | None = None  # None: a loopback store started by bench
    s3_bucket: str = "loaderbench"
    s3_latency_ms: float = 0.0  # first-byte latency added by the shaper in front of an http endpoint
    s3_mbps: float = 0.0  # per-connection bandwidth cap (megabits/s); 0: none
    checkpoint: str | None = None  # folder for checkpoints (bench.trainer.checkpoint); None: none
    checkpoint_every: int = 0  # steps between checkpoints; 0: only when SIGTERM asks for one
    resume: bool = False  # continue from the newest checkpoint in ``checkpoint`` (bench run --resume DIR)
    out: str = "reports/runs"
    label: str = ""  # free text recorded in the result (sweep, tune and doctor name their runs with it)

    def __post_init__(self):
        backend = get_backend(self.loader, installed=False)
        if self.options is None:
            object.__setattr__(self, "options", backend.Options())
        elif not isinstance(self.options, backend.Options):
            raise TypeError(
                f"options for {self.loader!r} must be its Options, got {type(self.options).__name__}"
            )

    @property
    def backend(self) -> Backend:
        return get_backend(self.loader)

    @property
    def nprocs(self) -> int:
        return self.cpu_ranks or self.gpus

    def with_loader(self, loader: str, **techniques) -> RunSpec:
        """This spec on another backend, its options at their defaults plus the techniques given."""
        backend = get_backend(loader, installed=False)
        return dataclasses.replace(
            self, loader=loader, options=backend.with_techniques(backend.Options(), **techniques)
        )

    def storage_session(self):
        """The object store this spec reads from, for the life of the command (see bench.storage.store)."""
        from ..storage import store

        return store.session(self.storage, self.s3_endpoint, self.s3_bucket, self.s3_latency_ms, self.s3_mbps)

    def with_options(self, **values) -> RunSpec:
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **values))

    def to_argv(self) -> list[str]:
        """`bench run` arguments that ``from_argv`` turns back into this spec (defaults left out)."""
        argv = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "options" or value == f.default:
                continue
            flag, kind = FLAGS[f.name][0], FLAGS[f.name][1].get("action")
            argv += [flag] if kind in ("store_true", "store_false") else [flag, str(value)]
        defaults = type(self.options)()
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if value != getattr(defaults, f.name):
                argv += ["-o", f"{f.name}={format_value(value)}"]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str]) -> RunSpec:
        p = argparse.ArgumentParser(prog="bench run", exit_on_error=False)
        add_flags(p)
        return cls.from_args(p.parse_args(argv))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> RunSpec:
        """From parsed ``add_flags`` arguments (fields a command has no flag for keep their defaults)."""
        fields = getattr(
            args, "spec_fields", FLAGS
        )  # a command's own flags of the same name are not the spec's
        values = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
        values.update(overrides)
        loader = values.get("loader", "torch")
        backend = get_backend(loader)
        options = {}
        for technique, flag in KNOB_FLAGS.items():
            value = getattr(args, f"knob_{technique}", None)
            if value is None:
                continue
            if technique not in backend.knobs:
                raise UsageError(
                    f"{flag[0]}: loader {loader!r} has no such knob; its options: "
                    f"{', '.join(f.name for f in dataclasses.fields(backend.Options))}"
                )
            options[backend.knobs[technique]] = value
        for option, (flag, _) in OPTION_FLAGS.items():
            value = getattr(args, f"opt_{option}", None)
            if value is None:
                continue
            if option not in backend.option_types():
                raise UsageError(f"{flag}: loader {loader!r} has no {option} option")
            options[option] = value
        types = backend.option_types()
        for item in getattr(args, "loader_opt", None) or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise UsageError(f"-o {item}: expected KEY=VALUE")
            options[key] = parse_value(key, raw, types.get(key, "str"))
        return cls(**values, options=backend.options(**options))

    def record(self) -> dict:
        """The spec as a result records it: its fields, the options as a dict, and the argv."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**d, "loader_options": dataclasses.asdict(self.options), "argv": self.to_argv()}


def format_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def parse_value(key: str, raw: str, hint: str):
    """A -o value as the type the backend's Options field declares (``hint``, e.g. "int | None")."""
    if raw.lower() == "none" and "None" in hint:
        return None
    if "bool" in hint:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise LoaderError(f"-o {key}={raw}: expected true or false")
    for kind in (int, float):
        if kind.__name__ in hint:
            try:
                return kind(raw)
            except ValueError:
                raise LoaderError(f"-o {key}={raw}: expected {kind.__name__}") from None
    return raw


# RunSpec field -> (flag, argparse keywords). One table for every command that takes a spec.
FLAGS: dict[str, tuple[str, dict]] = {
    "loader": ("--loader", dict(help="backend name (see `bench backends`); default torch")),
    "data": (
        "--data",
        dict(help="ImageFolder root with train/ and val/; default: the generated dataset (cached)"),
    ),
    "model": ("--model", dict(help="small | resnet18 | resnet50 (default small)")),
    "batch_size": ("--batch-size", dict(type=int, help="per rank (default 64)")),
    "image_size": ("--image-size", dict(type=int, help="default 224")),
    "epochs": ("--epochs", dict(type=int, help="epochs to train (default 1)")),
    "steps": ("--steps", dict(type=int, help="training steps to run instead of whole epochs")),
    "amp": ("--amp", dict(choices=("off", "bf16", "fp16"))),
    "channels_last": ("--channels-last", dict(action="store_true")),
    "compile": ("--compile", dict(action="store_true", help="torch.compile the model")),
    "shard_optimizer": (
        "--shard-optimizer",
        dict(
            action="store_true", help="shard optimizer state over the ranks (ZeRO-1, ZeroRedundancyOptimizer)"
        ),
    ),
    "fsdp": (
        "--fsdp",
        dict(action="store_true", help="shard weights, gradients and optimizer state (FSDP2 fully_shard)"),
    ),
    "lr": ("--lr", dict(type=float)),
    "seed": ("--seed", dict(type=int)),
    "warmup_steps": ("--warmup-steps", dict(type=int, help="steps excluded from throughput (default 5)")),
    "patience": ("--patience", dict(type=int, help="early stopping on val loss after N bad epochs; 0 = off")),
    "profile_steps": (
        "--profile-steps",
        dict(
            type=int,
            help="profile N steps after warm-up with torch.profiler: kernel time per stream, allocation and "
            "synchronisation calls in the result (its images/s then includes the profiler's cost)",
        ),
    ),
    "device": ("--device", dict(choices=("auto", "cpu", "cuda"))),
    "gpus": ("--gpus", dict(type=int, help="N > 1: N ranks through torchrun, one per GPU")),
    "cpu_ranks": ("--cpu-ranks", dict(type=int, help="N CPU ranks with gloo (DDP without a GPU)")),
    "cpus": (
        "--cpus",
        dict(
            type=int,
            help="confine the run to N cores (per rank with --gpus / --cpu-ranks): main process, "
            "workers and backend threads; default every core",
        ),
    ),
    "on_bad_sample": (
        "--on-bad-sample",
        dict(choices=("stop", "skip"), help="stop (default): fail naming the file; skip: skip and count it"),
    ),
    "eval": ("--no-eval", dict(action="store_false", help="skip validation")),
    "eval_inference_mode": (
        "--eval-with-autograd",
        dict(action="store_false", help="evaluate without torch.inference_mode (the naive baseline)"),
    ),
    "loader_only": (
        "--loader-only",
        dict(action="store_true", help="fetch batches with no model: the loader's own images/s"),
    ),
    "dist_timeout_s": (
        "--dist-timeout",
        dict(type=int, help="seconds a rank waits for the others (default 300)"),
    ),
    "storage": (
        "--storage",
        dict(
            choices=("warm", "cold", "s3"),
            help="where the data lives: warm (page cache, default), cold (evicted before each epoch, "
            "verified), s3 (an object store: a loopback one unless --s3-endpoint)",
        ),
    ),
    "s3_endpoint": (
        "--s3-endpoint",
        dict(help="S3-compatible endpoint URL (credentials: the AWS environment); default: loopback moto"),
    ),
    "s3_bucket": (
        "--s3-bucket",
        dict(help="bucket the data is uploaded to and read from (default loaderbench)"),
    ),
    "s3_latency_ms": (
        "--s3-latency-ms",
        dict(type=float, help="first-byte latency added to every request (http endpoints; default 0)"),
    ),
    "s3_mbps": (
        "--s3-mbps",
        dict(type=float, help="bandwidth per connection, megabits/s (default: unlimited)"),
    ),
    "checkpoint": (
        "--checkpoint",
        dict(
            metavar="DIR",
            help="write resumable checkpoints into DIR (model, optimizer, loader state...): every "
            "--checkpoint-every steps, and at the next step after a SIGTERM (then exit 143)",
        ),
    ),
    "checkpoint_every": (
        "--checkpoint-every",
        dict(type=int, metavar="N", help="steps between checkpoints (default 0: only on SIGTERM)"),
    ),
    # set by `bench run --resume DIR` (which reads DIR's settings) and carried to the ranks
    "resume": ("--resumed", dict(action="store_true", help=argparse.SUPPRESS)),
    "out": ("--out", dict(help="folder for the JSON result (default reports/runs)")),
    "label": ("--label", dict(help="a name recorded in the result (reports group runs by it)")),
}

# Shortcuts for the techniques' knobs, mapped through the backend's own option names.
KNOB_FLAGS: dict[str, tuple[str, dict]] = {
    "workers": ("--workers", dict(type=int, help="worker processes or threads (the backend's parallelism)")),
    "pin_memory": (
        "--pin-memory",
        dict(action="store_const", const=True, help="pinned memory + non_blocking copies"),
    ),
    "persistent": ("--persistent-workers", dict(action="store_const", const=True)),
    "prefetch": (
        "--prefetch-factor",
        dict(type=int, help="batches prefetched (the backend's prefetch option)"),
    ),
    "device_normalize": (
        "--device-normalize",
        dict(action="store_const", const=True, help="uint8 batches, normalised on the device"),
    ),
}

# Flags for one backend option of that name (the backends that lack it refuse the flag).
OPTION_FLAGS: dict[str, tuple[str, dict]] = {
    "address": (
        "--ray-address",
        dict(
            metavar="HOST:PORT",
            help="join this Ray cluster (the ray backend; default RAY_ADDRESS, else a local one)",
        ),
    ),
}

STORAGE_FIELDS = ("storage", "s3_endpoint", "s3_bucket", "s3_latency_ms", "s3_mbps")
# The run-spec fields each harness command varies from (its flags; a verdict's next command keeps these).
COMMAND_FIELDS = {
    "sweep": (
        "data",
        "model",
        "batch_size",
        "image_size",
        "steps",
        "warmup_steps",
        "seed",
        *STORAGE_FIELDS,
        "cpus",
    ),
    "doctor": (
        *("loader", "model", "data", "batch_size", "image_size", "steps", "amp", "channels_last"),
        *(*STORAGE_FIELDS, "cpus"),
    ),
    "tune": ("loader", "data", "model", "batch_size", "image_size", "steps", *STORAGE_FIELDS, "cpus"),
    "plan": ("data", "model", "batch_size", "image_size", "amp", "channels_last", "storage", "seed"),
}


def add_flags(
    p: argparse.ArgumentParser, fields=None, knobs: bool = True, options: bool = True, **defaults
) -> None:
    """The run-spec flags (all, or ``fields``), the loader's knob shortcuts and ``-o``. Unset flags stay
    None, so the RunSpec's own defaults apply unless ``defaults`` names others for a command."""
    p.set_defaults(spec_fields=tuple(FLAGS if fields is None else fields))
    for name, (flag, kw) in FLAGS.items():
        if fields is None or name in fields:
            kw = {**kw, "dest": name}
            if "action" in kw and kw["action"] in ("store_true", "store_false"):
                kw.setdefault("default", None)
            p.add_argument(flag, **kw)
    p.set_defaults(**defaults)
    g = p.add_argument_group("loader options (-o KEY=VALUE for any of the backend's options)")
    for technique, (flag, kw) in KNOB_FLAGS.items() if knobs else ():
        g.add_argument(flag, dest=f"knob_{technique}", **kw)
    for option, (flag, kw) in OPTION_FLAGS.items() if knobs else ():
        g.add_argument(flag, dest=f"opt_{option}", **kw)
    if options:
        g.add_argument("-o", "--loader-opt", action="append", default=[], metavar="KEY=VALUE")
