"""`bench plan`: which loader wins at a CPU budget, and how many cores N GPUs need.

Measured here, in this process, one after the other (fresh processes would spend most of the
minute the planner has on starting Python and torch): each installed backend's loader-only
images/s confined to 1, 2 .. K cores with as many workers or threads (the scaling curve), the
model's training rate (the synthetic loader, at the same core counts, unless the GPU's rate is
given), and the storage read rate. Then, for G GPUs on a node of C cores (M nodes):

- a GPU trains on its own: images/s per GPU = min(loader at C/G cores, GPU rate / cost, storage / G),
  where a loader's GPU cost is the model's GPU time per step with that loader over its GPU time with
  synthetic data (measured: `--measured` CUDA results, or `--gpu-cost NAME=R`; 1 where not): a
  loader that decodes on the GPU beside training (DALI mixed) slows the model down, not only itself.
  A loader whose GPU work runs in the training process between steps (torch decode=gpu) adds its
  time to the model's instead: 1 / (1 / loader + cost / GPU rate);
- the CPU (no GPU rate): the loader and the model share the cores, so their times add up:
  1 / (1 / loader(c) + 1 / model(c)).
- a pool of K CPU nodes of C cores (`--cpu-nodes K --cores-per-cpu-node C`: the ray backend on a
  cluster) decodes for every GPU: per GPU, min(K * C / GPUs / the pool's CPU seconds per image, the
  trainer's receiving rate, the GPU's rate, the network), both costs measured here on a two-node
  Ray cluster of this machine from the CPU time of the pool node's processes and of the trainer's.

Between measured core counts the curve is interpolated; beyond the last one it follows the power
law through the first and the last point (rate ~ cores^a, a <= 1: never better than linear).
docs/plan.md has the model, its validation and what it leaves out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loaders import LoaderError, backends, build_loader, get_backend
from loaders.pagecache import evict, files_under
from loaders.stored import write_json

from ..errors import UsageError
from ..trainer import TrainConfig, build_model, measure, train
from . import cpus, envinfo
from .progress import Progress
from .spec import RunSpec

SCHEMA = "loaderbench.plan/1"

# Published or measured per-GPU training rates (images/s) for `--gpu NAME`: model -> name -> (rate, source).
GPU_RATES = {
    "resnet50": {
        "a100-80gb": (
            2470,
            "NVIDIA DeepLearningExamples, PyTorch ResNet50 v1.5 README, training performance, "
            "DGX A100 (1x A100 80GB), mixed precision, pytorch-21.03 NGC container",
        ),
        "v100-16gb": (
            1200,
            "NVIDIA DeepLearningExamples, PyTorch ResNet50 v1.5 README, training performance, "
            "DGX-1 (1x V100 16GB), mixed precision, pytorch-21.03 NGC container",
        ),
        "v100-32gb": (
            1156,
            "NVIDIA DeepLearningExamples, PyTorch ResNet50 v1.5 README, training performance, "
            "DGX-1 (1x V100 32GB), mixed precision, pytorch-21.03 NGC container",
        ),
        "h100": (
            3755,
            "measured here: reports/ladder-h100-resnet50, synthetic ceiling, bf16 + channels_last, "
            "batch 128, torch 2.11+cu130 (one H100 80GB)",
        ),
    },
}

TARGET = 0.95  # "fed": the loader reaches this fraction of the model's rate


@dataclass
class Curve:
    """Images/s at a number of cores, measured at ``cores``; ``at`` gives any other count."""

    cores: list[int]
    ips: list[float]

    @property
    def exponent(self) -> float:
        if len(self.cores) < 2 or min(self.ips) <= 0:
            return 1.0
        a = math.log(self.ips[-1] / self.ips[0]) / math.log(self.cores[-1] / self.cores[0])
        return min(1.0, max(0.0, a))

    def at(self, c: float) -> float:
        cs, v = self.cores, self.ips
        if c <= cs[0]:
            return v[0] * c / cs[0]
        for (c0, v0), (c1, v1) in zip(zip(cs, v), zip(cs[1:], v[1:])):
            if c <= c1:
                return v0 + (v1 - v0) * (c - c0) / (c1 - c0)
        return v[-1] * (c / cs[-1]) ** self.exponent

    def cores_for(self, rate: float, limit: int = 4096) -> int | None:
        """The fewest whole cores at which this curve reaches ``rate`` (None: not within ``limit``)."""
        for c in range(1, limit + 1):
            if self.at(c) >= rate:
                return c
        return None


@dataclass
class Target:
    gpus: int = 1
    cores_per_node: int = 0
    nodes: int = 1
    gpu_rate: float | None = None  # None: the model trains on the CPU cores (measured)
    gpu_source: str | None = None
    # loader -> the model's GPU time per step with it / with synthetic data (1 where absent)
    gpu_cost: dict[str, float] = field(default_factory=dict)
    gpu_cost_source: dict[str, str] = field(default_factory=dict)
    serial: dict[str, bool] = field(default_factory=dict)  # loader -> its GPU work is between steps
    cpu_nodes: int = 0  # a remote decode pool (the ray backend on a cluster): its nodes ...
    cores_per_cpu_node: int = 0  # ... and their cores
    network_gbps: float | None = None  # each trainer node's link to the pool (None: not modelled)

    @property
    def cores_per_gpu(self) -> float:
        return self.cores_per_node / self.gpus

    @property
    def pool_cores_per_gpu(self) -> float:
        return self.cpu_nodes * self.cores_per_cpu_node / (self.gpus * self.nodes)


@dataclass
class Measured:
    loaders: dict[str, Curve] = field(default_factory=dict)
    model: Curve | None = None
    storage_ips: dict[str, float] = field(default_factory=dict)  # per backend: what its files read at
    seconds: float = 0.0
    pool: PoolCosts | None = None  # what a Ray pool costs per image (measured with --cpu-nodes)


@dataclass
class PoolCosts:
    """Measured on a two-node Ray cluster of this machine, per side: the pool's node (the tasks' decode,
    augment and collate, its object store and raylet) and the trainer's (this process and the head:
    fetching each batch from the pool's node, deserialising, copying). Each side's CPU is split into
    seconds per image and cores busy whatever the rate (Ray Data's executor loop, the raylets' timers),
    from two epochs consumed at different rates; and the bytes a batch carries."""

    pool_cpu_s: float  # per image
    trainer_cpu_s: float  # per image
    bytes_per_image: float
    images: int  # how many images each measured epoch had
    batches: str = "float32"  # what the tasks sent: float32 normalised, or uint8 (normalised on the device)
    pool_background: float = 0.0  # cores of a pool node busy while an epoch runs, whatever its rate
    trainer_background: float = 0.0  # cores of the trainer's node, likewise
    detail: dict = field(default_factory=dict)  # "side/processes" -> [ms per image, background cores]


def predict(m: Measured, t: Target, loader: str, cores: float | None = None) -> dict:
    """One backend's end-to-end images/s on the target (per GPU or rank, and in all)."""
    c = t.cores_per_gpu if cores is None else cores
    load = m.loaders[loader].at(c)
    store = m.storage_ips.get(loader)
    cost = t.gpu_cost.get(loader, 1.0)
    if t.gpu_rate is not None and t.serial.get(loader):  # decode, then train: the times add up
        per = 1.0 / (1.0 / load + cost / t.gpu_rate)
        if store:
            per = min(per, store / t.gpus)
        bound = "gpu shared" if per < 0.95 * load else "input"
        ceiling = t.gpu_rate
        need = None  # more cores do not shorten the GPU's share
    elif t.gpu_rate is not None:
        limits = {"input": load, "compute": t.gpu_rate / cost}
        if store:
            limits["storage"] = store / t.gpus  # one node's storage feeds its G GPUs
        bound = min(limits, key=limits.get)
        per = limits[bound]
        if bound == "compute" and cost > 1.02:
            bound = "gpu shared"
        ceiling = t.gpu_rate
        need = m.loaders[loader].cores_for(TARGET * t.gpu_rate / cost)
    else:
        model = m.model.at(c)
        per = 1.0 / (1.0 / load + 1.0 / model)
        bound = "input" if load < model else "compute"
        ceiling = model
        need = None  # on the CPU more cores raise the ceiling with them
    return {
        "loader": loader,
        "cores_per_gpu": c,
        "loader_ips": load,
        "per_gpu_ips": per,
        "total_ips": per * t.gpus * t.nodes,
        "fraction_of_ceiling": per / ceiling,
        "bound": bound,
        "cores_per_gpu_for_95": need,
        "gpu_cost": cost,
    }


POOL = "ray pool"  # the remote pool's row among the loaders'


def pool_limits(m: Measured, t: Target, cores: float, cpu_nodes: float, loader_only: bool = False) -> dict:
    """Images/s per GPU that each part of a remote-pool set-up allows: the pool's share of the CPU
    nodes (less each node's background), the network, and the trainer (receiving on one core of its
    own, less its background; on the CPU, receiving and the model take turns on its cores) or the GPU."""
    p = m.pool
    pool_cores = cpu_nodes * max(0.0, t.cores_per_cpu_node - p.pool_background) / (t.gpus * t.nodes)
    limits = {"pool": pool_cores / p.pool_cpu_s}
    core = max(0.0, min(cores, 1.0) - p.trainer_background)  # Ray's client and raylet: one core's worth
    if loader_only or t.gpu_rate is not None:
        limits["trainer"] = core / p.trainer_cpu_s
    else:
        limits["trainer"] = core / (min(cores, 1.0) / m.model.at(cores) + p.trainer_cpu_s)
    if t.gpu_rate is not None and not loader_only:
        limits["compute"] = t.gpu_rate  # the GPU only trains: no decode of its own
    if t.network_gbps:  # one link per trainer node, shared by its GPUs
        limits["network"] = t.network_gbps * 1e9 / 8 / p.bytes_per_image / t.gpus
    return limits


def beside_pool(m: Measured, t: Target, cores: float) -> float:
    """Images/s per GPU that everything but the pool allows: what no number of CPU nodes exceeds."""
    return min(v for k, v in pool_limits(m, t, cores, math.inf).items() if k != "pool")


def cpu_nodes_for(m: Measured, t: Target, cores: float | None = None) -> int | None:
    """The fewest CPU nodes of the target's size that bring a GPU to 95 % of what the rest allows."""
    c = t.cores_per_gpu if cores is None else cores
    rest = beside_pool(m, t, c)
    per_node = pool_limits(m, t, c, 1)["pool"]  # images/s per GPU that one node adds
    return math.ceil(TARGET * rest / per_node) if per_node > 0 else None


def predict_pool(m: Measured, t: Target, cores: float | None = None, cpu_nodes: float | None = None) -> dict:
    """The ray backend with a pool of CPU nodes decoding for every GPU: images/s per GPU and in all."""
    c = t.cores_per_gpu if cores is None else cores
    k = t.cpu_nodes if cpu_nodes is None else cpu_nodes
    limits = pool_limits(m, t, c, k)
    bound = min(limits, key=limits.get)
    per = limits[bound]
    ceiling = t.gpu_rate if t.gpu_rate is not None else limits["trainer"]
    return {
        "loader": f"{POOL} ({k:g} x {t.cores_per_cpu_node}-core CPU nodes)",
        "cores_per_gpu": c,
        "loader_ips": limits["pool"],
        "per_gpu_ips": per,
        "total_ips": per * t.gpus * t.nodes,
        "fraction_of_ceiling": per / ceiling,
        "bound": bound,
        "cores_per_gpu_for_95": None,
        "cpu_nodes_for_95": cpu_nodes_for(m, t, c),
        "pool_cores_per_gpu": dataclasses.replace(t, cpu_nodes=k).pool_cores_per_gpu,
        "limits": limits,
        "gpu_cost": 1.0,
    }


def advice(rows: list[dict], t: Target, batches: str = "float32") -> dict[str, str]:
    best = max(rows, key=lambda r: r["per_gpu_ips"])
    out = {}
    for r in rows:
        c = r["cores_per_gpu"]
        if r["loader"].startswith(POOL):
            out[r["loader"]] = _pool_advice(r, t, batches)
            continue
        if t.gpu_rate is None:  # the loader and the model take turns on the same cores
            share = r["per_gpu_ips"] / r["loader_ips"]
            say = f"loading takes {share:.0%} of the {c:g} cores' time, the model the rest"
            if best["loader"] != r["loader"]:
                say += f"; {best['loader']} does {best['per_gpu_ips'] / r['per_gpu_ips']:.2f}x"
            out[r["loader"]] = say
        elif r["bound"] == "gpu shared":
            out[r["loader"]] = (
                f"the GPU is shared: with {r['loader']} the model's GPU time per step is "
                f"{r['gpu_cost']:.2f}x synthetic's"
                + (", and its decode runs between steps" if t.serial.get(r["loader"]) else "")
                + "; with enough cores a CPU-decoding loader leaves the GPU to the model"
            )
        elif r["bound"] == "compute":
            out[r["loader"]] = f"compute-bound at {c:g} cores per GPU: a faster loader buys nothing; " + (
                "spare cores are free for other work" if t.gpu_rate else "more cores speed the model"
            )
        elif r["bound"] == "storage":
            out[r["loader"]] = (
                "storage-bound: fewer, larger reads (shards, .beton), a cache, or faster storage"
            )
        else:
            need = r["cores_per_gpu_for_95"]
            say = f"input-bound at {c:g} cores per GPU"
            if need:
                say += f"; needs {need} cores per GPU ({need * t.gpus} per node) for 95 % of the GPU"
            if best["loader"] != r["loader"]:
                say += f"; {best['loader']} does {best['per_gpu_ips'] / r['per_gpu_ips']:.2f}x at this ratio"
            elif t.gpu_rate:
                say += "; the best loader here: more cores per GPU or GPU decode"
            out[r["loader"]] = say
    return out


def _pool_advice(r: dict, t: Target, batches: str) -> str:
    need, bound = r["cpu_nodes_for_95"], r["bound"]
    smaller = (
        "; uint8 batches (-o device_normalize=true) carry 4x fewer bytes" if batches == "float32" else ""
    )
    say = {
        "pool": f"the pool binds: {need} CPU node(s) of {t.cores_per_cpu_node} cores for 95 % of what the rest allows",
        "trainer": "the trainer's receiving binds (its raylet and Ray client on one core): more CPU nodes add "
        "nothing" + smaller,
        "compute": f"the GPU binds: {need} CPU node(s) are enough for 95 %; more add nothing",
        "network": "the network binds" + (smaller or ": a faster link"),
    }[bound]
    if not t.network_gbps:
        say += "; the network is not modelled (--network-gbps)"
    return say


# -- measuring --------------------------------------------------------------------------------------


def _train_loader(spec: RunSpec, source: Path):
    """The spec's backend over ``source`` as the planner measures it: one rank, on the CPU, training order."""
    return build_loader(
        spec.loader,
        source,
        train=True,
        drop_last=True,
        batch_size=spec.batch_size,
        image_size=spec.image_size,
        device=torch.device("cpu"),
        dtype=torch.float32,
        seed=spec.seed,
        rank=0,
        world_size=1,
        options=spec.options,
    )


def _loader_ips(spec: RunSpec, source: Path, steps: int, warmup: int) -> tuple[float, int]:
    """(images/s after ``warmup`` of ``steps`` batches, the samples the loader reads)."""
    loader = _train_loader(spec, source)
    try:
        epochs = math.ceil(steps / len(loader))
        cfg = TrainConfig(epochs=epochs, max_steps=steps, warmup_steps=warmup)
        if spec.loader_only:
            out = measure(loader, cfg, torch.device("cpu"), log=lambda *a, **k: None)
        else:
            model = build_model(spec.model, len(loader.classes))
            cfg = dataclasses.replace(cfg, amp=spec.amp, channels_last=spec.channels_last)
            out = train(model, loader, None, cfg, torch.device("cpu"), log=lambda *a, **k: None)
    finally:
        loader.close()
    return out.images_per_second, loader.num_samples


def _storage_ips(files: list[Path], samples: int, cold: bool, budget_s: float = 1.0) -> float:
    """Images/s the files read at (sequential 4 MB reads, for at most ``budget_s``)."""
    if cold:
        evict(files)
    total = sum(f.stat().st_size for f in files)
    read, start = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(4 << 20):
                read += len(chunk)
        if time.perf_counter() - start > budget_s:
            break
    seconds = time.perf_counter() - start
    return (read / seconds) / (total / samples) if read and seconds > 0 else float("inf")


def measure_here(
    spec: RunSpec,
    loaders: list[str],
    max_cores: int,
    model_cores: bool,
    steps: int = 16,
    warmup: int = 3,
    trials: int = 1,
    log=print,
) -> Measured:
    start = time.perf_counter()
    m = Measured()
    everything = cpus.allowed()
    counts = list(range(max_cores, 0, -1))  # most cores first: pools are sized down, never up
    progress = Progress("plan", len(counts) * (len(loaders) + bool(model_cores)), log)
    with progress:
        _measure_here(spec, loaders, counts, model_cores, steps, warmup, trials, everything, m, progress)
    cpus.confine(everything)
    m.seconds = time.perf_counter() - start
    return m


def _measure_here(spec, loaders, counts, model_cores, steps, warmup, trials, everything, m, progress):
    """Fill ``m``: each loader alone at each core count, then the model on the CPU (synthetic data)."""
    from .runner import resolve_data

    for name in loaders:
        s = dataclasses.replace(spec.with_loader(name), loader_only=True)
        train_dir, _ = resolve_data(s, progress=False)
        cpus.confine(everything)
        source = s.backend.stored(train_dir, s.options)  # converted once, outside the timing
        ips = {}
        for k in counts:
            cpus.confine(everything[:k])
            ks = dataclasses.replace(s.with_loader(name, workers=k), loader_only=True)
            got = [_loader_ips(ks, source, steps, warmup) for _ in range(trials)]
            ips[k], samples = statistics.median(g[0] for g in got), got[0][1]
            progress.advance(f"  {name:10s} {k:3d} core(s): {ips[k]:10,.1f} img/s (loader only)")
        m.loaders[name] = Curve(sorted(ips), [ips[k] for k in sorted(ips)])
        cpus.confine(everything)
        m.storage_ips[name] = _storage_ips(files_under(source), samples, cold=spec.storage == "cold")
    if model_cores:
        ceiling = next(b.name for b in backends() if b.is_ceiling)
        s = dataclasses.replace(spec.with_loader(ceiling), loader_only=False)
        train_dir, _ = resolve_data(s, progress=False)
        rates = {}
        for k in counts:
            cpus.confine(everything[:k])
            rates[k], _ = _loader_ips(s, train_dir, max(warmup + 3, steps // 2), warmup)
            progress.advance(
                f"  {spec.model} on the CPU, {k:3d} core(s): {rates[k]:10,.1f} img/s (synthetic data)"
            )
        m.model = Curve(sorted(rates), [rates[k] for k in sorted(rates)])


def per_image_and_background(fast: tuple, slow: tuple) -> tuple[float, float]:
    """(CPU seconds per image, cores busy regardless) from two epochs' (images, seconds, CPU seconds):
    CPU = images x per + seconds x background. Noise that makes either negative: all of it per image."""
    (n1, s1, a), (n2, s2, b) = fast, slow
    det = n1 * s2 - n2 * s1
    if det:
        per, bg = (a * s2 - b * s1) / det, (b * n1 - a * n2) / det
        if per > 0 and bg >= 0:
            return per, bg
    return a / n1, 0.0


def _settle(wait_s: float = 20.0) -> None:
    """Wait for the processes of a Ray instance this process shut down (they exit in the background
    and would take CPU from the measurement)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            alive = [
                p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE
            ]
        except psutil.NoSuchProcess:  # one exited while we looked: look again
            alive = [None]
        if not alive:
            return
        time.sleep(0.2)


def pool_costs(spec: RunSpec, source: Path, uint8: bool = False, log=print) -> PoolCosts:
    """What a Ray pool costs, on a Ray cluster of this machine's own: a head with no CPUs beside this
    process (the trainer's node) and one worker node on the other cores (the pool), as `bench run
    --ray-address` uses one. One epoch starts the workers; over the next two (loader only, the second
    with a pause after each batch) the pool's CPU is its node's processes' (raylet, workers: decode,
    augment, collate, store), the trainer's is this process's and the head's (fetching each batch
    across nodes, deserialising, copying); the two rates split each into per image and background. ``uint8``:
    the tasks send uint8 batches that the trainer's device normalises, a quarter of float32's bytes."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    # Each node on cores of its own, as on two machines (a quarter for the trainer's, at least one);
    # a node's processes inherit the affinity the process has when the node starts.
    _settle()
    everything = cpus.allowed()
    trainer_cores = everything[: max(1, len(everything) // 4)]
    pool_cores = everything[len(trainer_cores) :] or everything
    cpus.confine(trainer_cores)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    loader = None
    try:
        cpus.confine(pool_cores)
        node = cluster.add_node(num_cpus=len(pool_cores))
        cpus.confine(trainer_cores)
        cluster.wait_for_nodes()
        pool_pids, head_pids = (
            {i.process.pid for v in n.all_processes.values() for i in v} for n in (node, cluster.head_node)
        )
        loader = _train_loader(
            spec.with_loader("ray").with_options(address=cluster.address, device_normalize=uint8), source
        )

        def cpu_seconds() -> collections.Counter:
            out = collections.Counter({"trainer/this process": time.process_time()})
            for proc in psutil.Process().children(recursive=True):
                try:
                    t = proc.cpu_times()
                    line = {proc.pid, *(p.pid for p in proc.parents())}
                    kind = "raylet" if proc.name() == "raylet" else "Ray workers and helpers"
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                side = "pool" if line & pool_pids else "trainer" if line & head_pids else None
                if side:  # not a process of an earlier Ray instance still on its way out
                    out[f"{side}/{kind}"] += t.user + t.system
            return out

        loader.set_epoch(0)
        for _ in loader:  # the workers start and import torch: not a per-image cost
            pass
        epochs, pause = [], 0.0  # (images, seconds, CPU seconds by side/processes)
        for epoch in (1, 2):  # as fast as the batches come, then with a pause after each
            before, start, images, nbytes = cpu_seconds(), time.perf_counter(), 0, 0
            loader.set_epoch(epoch)
            for x, y in loader:
                # the batch as the tasks sent it: uint8, or float32 (what the loader yields may be normalised since)
                images, nbytes = images + len(y), nbytes + x.nelement() * (1 if uint8 else 4)
                time.sleep(pause)
            seconds, after = time.perf_counter() - start, cpu_seconds()
            epochs.append((images, seconds, {k: after[k] - before[k] for k in after}))
            pause = max(0.05, 2 * seconds / max(1, math.ceil(images / spec.batch_size)))  # about 3x longer
    finally:
        if loader is not None:
            loader.close()
        ray.shutdown()
        cluster.shutdown()
        cpus.confine(everything)
    (n1, s1, c1), (n2, s2, c2) = epochs
    if not n1 or not n2 or sum(v for k, v in c1.items() if k.startswith("pool/")) <= 0:
        raise UsageError("bench plan: no CPU time measured on the Ray pool's node")

    def split(a: float, b: float) -> tuple[float, float]:
        return per_image_and_background((n1, s1, a), (n2, s2, b))

    detail = {k: split(c1.get(k, 0.0), c2.get(k, 0.0)) for k in sorted(set(c1) | set(c2))}
    sides = {
        side: split(
            sum(v for k, v in c1.items() if k.startswith(side)),
            sum(v for k, v in c2.items() if k.startswith(side)),
        )
        for side in ("pool/", "trainer/")
    }
    kind = "uint8" if uint8 else "float32"
    costs = PoolCosts(
        pool_cpu_s=sides["pool/"][0],
        trainer_cpu_s=sides["trainer/"][0],
        bytes_per_image=nbytes / n2,
        images=n1,
        batches=kind,
        pool_background=sides["pool/"][1],
        trainer_background=sides["trainer/"][1],
        detail={k: [per * 1e3, bg] for k, (per, bg) in detail.items()},
    )
    log(
        f"  ray pool costs per image: {costs.pool_cpu_s * 1e3:.2f} ms of the pool's CPU (+{costs.pool_background:.2f} "
        f"core busy), {costs.trainer_cpu_s * 1e3:.2f} ms of the trainer's (+{costs.trainer_background:.2f} core); "
        f"{costs.bytes_per_image / 1e3:,.0f} kB ({kind}); epochs of {n1} images at {n1 / s1:,.0f} and {n2 / s2:,.0f} img/s"
    )
    return costs


# -- the record and the map -------------------------------------------------------------------------


def document(spec: RunSpec, t: Target, m: Measured, command: list[str]) -> dict:
    rows = [predict(m, t, name) for name in m.loaders]
    if m.pool and t.cpu_nodes:
        rows.append(predict_pool(m, t))
    say = advice(rows, t, m.pool.batches if m.pool else "float32")
    for r in rows:
        r["advice"] = say[r["loader"]]
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "target": dataclasses.asdict(t),
        "spec": {
            "model": spec.model,
            "batch_size": spec.batch_size,
            "image_size": spec.image_size,
            "amp": spec.amp,
            "channels_last": spec.channels_last,
            "data": spec.data,
            "storage": spec.storage,
        },
        "measured": {
            "loaders": {k: dataclasses.asdict(v) for k, v in m.loaders.items()},
            "model_on_cpu": dataclasses.asdict(m.model) if m.model else None,
            "storage_ips": m.storage_ips,
            "ray_pool": dataclasses.asdict(m.pool) if m.pool else None,
            "seconds": m.seconds,
            "machine_cores": len(cpus.allowed()),
        },
        "environment": envinfo.collect(),
        "predictions": rows,
    }


def measured_from(doc: dict) -> Measured:
    """The measurements a plan.json recorded, to predict again from them."""
    rec = doc["measured"]
    model, pool = rec.get("model_on_cpu"), rec.get("ray_pool")
    return Measured(
        loaders={k: Curve(**v) for k, v in rec["loaders"].items()},
        model=Curve(**model) if model else None,
        storage_ips=rec["storage_ips"],
        seconds=rec["seconds"],
        pool=PoolCosts(**pool) if pool else None,
    )


def measured_points(folder: Path | None) -> list[dict]:
    """End-to-end `bench run --cpus N` results under ``folder``: drawn on the map where they exist."""
    if folder is None:
        return []
    from .report import results_in

    pts = []
    for r in results_in(folder).values():
        if r.config.get("cpus") and not r.config.get("loader_only"):
            pts.append({"loader": r.config["loader"], "cpus": r.config["cpus"], "ips": r.ips})
    return pts


def gpu_costs(results, model: str) -> dict[str, dict]:
    """Per loader, from CUDA training results of ``model``: the median GPU time per step (CUDA
    events around the step) over synthetic's at the same batch, amp and channels_last. Keys: the
    backend's name for its default decode, ``NAME decode=X`` for another."""
    import collections

    gpu = collections.defaultdict(list)
    for r in results:
        if (
            r.loader_only
            or r.config.get("model") != model
            or not str(r.config.get("device", "")).startswith("cuda")
        ):
            continue
        t = r.metrics.compute_time_s.get("median")
        if t:
            shape = (r.config["batch_size"], r.config["amp"], r.config["channels_last"])
            gpu[(shape, variant_of(r))].append(t)
    out = {}
    for (shape, key), times in gpu.items():
        base = gpu.get((shape, "synthetic"))
        if key != "synthetic" and base:
            out[key] = {
                "cost": statistics.median(times) / statistics.median(base),
                "source": f"GPU ms/step {statistics.median(times) * 1e3:.1f} vs synthetic "
                f"{statistics.median(base) * 1e3:.1f} ({len(times)} and {len(base)} runs, batch {shape[0]})",
            }
    return out


def variant_of(r) -> str:
    """A result's loader, with its decode placement where it is not the backend's default."""
    name, decode = r.config["loader"], r.options.get("decode")
    try:
        default = getattr(get_backend(name, installed=False).Options(), "decode", None)
    except LoaderError:  # a backend this installation does not know
        default = None
    return name if decode in (None, default) else f"{name} decode={decode}"


def draw(doc: dict, m: Measured, t: Target, path: Path, points: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a CPU target is drawn near what was measured; a GPU node out to the ratios real nodes give
    top = max(16, math.ceil(t.cores_per_gpu * 2)) if t.gpu_rate else max(4, math.ceil(t.cores_per_gpu * 2))
    xs = [x / 4 for x in range(2, 4 * top + 1)]
    pool = bool(m.pool and t.cpu_nodes)
    fig, axes = plt.subplots(1, 2 if pool else 1, figsize=(14 if pool else 8, 5), squeeze=False)
    ax = axes[0][0]
    if pool:
        ax.plot(
            xs,
            [predict_pool(m, t, x)["per_gpu_ips"] for x in xs],
            color="black",
            label=f"ray + {t.cpu_nodes} x {t.cores_per_cpu_node}-core CPU nodes",
        )
        _draw_nodes(axes[0][1], m, t)
    for name in m.loaders:
        line = ax.plot(xs, [predict(m, t, name, x)["per_gpu_ips"] for x in xs], label=name)[0]
        mine = [p for p in points if p["loader"] == name]
        if mine:
            ax.scatter(
                [p["cpus"] for p in mine],
                [p["ips"] for p in mine],
                color=line.get_color(),
                marker="o",
                zorder=3,
                label=f"{name} measured",
            )
    if t.gpu_rate:
        ax.axhline(t.gpu_rate, color="grey", ls="--", label=f"GPU rate {t.gpu_rate:,.0f} img/s")
    where = f"this node: {t.cores_per_gpu:g} cores per GPU" if t.gpu_rate else f"{t.cores_per_gpu:g} cores"
    ax.axvline(t.cores_per_gpu, color="black", ls=":", label=where)
    ax.set_xlabel("cores per GPU" if t.gpu_rate else "cores (the model trains on them too)")
    ax.set_ylabel("predicted images/s per GPU" if t.gpu_rate else "predicted images/s")
    ax.set_title(f"{doc['spec']['model']}: which loader wins at which CPU budget")
    ax.set_xlim(0, top)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_nodes(ax, m: Measured, t: Target) -> None:
    """Images/s per GPU against the number of CPU nodes in the pool, at the target's trainer cores."""
    need = cpu_nodes_for(m, t) or 1
    top = max(4, 2 * need, 2 * t.cpu_nodes)
    ks = list(range(0, top + 1))
    ax.plot(
        ks,
        [predict_pool(m, t, cpu_nodes=k)["per_gpu_ips"] for k in ks],
        "o-",
        color="black",
        label="predicted",
    )
    rest = beside_pool(m, t, t.cores_per_gpu)
    ax.axhline(rest, color="grey", ls="--", label=f"what the rest allows: {rest:,.0f} img/s")
    ax.axvline(need, color="tab:green", ls=":", label=f"{need} node(s): 95 %")
    ax.axvline(t.cpu_nodes, color="black", ls=":", label=f"asked: {t.cpu_nodes}")
    ax.set_xlabel(f"CPU nodes of {t.cores_per_cpu_node} cores in the pool ({t.gpus * t.nodes} GPU(s))")
    ax.set_ylabel("predicted images/s per GPU")
    ax.set_title("when extra CPU nodes stop paying")
    ax.set_xlim(0, top)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def target_from(args, model: str) -> Target:
    cores = args.cores_per_node or len(cpus.allowed())
    for name, value in (("--gpus", args.gpus), ("--nodes", args.nodes), ("--cores-per-node", cores)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    rate, source = args.gpu_rate, "--gpu-rate" if args.gpu_rate else None
    if args.gpu:
        known = GPU_RATES.get(model, {})
        if args.gpu not in known:
            raise UsageError(
                f"--gpu {args.gpu}: no published rate for {model}; known for {model}: "
                f"{', '.join(known) or 'none'} (or give --gpu-rate IMG_S)"
            )
        rate, source = known[args.gpu]
    if getattr(args, "storage", None) == "s3":
        raise UsageError("bench plan reads local files; for object storage measure `bench run --storage s3`")
    if rate is not None and rate <= 0:
        raise UsageError(f"--gpu-rate must be > 0, got {rate}")
    cost, cost_source = {}, {}
    if rate is not None and getattr(args, "measured", None):
        from .report import results_in

        for key, v in gpu_costs(results_in(Path(args.measured)).values(), model).items():
            cost[key], cost_source[key] = v["cost"], f"{args.measured}: {v['source']}"
    for item in getattr(args, "gpu_cost", None) or []:
        name, _, value = item.partition("=")
        try:
            cost[name.strip()], cost_source[name.strip()] = float(value), "--gpu-cost"
        except ValueError:
            raise UsageError(f"--gpu-cost {item!r}: expected NAME=RATIO, e.g. dali=1.3") from None
        if cost[name.strip()] <= 0:
            raise UsageError(f"--gpu-cost {item!r}: the ratio must be > 0")
    if cost and rate is None:
        raise UsageError("--gpu-cost scales a GPU's rate: give --gpu-rate or --gpu too")
    pool = dict(
        cpu_nodes=getattr(args, "cpu_nodes", 0) or 0,
        cores_per_cpu_node=getattr(args, "cores_per_cpu_node", 0) or 0,
        network_gbps=getattr(args, "network_gbps", None),
    )
    if pool["cpu_nodes"] < 0:
        raise UsageError(f"--cpu-nodes must be >= 0, got {pool['cpu_nodes']}")
    if pool["cpu_nodes"] and pool["cores_per_cpu_node"] < 1:
        raise UsageError("--cpu-nodes needs --cores-per-cpu-node C (>= 1): the cores of each CPU node")
    if not pool["cpu_nodes"] and (pool["cores_per_cpu_node"] or pool["network_gbps"]):
        raise UsageError("--cores-per-cpu-node and --network-gbps describe a pool: give --cpu-nodes K too")
    if pool["network_gbps"] is not None and pool["network_gbps"] <= 0:
        raise UsageError(f"--network-gbps must be > 0, got {pool['network_gbps']}")
    return Target(
        gpus=args.gpus,
        cores_per_node=cores,
        nodes=args.nodes,
        gpu_rate=rate,
        gpu_source=source,
        gpu_cost=cost,
        gpu_cost_source=cost_source,
        **pool,
    )


def plan(
    spec: RunSpec,
    t: Target,
    out: Path,
    command: list[str],
    loaders: list[str] | None,
    max_cores: int,
    measured_dir: Path | None,
    steps: int,
    trials: int = 1,
    log=print,
) -> dict:
    installed = [b.name for b in backends() if b.installed and not b.is_ceiling]
    loaders = loaders or installed
    missing = [n for n in loaders if n not in installed]
    if missing:
        raise UsageError(f"--loaders: {', '.join(missing)} not installed (installed: {', '.join(installed)})")
    if t.cpu_nodes and "ray" not in installed:
        raise UsageError("--cpu-nodes: a remote pool is the ray backend's; install the `ray` extra")
    have = len(cpus.allowed())
    max_cores = max_cores or have
    if not 1 <= max_cores <= have:
        raise UsageError(f"--max-cores {max_cores}: this process may use 1 to {have} cores")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")  # affinity narrowed and widened (see loaders/ffcv)
    log(f"measuring on this machine ({have} cores), 1..{max_cores} core(s):")
    if trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    # the planner measures this machine's cores: the ray backend starts its own local instance
    cluster = os.environ.pop("RAY_ADDRESS", None)
    try:
        m = measure_here(spec, loaders, max_cores, t.gpu_rate is None, steps=steps, trials=trials, log=log)
        if t.cpu_nodes:
            from .runner import resolve_data

            train_dir, _ = resolve_data(spec.with_loader("ray"), progress=False)
            # a GPU normalises uint8 batches itself (as tuned torch does): a quarter of the bytes to move
            m.pool = pool_costs(spec, train_dir, uint8=t.gpu_rate is not None, log=log)
    finally:
        if cluster is not None:
            os.environ["RAY_ADDRESS"] = cluster
    doc = document(spec, t, m, command)
    doc["measured_points"] = measured_points(measured_dir)
    write_json(out / "plan.json", doc)
    draw(doc, m, t, out / "plan.png", doc["measured_points"])
    return doc
