"""The training loop: DDP + AMP + channels_last + torch.compile, early stopping, timing.

It takes any iterables of ``(images, labels)`` already on the device and never asks which
backend made them. Throughput is images / training wall time after warm-up (evaluation time is
measured apart), summed over ranks; per step it records the time blocked on ``next(loader)``
and the compute time (CUDA events on GPU, the host clock on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import BenchError, Preempted
from . import profile


class TrainError(BenchError):
    """A run the trainer cannot carry out as configured: one clear line."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many training steps, whatever the epoch
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-5
    amp: str = "off"  # off | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    warmup_steps: int = 5  # excluded from throughput (allocator, cuDNN autotune, worker start)
    patience: int = 0  # early stopping on validation loss; 0 = off
    min_delta: float = 0.0
    eval_inference_mode: bool = True  # False: evaluate with autograd on (the naive baseline)
    num_classes: int = 0  # > 0: count each epoch's labels over all ranks (EpochRecord's coverage)
    shard: str = "off"  # off (DDP) | optimizer (ZeRO-1: optimizer state sharded) | fsdp (FSDP2 fully_shard)
    profile_steps: int = 0  # > 0: torch.profiler over this many steps after warm-up (profile.py)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float | None
    train_seconds: float
    eval_seconds: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    train_coverage: dict | None = None  # labels read this epoch, all ranks (``coverage``)
    val_coverage: dict | None = None


def _count(counts: torch.Tensor, labels: torch.Tensor) -> None:
    # scatter_add, not bincount: CUDA's bincount reads the largest label back to the host, a sync
    # in every measured step.
    counts.scatter_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))


def coverage(counts: torch.Tensor, device: torch.device) -> dict:
    """Summary of one epoch's label counts summed over ranks: the images read, the classes seen and
    the fewest and most images of one class. With one image per class this proves exactly-once
    reading across ranks and nodes (min 1, images = samples + padding)."""
    (total,) = all_reduce_values([counts.double()], device)
    total = total.round().long()
    return {
        "images": int(total.sum()),
        "classes_seen": int((total > 0).sum()),
        "per_class_min": int(total.min()),
        "per_class_max": int(total.max()),
    }


def _loop_state(epoch, steps, epoch_steps, loss_sum, counts, records, device) -> dict:
    """The measured loop's place, as a checkpoint holds it (every rank calls it): plain numbers and
    lists; the epoch's label counts summed over ranks, its loss sum averaged over them, so that a
    resume on another number of ranks still adds up."""
    world = _world()[1]
    (loss,) = all_reduce_values([float(loss_sum)], device)
    if counts is not None:
        (counts,) = all_reduce_values([counts.double()], device)
    return {
        "epoch": epoch,
        "steps": steps,
        "epoch_steps": epoch_steps,
        "loss_sum": loss / world,
        "counts": None if counts is None else counts.round().long().tolist(),
        "records": [vars(r) for r in records],
    }


@dataclass
class TrainResult:
    images_per_second: float  # all ranks, after warm-up
    measured_images: int  # all ranks, after warm-up
    measured_seconds: float
    steps: int
    data_wait: list[float] = field(default_factory=list)  # per measured step, this rank (s)
    compute: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False
    memory: dict | None = None  # per-rank lists of what ``memory_per_rank`` measures
    first_batch_seconds: float | None = None  # from the loop's start to its first batch (a resume's cost)
    first_batch_at: float | None = None  # wall-clock time (time.time()) of that batch
    # the measured window as intervals of time.perf_counter() (checkpoint saves cut it): what the
    # energy counters are read over
    windows: list[tuple[float, float]] = field(default_factory=list)
    profile: dict | None = None  # profile.summarise of the profiled steps (TrainConfig.profile_steps)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_values(values: list[float], device: torch.device, op=None) -> list[float]:
    """Sum (or ``op``) a few numbers over all ranks; one rank returns them as they are."""
    if _world()[1] == 1:
        return values
    if len(values) == 1 and isinstance(values[0], torch.Tensor):  # one tensor, reduced as it is
        t = values[0].to(device, torch.float64).clone()
    else:
        t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    if dist.get_backend() == "gloo":
        _until_released(t)
    return [t] if isinstance(values[0], torch.Tensor) else t.tolist()


def _until_released(t: torch.Tensor, limit_s: float = 5.0) -> None:
    """Hold ``t`` until gloo's worker thread has dropped its reference to it.

    The worker lets go of a finished collective's tensors a moment after ``wait()`` returns (in about
    one all-reduce in ten here). If Python has dropped the tensor first, that release must take the
    GIL; once the interpreter is shutting down, taking it ends the thread through a C++ noexcept
    frame and the process aborts ("terminate called without an active exception", SIGABRT) after all
    its work is done: a rank exiting right after its last all-reduce, 4 runs in 43 on this 2-core box.
    destroy_process_group() does not stop gloo's threads, so nothing else closes the window."""
    deadline = time.monotonic() + limit_s
    while t._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.0002)


class _StepClock:
    """Compute time per step: CUDA events on GPU (read once at the end), host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.spans: list = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, begin) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.spans.append((begin, e))
        else:
            self.spans.append(time.perf_counter() - begin)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self) -> list[float]:
        self.sync()
        return [b.elapsed_time(e) / 1e3 for b, e in self.spans] if self.cuda else list(self.spans)


def evaluate(
    model: nn.Module, loader, cfg: TrainConfig, device: torch.device, counts: torch.Tensor | None = None
) -> tuple[float, float]:
    """(mean loss, accuracy) over every rank's shard; ``counts`` (per class) adds the labels read."""
    model.eval()
    grad_ctx = torch.inference_mode() if cfg.eval_inference_mode else contextlib.nullcontext()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    with grad_ctx, _autocast(cfg, device):
        for images, labels in loader:
            logits = model(images)
            # detached: evaluating with autograd on (the naive baseline) must not keep every batch's graph
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").detach().double()
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.numel()
            if counts is not None:
                _count(counts, labels)
    total_loss, total_correct, total_seen = all_reduce_values([loss_sum.item(), correct.item(), seen], device)
    if total_seen == 0:
        return math.nan, math.nan
    return total_loss / total_seen, total_correct / total_seen


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[cfg.amp])


def measure(
    loader,
    cfg: TrainConfig,
    device: torch.device,
    step=None,
    end_epoch=None,
    log=print,
    what: str = "batches fetched",
    checkpoints=None,
    objects: dict | None = None,
) -> TrainResult:
    """The one measured loop. Epochs of ``loader``; per batch ``step(images, labels)`` (None: loader
    only, no model) and after each epoch ``end_epoch(record)``, which may fill in evaluation and
    return True to stop. Throughput: images after ``warmup_steps`` batches / the wall time of the
    batches themselves, summed over ranks. Between epochs the loader's part is counted as a loop
    that runs epochs back to back pays it (the iterator's teardown when another epoch follows,
    set_epoch, the next iterator's start); the trainer's part (evaluation, bookkeeping) is not.

    ``checkpoints`` (checkpoint.Checkpoints): saved at step boundaries with ``objects`` (model,
    optimizer, scaler) and the loader's ``state_dict()``; a restored one puts the loop back at its
    step and the loader at its place in the epoch. Warm-up counts from this process's first step."""
    rank, world_size = _world()
    clock = _StepClock(device)
    has_batchnorm = step is not None and getattr(step, "has_batchnorm", False)
    steps, measured_images, measured_seconds = 0, 0, 0.0
    local_steps = 0  # this process's steps: warm-up is paid again after a resume
    data_wait, step_time = [], []
    result = TrainResult(0.0, 0, 0.0, 0)
    done = False
    restored = checkpoints.restored if checkpoints is not None else None
    first_epoch, resumed_epoch = 0, None
    if restored is not None:
        loop = restored["loop"]
        first_epoch, steps, resumed_epoch = loop["epoch"], loop["steps"], loop
        result.epochs = [EpochRecord(**r) for r in loop["records"]]
        if restored["loader"] is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(restored["loader"])  # refused here, before any batch, if it cannot hold
        seen = (restored["loader"] or {}).get("samples_seen")
        log(
            f"resumed from {restored['path']}: step {steps}, epoch {first_epoch}"
            + ("" if seen is None else f" after {seen} of its samples")
            + f", written by {restored['world_size']} rank(s)"
        )
    profiler = None
    loop_start = time.perf_counter()
    for epoch in range(first_epoch, cfg.epochs):
        epoch_start = time.perf_counter()  # set_epoch is the loader's: a loop pays it before the batch
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        epoch_steps = 0
        counts = torch.zeros(cfg.num_classes, dtype=torch.int64, device=device) if cfg.num_classes else None
        if resumed_epoch is not None:  # the interrupted epoch's sums so far
            loss_sum += resumed_epoch["loss_sum"]
            epoch_steps = resumed_epoch["epoch_steps"]
            if counts is not None and resumed_epoch["counts"] is not None and rank == 0:  # all ranks' sum
                counts += torch.tensor(resumed_epoch["counts"], dtype=torch.int64, device=device)
            resumed_epoch = None
        segment_start = epoch_start if local_steps >= cfg.warmup_steps else None
        window_start = epoch_start
        it = iter(loader)
        complete = False  # the loader ran out: a whole epoch (not cut by max_steps)
        while True:
            t0 = time.perf_counter()
            try:
                images, labels = next(it)
            except StopIteration:
                complete = True
                break
            t1 = time.perf_counter()
            if result.first_batch_seconds is None:
                result.first_batch_seconds, result.first_batch_at = t1 - loop_start, time.time()
            if has_batchnorm and labels.shape[0] < 2:
                raise TrainError(
                    f"step {steps}: a training batch of {labels.shape[0]} sample(s) cannot train "
                    "BatchNorm; use a larger batch size (or fewer skipped samples)"
                )
            begin = clock.start()
            if counts is not None:
                _count(counts, labels)
            if step is not None:
                loss_sum += step(images, labels)
            steps += 1
            local_steps += 1
            epoch_steps += 1
            if local_steps == cfg.warmup_steps:  # the measured window opens after warm-up
                clock.sync()  # asynchronous work of the warm-up batches ends inside the warm-up
                if cfg.profile_steps:
                    profiler = profile.start(device)
                segment_start = window_start = time.perf_counter()
            if profiler is not None and local_steps == cfg.warmup_steps + cfg.profile_steps:
                result.profile = profile.finish(profiler, device, cfg.profile_steps)
                profiler = None
            elif local_steps > cfg.warmup_steps:
                if step is not None:
                    clock.stop(begin)
                measured_images += labels.shape[0]
                data_wait.append(t1 - t0)
                step_time.append(
                    (time.perf_counter() if step is not None else t1) - t0
                )  # loader only: the wait
            if checkpoints is not None:
                action = checkpoints.boundary(steps)
                if action is not None:  # saving is not training: outside the measured window
                    paused = time.perf_counter()
                    state = _loop_state(epoch, steps, epoch_steps, loss_sum, counts, result.epochs, device)
                    loader_state = loader.state_dict() if hasattr(loader, "state_dict") else None
                    path = checkpoints.save(state, loader_state, objects or {})
                    if action == "stop":
                        raise Preempted(
                            f"SIGTERM: checkpointed step {steps} (epoch {epoch}) in {path}; continue "
                            f"with: bench run --resume {checkpoints.folder}"
                        )
                    if segment_start is not None:
                        resumed_at = time.perf_counter()
                        segment_start += resumed_at - paused
                        result.windows.append((window_start, paused))
                        window_start = resumed_at
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                done = True
                break
        clock.sync()  # a batch counts once its work on the device has finished
        now = time.perf_counter()
        if segment_start is not None:  # closed before the teardown: the last epoch's is not paid by a loop
            measured_seconds += now - segment_start
            result.windows.append((window_start, now))
        del it  # end this epoch's iterator (and its workers, unless persistent) before evaluating
        teardown = (now, time.perf_counter())
        record = EpochRecord(epoch, None, now - epoch_start)
        if counts is not None and complete:  # an epoch cut short by max_steps covers part of the data
            record.train_coverage = coverage(counts, device)
        if step is not None:
            (train_loss,) = all_reduce_values([loss_sum.item() / max(epoch_steps, 1)], device)
            record.train_loss = train_loss / world_size
        if end_epoch is not None and end_epoch(record):
            result.stopped_early = done = True
        result.epochs.append(record)
        if rank == 0:
            if step is None:
                log(f"epoch {epoch}: {steps} {what}, {record.train_seconds:.1f}s")
            else:
                val = (
                    ""
                    if record.val_loss is None
                    else f"  val loss {record.val_loss:.4f}  val acc {record.val_accuracy:.3f}"
                )
                log(f"epoch {epoch}: train loss {record.train_loss:.4f}  {record.train_seconds:.1f}s{val}")
        if done:
            break
        if segment_start is not None and epoch + 1 < cfg.epochs:  # a loop pays it before its next batch
            measured_seconds += teardown[1] - teardown[0]
            result.windows[-1] = (result.windows[-1][0], teardown[1])  # the epoch's window, extended
    if profiler is not None:  # the run ended before the profiled steps did
        result.profile = profile.finish(profiler, device, local_steps - cfg.warmup_steps)
    total_images = all_reduce_values([measured_images], device)[0]
    max_seconds = all_reduce_values(
        [measured_seconds], device, op=dist.ReduceOp.MAX if world_size > 1 else None
    )[0]
    result.steps = steps
    result.measured_images = int(total_images)
    result.measured_seconds = max_seconds
    result.images_per_second = total_images / max_seconds if max_seconds > 0 else math.nan
    result.compute = clock.seconds()
    result.data_wait = data_wait
    result.step_time = step_time
    return result


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2's parameters are DTensors


def _mib(tensors) -> float:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors) / 2**20


def memory_per_rank(net: nn.Module, optimizer, device: torch.device) -> dict:
    """What each rank holds of the model's training state (its shard of parameters, gradients and
    optimizer state: what ZeRO and FSDP divide), and its peak memory (CUDA: the allocator's peak;
    CPU: the process's peak resident set, which includes the interpreter, torch and the loader's
    main-process buffers). Lists indexed by rank, MiB."""
    import resource

    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer holds this rank's optimizer
    state = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    params = list(net.parameters())
    mine = [
        _mib(params),
        _mib(p.grad for p in params if p.grad is not None),
        _mib(state),
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,  # KiB on Linux
    ]
    rank, world = _world()
    table = torch.zeros(world, len(mine), dtype=torch.float64)
    table[rank] = torch.tensor(mine, dtype=torch.float64)
    (table,) = all_reduce_values([table], device)  # each rank fills its own row
    keys = ("params_mib", "grads_mib", "optimizer_mib", "peak_mib")
    out = {k: [round(float(v), 2) for v in table[:, i].tolist()] for i, k in enumerate(keys)}
    out["peak_is"] = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    return out


def _fully_shard(net: nn.Module, device: torch.device) -> None:
    """FSDP2: each top-level child that holds parameters is one unit (ResNet's stem, layer1-4 and
    fc; the small CNN's conv blocks), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (_world()[1],))
    for child in net.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(net, mesh=mesh)


def train(
    model: nn.Module,
    train_loader,
    val_loader,
    cfg: TrainConfig,
    device: torch.device,
    log=print,
    checkpoints=None,
) -> TrainResult:
    """``measure`` with a training step, evaluation after each epoch and early stopping."""
    rank, world_size = _world()
    # FSDP2 shards contiguous parameters only: its weights stay NCHW, and the loader's channels_last
    # batches still make the convolutions run channels_last.
    channels_last = cfg.channels_last and cfg.shard != "fsdp"
    net = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    train_model: nn.Module = net
    eval_model: nn.Module = net  # unwrapped: uneven eval shards must not meet a DDP collective
    if cfg.shard != "off" and world_size < 2:
        raise TrainError(f"sharding ({cfg.shard}) needs 2 ranks or more (--gpus N / --cpu-ranks N)")
    if cfg.shard == "fsdp":
        # Sharded weights mean a collective in every forward: evaluation, whose shards may differ
        # by a batch between ranks, runs on a full copy gathered once per evaluation instead.
        eval_model = copy.deepcopy(net)
        _fully_shard(net, device)
    elif world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(eval_model)
    sgd = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.shard == "optimizer":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.SGD, **sgd)
    else:
        optimizer = torch.optim.SGD(net.parameters(), **sgd)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")  # bf16 needs no loss scaling

    def step(images, labels):
        with _autocast(cfg, device):
            loss = nn.functional.cross_entropy(train_model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach().float()

    step.has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    best = {"loss": math.inf, "bad_epochs": 0}

    def end_epoch(record: EpochRecord) -> bool:
        if val_loader is not None:
            eval_start = time.perf_counter()
            if cfg.shard == "fsdp":  # a collective on every rank: the full weights into the copy
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                full = get_model_state_dict(
                    net, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
                )
                getattr(eval_model, "_orig_mod", eval_model).load_state_dict(full)
            counts = (
                torch.zeros(cfg.num_classes, dtype=torch.int64, device=device) if cfg.num_classes else None
            )
            record.val_loss, record.val_accuracy = evaluate(eval_model, val_loader, cfg, device, counts)
            if counts is not None:
                record.val_coverage = coverage(counts, device)
            record.eval_seconds = time.perf_counter() - eval_start
        train_model.train()
        if not cfg.patience or record.val_loss is None:
            return False
        if record.val_loss < best["loss"] - cfg.min_delta:
            best.update(loss=record.val_loss, bad_epochs=0)
            return False
        best["bad_epochs"] += 1
        return best["bad_epochs"] >= cfg.patience  # val loss is all-reduced: every rank stops together

    objects = {"model": net, "optimizer": optimizer, "scaler": scaler, "shard": cfg.shard, "extra": best}
    if checkpoints is not None:
        checkpoints.restore(objects)  # the newest checkpoint's weights and optimizer, with --resume
    train_model.train()
    result = measure(
        train_loader,
        cfg,
        device,
        step=step,
        end_epoch=end_epoch,
        log=log,
        checkpoints=checkpoints,
        objects=objects,
    )
    result.memory = memory_per_rank(net, optimizer, device)
    return result
