"""`bench run`: one run of a RunSpec, in this process or as N ranks through torchrun."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from loaders import backends, build_loader, get_backend
from loaders.contract import available_cores, scan_imagefolder

from ..data.convert import folder_storage
from ..data.synth import SynthSpec, default_dataset, default_dataset_path
from ..errors import Preempted, UsageError
from ..storage import regime
from ..trainer import (
    MODELS,
    TrainConfig,
    TrainError,
    all_reduce_values,
    build_model,
    checkpoint,
    measure,
    train,
)
from . import cpus, envinfo
from . import result as results
from .doctor import run_verdict, verdict_lines
from .monitor import ResourceMonitor
from .resume import record_run
from .spec import RunSpec

COMMAND_ENV = "LOADERBENCH_COMMAND"  # the user's command line, handed to the ranks torchrun starts


def check(cfg: RunSpec) -> None:
    """Everything that can be checked before any process or worker starts."""
    if cfg.model not in MODELS:
        raise UsageError(f"unknown --model {cfg.model!r}; known: {', '.join(MODELS)}")
    if cfg.epochs is not None and cfg.steps is not None:
        raise UsageError("use either --epochs or --steps, not both")
    for name in ("batch_size", "image_size", "gpus"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.steps is not None and cfg.steps <= cfg.warmup_steps:
        raise UsageError(
            f"--steps {cfg.steps} leaves nothing to measure after {cfg.warmup_steps} warm-up steps"
        )
    if cfg.cpu_ranks < 0 or (cfg.cpu_ranks and cfg.gpus > 1):
        raise UsageError("use either --gpus N (CUDA ranks) or --cpu-ranks N (CPU ranks with gloo)")
    launched = "WORLD_SIZE" in os.environ
    cpus.check(cfg.cpus, int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched else cfg.nprocs)
    if cfg.cpu_ranks and cfg.device == "cuda":
        raise UsageError("--cpu-ranks runs on the CPU; drop --device cuda")
    wants_cuda = cfg.device == "cuda" or cfg.gpus > 1
    if wants_cuda and not torch.cuda.is_available():
        raise UsageError(
            "CUDA is not available on this machine; use --cpu-ranks N to run N CPU ranks with gloo"
        )
    if cfg.gpus > 1 and torch.cuda.device_count() < cfg.gpus:
        raise UsageError(f"--gpus {cfg.gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise UsageError(f"--amp must be off, bf16 or fp16, got {cfg.amp!r}")
    if cfg.amp == "fp16" and device_for(cfg).type == "cpu":
        raise UsageError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
    if cfg.shard_optimizer and cfg.fsdp:
        raise UsageError("--fsdp shards the optimizer state already; drop --shard-optimizer")
    world = int(os.environ.get("WORLD_SIZE", 1)) if launched else cfg.nprocs
    if (cfg.shard_optimizer or cfg.fsdp) and world < 2:
        flag = "--fsdp" if cfg.fsdp else "--shard-optimizer"
        raise UsageError(f"{flag} shards over ranks: add --gpus N or --cpu-ranks N (N >= 2)")
    if cfg.fsdp and cfg.amp == "fp16":
        raise UsageError(
            "--fsdp with --amp fp16 is not supported here (no sharded loss scaler); use --amp bf16"
        )
    if (cfg.shard_optimizer or cfg.fsdp) and cfg.loader_only:
        raise UsageError("--loader-only trains no model: drop --shard-optimizer / --fsdp")
    if cfg.profile_steps < 0 or (cfg.profile_steps and cfg.warmup_steps < 1):
        raise UsageError("--profile-steps N (N >= 0) profiles after warm-up: it needs --warmup-steps >= 1")
    if cfg.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}")
    if cfg.checkpoint_every and not cfg.checkpoint:
        raise UsageError("--checkpoint-every needs --checkpoint DIR (where the checkpoints go)")
    if cfg.checkpoint and not cfg.resume and checkpoint.latest(Path(cfg.checkpoint)) is not None:
        raise UsageError(
            f"--checkpoint {cfg.checkpoint} holds a checkpoint already "
            f"({checkpoint.latest(Path(cfg.checkpoint)).name}): continue that run with "
            f"`bench run --resume {cfg.checkpoint}`, or choose another folder"
        )
    get_backend(cfg.loader)  # not installed: a clear line
    for flag, folder in (("--out", cfg.out), ("--checkpoint", cfg.checkpoint)):
        if folder is None:
            continue
        try:  # found out now, not after an hour of training
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{flag} {folder}: cannot create the folder ({exc.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise UsageError(f"{flag} {folder}: folder is not writable")


def device_for(cfg: RunSpec) -> torch.device:
    if cfg.cpu_ranks or cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_data(cfg: RunSpec, progress: bool = True) -> tuple[Path, Path | None]:
    """(train folder, val folder or None), checked as torchvision would index them."""
    root = (
        Path(cfg.data) if cfg.data else default_dataset(SynthSpec(), progress=progress)
    )  # one default set, whatever --seed
    if not root.is_dir():
        raise UsageError(f"--data {root}: folder not found")
    backend = cfg.backend
    stored = backend.locate(root, "train", cfg.options)
    if stored is not None:  # the backend's own format (`bench data convert --to ...`)
        return stored, backend.locate(root, "val", cfg.options)
    train_dir, val_dir = root / "train", root / "val"
    readers = [b.name for b in backends() if b.holds(root)]
    if readers:
        fmt = next(b.stored_format for b in backends() if b.holds(root) and b.stored_format)
        raise UsageError(
            f"--data {root} holds {fmt}, which {' or '.join(f'--loader {n}' for n in readers)} "
            f"reads (with the right options), not --loader {backend.name} as asked"
        )
    if not train_dir.is_dir():
        raise UsageError(
            f"--data {root}: expected an ImageFolder root with train/ and val/ (ImageNet layout)"
        )
    n = len(scan_imagefolder(train_dir))
    if n < cfg.nprocs:
        raise UsageError(f"--data {root}: {n} training samples cannot be split over {cfg.nprocs} ranks")
    if val_dir.is_dir():
        scan_imagefolder(val_dir)
        return train_dir, val_dir
    return train_dir, None


def relaunch(cfg: RunSpec, argv: list[str], data_root: Path) -> int:
    """Re-run this spec as N ranks through torchrun (torch.distributed.run); the data is resolved
    (generated once) here, not by N racing ranks."""
    child = ["run", *dataclasses.replace(cfg, data=str(data_root)).to_argv()]
    cmd = [
        sys.executable,
        "-m",
        "bench.harness.torchrun",
        "--standalone",
        f"--nproc-per-node={cfg.nprocs}",
        "-m",
        "bench.cli",
        *child,
    ]
    env = dict(os.environ, LOADERBENCH_LAUNCHED="1", **{COMMAND_ENV: json.dumps(argv)})
    if cfg.cpus:  # each rank confines itself to its own slice (cpus.confine_rank)
        env["OMP_NUM_THREADS"] = str(cfg.cpus)
    elif cfg.cpu_ranks:  # share the cores between ranks instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // cfg.cpu_ranks)))
    proc = subprocess.Popen(cmd, env=env)
    termed = []

    def forward(signum, frame):  # SIGTERM to this process alone (kill PID): torchrun passes it to the ranks
        termed.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
        # the ranks checkpointed and stopped (torchrun itself reports a rank's exit as 1)
        return Preempted.exit_code if termed and code != 0 else code
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches torchrun and the ranks too, and torchrun stops them: wait for
        # it rather than orphan them; pass the signal on only if this process alone received it.
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare(cfg: RunSpec, *splits: Path | None) -> None:
    """Let a backend convert the data once (e.g. ffcv's .beton) before any rank starts."""
    for split in splits:
        if split is not None:
            cfg.backend.prepare(split, cfg.options)


def run(cfg: RunSpec, argv: list[str], log=print, quiet: bool = False) -> Path | None:
    """Run one benchmark in this process (one rank); rank 0 returns the result path. Rank 0 prints
    the result's table and, unless ``quiet``, its verdict (recorded in the result either way)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cores = cpus.confine_rank(cfg.cpus)  # before any worker, backend thread or process group
    device = device_for(cfg)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
        except RuntimeError as exc:  # DistStoreError and kin
            if not lost_a_rank(exc):
                raise
            raise TrainError(
                f"the {world_size} ranks did not all join within --dist-timeout "
                f"({cfg.dist_timeout_s} s): {str(exc).strip().splitlines()[0][:300]}"
            ) from exc
    try:
        return _run(
            cfg, argv, device, rank, world_size, log if rank == 0 else (lambda *a, **k: None), cores, quiet
        )
    except RuntimeError as exc:
        if world_size > 1 and lost_a_rank(exc):
            raise TrainError(
                f"lost contact with another rank ({str(exc).strip().splitlines()[0][:300]}): a rank "
                f"died or stalled; such waits end after --dist-timeout ({cfg.dist_timeout_s} s)"
            ) from exc
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def lost_a_rank(exc: BaseException) -> bool:
    """A collective that failed because a peer is gone or silent (gloo says so in its message)."""
    text = str(
        exc
    ).lower()  # gloo's wordings vary: "Timed out waiting", "Application timeout caused pair closure"...
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        key in text
        for key in ("gloo", "nccl", "connection", "timed out", "timeout", "pair closure", "by peer")
    )


def _run(cfg, argv, device, rank, world_size, log, cores, quiet=False) -> Path | None:
    torch.manual_seed(cfg.seed)
    if rank == 0 or cfg.data:
        train_dir, val_dir = resolve_data(cfg)
    if world_size > 1 and not cfg.data:
        dist.barrier()  # external torchrun without --data: rank 0 generated it
        train_dir, val_dir = resolve_data(cfg, progress=False)
    # fp32 inputs: autocast casts inside the model
    common = dict(
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        device=device,
        dtype=torch.float32,
        channels_last=cfg.channels_last,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        on_bad_sample=cfg.on_bad_sample,
        options=cfg.options,
    )
    # Training drops the last partial batch, as torchvision's and timm's reference scripts do: a
    # ragged final batch (down to 1 sample) breaks BatchNorm and skews step times. The loader
    # contract itself keeps every sample (drop_last=False); the result records the choice.
    wants_val = bool(val_dir and cfg.eval and not cfg.loader_only)
    # What the backend reads for each split, where --storage puts it (uploaded to a bucket for s3).
    local, (train_src, val_src) = regime.sources(
        cfg,
        [train_dir, val_dir if wants_val else None],
        rank,
        dist.barrier if world_size > 1 else lambda: None,
    )
    probe = regime.Probe(cfg, local, [train_src, val_src])
    probe.start()
    train_loader = build_loader(cfg.loader, train_src, train=True, drop_last=True, **common)
    if len(train_loader) == 0:
        train_loader.close()
        raise UsageError(
            f"--batch-size {cfg.batch_size} is larger than this rank's {train_loader.num_samples} "
            f"training samples; lower it"
        )
    if (
        cfg.storage == "cold" and not cfg.backend.is_ceiling
    ):  # evicted before every epoch, the validation split's files with them
        train_loader = regime.Evicting(train_loader, regime.files_of([train_src, val_src]))
    val_loader = build_loader(cfg.loader, val_src, train=False, **common) if wants_val else None
    monitor = None
    try:
        epochs = cfg.epochs or (math.ceil(cfg.steps / len(train_loader)) if cfg.steps else 1)
        tcfg = TrainConfig(
            epochs=epochs,
            max_steps=cfg.steps,
            lr=cfg.lr,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
            warmup_steps=cfg.warmup_steps,
            profile_steps=cfg.profile_steps,
            patience=cfg.patience,
            eval_inference_mode=cfg.eval_inference_mode,
            num_classes=len(train_loader.classes),
            shard="fsdp" if cfg.fsdp else "optimizer" if cfg.shard_optimizer else "off",
        )
        if epochs * len(train_loader) <= cfg.warmup_steps:
            raise UsageError(
                f"{epochs} epoch(s) x {len(train_loader)} steps leaves nothing to measure after "
                f"{cfg.warmup_steps} warm-up steps; raise --epochs or lower --batch-size"
            )
        monitor = ResourceMonitor(gpu_index=device.index if device.type == "cuda" else None).start()
        checkpoints = (
            checkpoint.Checkpoints(cfg.checkpoint, cfg.checkpoint_every, resume=cfg.resume)
            if cfg.checkpoint
            else contextlib.nullcontext()
        )
        if cfg.checkpoint and not cfg.resume and rank == 0:
            record_run(cfg)
        with checkpoints:  # SIGTERM: a checkpoint at the next step boundary, then exit 143
            ckpt = checkpoints if cfg.checkpoint else None
            if cfg.loader_only:
                log(
                    f"loader only: {cfg.loader} on {train_dir}: {len(train_loader)} batches/epoch x {epochs} epoch(s), "
                    f"{world_size} rank(s) on {device}{on_cores(cores)}"
                )
                if ckpt is not None:
                    ckpt.restore({})
                outcome = measure(train_loader, tcfg, device, log=log, checkpoints=ckpt)
            else:
                model = build_model(cfg.model, len(train_loader.classes))
                log(
                    f"training {cfg.model} on {train_dir} with loader {cfg.loader}: {len(train_loader)} steps/epoch "
                    f"x {epochs} epoch(s), {world_size} rank(s) on {device}{on_cores(cores)}"
                )
                outcome = train(model, train_loader, val_loader, tcfg, device, log=log, checkpoints=ckpt)
        resources = monitor.stop()  # this rank's process and its workers
        energy = monitor.energy(outcome.windows)
        if device.type == "cuda":
            resources["torch_cuda_max_allocated_mib"] = round(
                torch.cuda.max_memory_allocated(device) / 2**20, 1
            )
    finally:
        if monitor is not None:
            monitor.stop()  # idempotent; ends the sampling thread when training failed
        train_loader.close()
        if val_loader is not None:
            val_loader.close()
    storage = probe.finish([train_loader, val_loader])
    skipped = len(train_loader.skipped) + (len(val_loader.skipped) if val_loader else 0)
    skipped, disk = all_reduce_values([skipped, storage["bytes_read_from_disk"]], device)  # every rank's
    skipped, storage["bytes_read_from_disk"] = int(skipped), int(disk)
    # every rank's GPU; measured only if every rank measured it
    joules, unmeasured = all_reduce_values([energy.get("joules", 0.0), float(not energy["measured"])], device)
    if energy["measured"] and unmeasured:
        energy = {
            "measured": False,
            "why": f"{int(unmeasured)} of {world_size} ranks could not read their GPU's energy",
        }
    elif energy["measured"]:
        energy.update(joules=joules, gpus=world_size)
    if cores is not None:  # how many ranks were confined to each core: 1 everywhere = disjoint slices
        machine = os.cpu_count() or 1
        per_core = all_reduce_values([float(c in cores) for c in range(machine)], device)
        ranks_on = {c: int(n) for c, n in enumerate(per_core) if n}
    if rank != 0:
        return None
    config = cfg.record()
    config.update(
        world_size=world_size,
        device=str(device),
        epochs=epochs,
        data=str(train_dir.parent),
        train_drop_last=True,
        cpu_cores=cores,  # rank 0's slice under --cpus; None: not confined
        cpu_cores_ranks=ranks_on if cores is not None else None,  # core -> ranks confined to it
    )
    loader_info = train_loader.describe()
    loader_info["skipped_files"] = (train_loader.skipped + (val_loader.skipped if val_loader else []))[:50]
    data = {
        "read_from": str(train_src),
        "train": str(train_dir),
        "val": str(val_dir) if val_dir else None,
        "train_samples": train_loader.num_samples * world_size - train_loader.padding,
        "classes": len(train_loader.classes),
        "storage": cfg.backend.storage_stats(train_dir) or folder_storage(train_dir),
    }
    if "storage" in loader_info:  # re-stored by the backend (ffcv's .beton): what it really read
        data["storage"]["backend_storage"] = loader_info["storage"]
    res = results.new_result(
        command=["bench", *command_of(argv)],
        config=config,
        environment=envinfo.collect(),
        data=data,
        loader=loader_info,
        metrics=results.metrics_from(outcome, skipped, resources),
        samples={
            "step_time_s": outcome.step_time,
            "data_wait_s": outcome.data_wait,
            "compute_time_s": outcome.compute,
        },
    )
    res.metrics.storage = storage
    res.metrics.profile = outcome.profile
    res.metrics.energy = results.energy_fields(energy, outcome.measured_images, data["train_samples"])
    res.metrics.first_batch_seconds = outcome.first_batch_seconds
    res.metrics.start_to_first_batch_seconds = (
        None if outcome.first_batch_seconds is None else outcome.first_batch_at - _process_start()
    )
    if cfg.checkpoint:
        res.metrics.checkpoint = {**ckpt.record(), "loader_state_ms": _state_ms(train_loader)}
    if storage.get("staging_s") and outcome.measured_seconds:  # FFCV's real cost: its copy of the bucket
        storage["images_per_second_with_staging"] = outcome.measured_images / (
            outcome.measured_seconds + storage["staging_s"]
        )
    res.metrics.verdict = run_verdict(
        cfg,
        res.metrics,
        device.type == "cuda",
        len(cores) if cores else available_cores(),
        str(default_dataset_path()),
    )
    path = results.save(res, cfg.out)
    from rich.console import Console

    Console().print(results.table(res, path))
    if not quiet:
        log(verdict_lines(res.metrics.verdict))
    return path


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _state_ms(loader) -> float | None:
    """What one ``state_dict()`` of the training loader costs (median of 5, ms)."""
    if not hasattr(loader, "state_dict"):
        return None
    times = []
    for _ in range(5):
        t = time.perf_counter()
        loader.state_dict()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[2]


def on_cores(cores: list[int] | None) -> str:
    return f", confined to {len(cores)} core(s) ({cpus.describe(cores)}) per rank" if cores else ""


def command_of(argv: list[str]) -> list[str]:
    """The command line the user typed: this process's, or the launcher's for a rank of torchrun's."""
    return json.loads(os.environ[COMMAND_ENV]) if COMMAND_ENV in os.environ else argv
