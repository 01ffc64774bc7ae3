"""`ray` backend: decode and augment in Ray Data tasks, on this machine's cores or on other
machines' (a Ray cluster), and stream the batches to the trainer.

Each epoch this rank's share of the epoch's order (``epoch_indices``: the strided split every
index-order backend shares, so exact-once, padding and resume hold as for torch) is cut into
batches; each batch is one Ray Data block, decoded, augmented, collated and normalised in one task
by the torch backend's per-sample code (loaders/samples.py: the same crops for the same seed and
epoch), and the blocks are yielded in order (``preserve_order``). A task that Ray runs again after
losing a node therefore gives the same batch in the same place. Every rank builds its own pipeline
(ranks are separate torchrun processes, each its own Ray driver; ``streaming_split`` needs one
driver for all consumers).

Where the CPUs are: ``address`` (``--ray-address``), else ``RAY_ADDRESS``, joins an existing cluster
(its nodes must see the same data path, or read an s3:// bucket); otherwise the loader starts a local
Ray instance on this process's cores (``--cpus``), shut down when the last loader using it closes or
at exit. ``ray_cpus`` caps the CPUs the pipeline's tasks take, so that the trainer keeps its own.
A batch that does not come within ``timeout`` seconds (a pool whose nodes are gone) is an error.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import queue
import re
import socket
import threading
from dataclasses import dataclass

import numpy as np
import torch

from . import objstore
from .backend import Backend
from .contract import BaseLoader, LoaderConfig, LoaderError, available_cores, rank_share, scan_imagefolder
from .feed import DeviceFeed
from .images import collate_checked, transform_for
from .samples import Samples


@dataclass(frozen=True)
class Options:
    address: str | None = None  # host:port of a Ray cluster to join; None: RAY_ADDRESS, else a local one
    ray_cpus: int | None = None  # the most CPUs the pipeline's tasks take (a local instance: its size)
    prefetch: int = 2  # batches fetched ahead of the trainer
    pin_memory: bool = False
    non_blocking: bool | None = None  # None: follow pin_memory
    device_normalize: bool = False  # uint8 batches from the tasks, normalised on the device
    timeout: float = 300.0  # seconds to wait for one batch before the pool counts as lost
    s3_requests: int = 16  # s3:// data: GETs in flight per task


class RayBackend(Backend):
    name = "ray"
    summary = "Ray Data: decode + augment in Ray tasks, local or on other machines' CPUs, streamed in order"
    Options = Options
    requires = ("ray.data",)
    knobs = {
        "workers": "ray_cpus",
        "pin_memory": "pin_memory",
        "prefetch": "prefetch",
        "device_normalize": "device_normalize",
    }
    min_workers = 1
    prefetch_values = (1, 2, 4)
    reads_s3 = True

    def build(self, cfg: LoaderConfig, opts: Options) -> RayLoader:
        if opts.ray_cpus is not None and opts.ray_cpus < 1:
            raise LoaderError(f"ray ray_cpus must be >= 1, got {opts.ray_cpus}")
        if opts.prefetch < 1:
            raise LoaderError(f"ray prefetch must be >= 1, got {opts.prefetch}")
        if opts.timeout <= 0:
            raise LoaderError(f"ray timeout must be > 0 seconds, got {opts.timeout}")
        if opts.s3_requests < 1:
            raise LoaderError(f"ray s3_requests must be >= 1, got {opts.s3_requests}")
        if cfg.data is None:
            raise LoaderError("the ray backend needs data= (an ImageFolder split folder or s3:// URL)")
        remote = objstore.is_url(cfg.data)
        index = objstore.scan_imagefolder(cfg.data) if remote else scan_imagefolder(cfg.data)
        where = connect(opts)  # before the loader exists: a failure leaves nothing to close
        try:
            return RayLoader(cfg, opts, index, where)
        except BaseException:
            release()
            raise


# -- the Ray connection: one per process, shared by its loaders ---------------------------------------

_LOCK = threading.Lock()
_SESSION = {"holders": 0, "ours": False, "where": None}


def _address(opts: Options) -> tuple[str | None, str]:
    """The cluster to join and the setting that named it (for errors), or (None, '') for a local one."""
    if opts.address:
        return opts.address, "--ray-address / -o address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env, "RAY_ADDRESS") if env else (None, "")


def _reachable(address: str, named_by: str, wait_s: float = 5.0) -> None:
    """One clear line within ``wait_s`` for a head that does not answer (ray.init retries for minutes)."""
    if address.startswith("ray://"):
        raise LoaderError(
            f"{named_by} {address!r}: Ray Client (ray://) is not supported; give the head's GCS host:port"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LoaderError(f"{named_by} {address!r}: expected HOST:PORT of a Ray head (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=wait_s).close()
    except OSError as exc:
        raise LoaderError(
            f"cannot reach the Ray head at {address} ({named_by}): {exc.strerror or exc} within {wait_s:g} s"
        ) from None


def connect(opts: Options) -> str:
    """Join the cluster ``opts`` names, or start a local Ray instance; count this loader as a holder."""
    import ray
    import ray._private.auto_init_hook as auto_init

    # A pipeline thread still waiting on a lost pool when the process exits must not make Ray
    # start (or join) an instance again after ours was shut down: no auto-init in this process.
    auto_init.enable_auto_connect = False

    with _LOCK:
        address, named_by = _address(opts)
        logging.getLogger("ray").setLevel(logging.WARNING)  # "Connecting to ...", "Connected ..."
        if not ray.is_initialized():
            quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
            if address:
                _reachable(address, named_by)
                try:
                    ray.init(address=address, **quiet)
                except Exception as exc:  # ConnectionError, RuntimeError from the GCS client
                    raise LoaderError(
                        f"cannot join the Ray cluster at {address} ({named_by}): {exc}"
                    ) from None
                _SESSION.update(ours=False, where=f"Ray cluster at {address}")
            else:
                cores = available_cores()
                cpus = opts.ray_cpus or cores
                if cpus > cores:
                    raise LoaderError(
                        f"ray ray_cpus {cpus} is more than the {cores} core(s) this process may use "
                        "(--cpus); a local Ray instance runs on them (join a cluster with --ray-address)"
                    )
                # Ray's notice that its default token authentication is on: our own instance keeps it
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                    logging.ERROR
                )
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
                _SESSION.update(ours=True, where=f"local Ray instance of {cpus} CPU(s)")
                atexit.register(_shutdown)
        elif address and _SESSION["where"] and address not in _SESSION["where"]:
            raise LoaderError(
                f"this process is connected to the {_SESSION['where']}; it cannot also join {address} ({named_by})"
            )
        _SESSION["holders"] += 1
        _quiet_console()
        return _SESSION["where"] or "the Ray connection this process opened"


def _quiet_console() -> None:
    """Ray Data's console lines (an INFO line per epoch's dataset, notices) off; its log file keeps them.
    Ray Data configures its loggers when imported, so it is imported first."""
    import ray.data  # noqa: F401

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def release() -> None:
    """One holder fewer; the local instance this process started stops with the last one."""
    with _LOCK:
        _SESSION["holders"] = max(0, _SESSION["holders"] - 1)
        if _SESSION["holders"] == 0 and _SESSION["ours"]:
            _shutdown()


def _shutdown() -> None:
    import ray

    if _SESSION["ours"] and ray.is_initialized():
        ray.shutdown()  # stops the raylet, the GCS and the workers it started
    _SESSION.update(ours=False, where=None)


# -- what runs in a Ray task -----------------------------------------------------------------------


def load_batch(samples, order: np.ndarray, batch_size: int, epoch: int, shape: tuple, block: dict) -> dict:
    """Ray Data's map over one block (one batch number): that batch's samples decoded and augmented,
    collated (normalised unless the device does it), the bad ones named, and the node it ran on."""
    import ray

    if isinstance(samples, ray.ObjectRef):
        samples = ray.get(samples)
    k = int(block["id"][0])
    keys = [(epoch, int(i)) for i in order[k * batch_size : (k + 1) * batch_size]]
    images, labels, bad = collate_checked(samples.__getitems__(keys), normalize=samples.transform.normalize)
    if images is None:  # every sample bad: an empty batch, so the trainer still applies the policy
        dtype = torch.float32 if samples.transform.normalize else torch.uint8
        images, labels = torch.empty((0, *shape), dtype=dtype), torch.empty(0, dtype=torch.int64)
    return {
        "images": images.numpy()[None],
        "labels": labels.numpy()[None],
        "bad": np.array([json.dumps(bad)]),
        "node": np.array([ray.get_runtime_context().get_node_id()]),
    }


class _Stop(Exception):
    pass


class RayLoader(BaseLoader):
    name = "ray"
    index_order = True  # reads epoch_indices(): loader.sampler iterates them, state resumes them

    def __init__(self, cfg: LoaderConfig, opts: Options, index, where: str):
        import ray

        n = len(index)
        super().__init__(cfg, *rank_share(n, cfg, cfg.data), index.classes, split_size=n)
        self.options, self.index, self.where = opts, index, where
        self._transform = transform_for(cfg, float_in_workers=not opts.device_normalize)
        self._feed = DeviceFeed.for_options(cfg, opts)
        self._samples = ray.put(Samples(index, self._transform, cfg.seed, opts.s3_requests))
        self.nodes: set[str] = set()  # the Ray nodes this loader's batches were made on
        self._running = None  # the epoch's generator, closed by close()
        self._connected = True

    def describe(self) -> dict:
        return {
            **super().describe(),
            "decode": f"cpu (torchvision.io/libjpeg-turbo) in Ray Data tasks on the {self.where}",
            "normalize": "device" if self.options.device_normalize else "Ray tasks",
            "pin_memory_effective": self.options.pin_memory and self.config.device.type == "cuda",
            "ray_nodes_used": len(self.nodes),
        }

    def _dataset(self):
        import ray.data
        from ray.data import ExecutionResources

        cfg, opts = self.config, self.options
        order = self.epoch_indices()
        if cfg.drop_last:
            order = order[: len(order) - len(order) % cfg.batch_size]
        batches = math.ceil(len(order) / cfg.batch_size)
        shape = (3, cfg.image_size, cfg.image_size)
        load = functools.partial(load_batch, self._samples, order, cfg.batch_size, self.epoch, shape)
        blocks = ray.data.range(batches, override_num_blocks=max(1, batches))
        remote_args = {}
        if objstore.is_url(cfg.data):  # the tasks' S3 client: this process's endpoint and credentials
            env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "LOADERBENCH_S3"))}
            remote_args["runtime_env"] = {"env_vars": env}
        ds = blocks.map_batches(load, batch_size=None, num_cpus=1, **remote_args)
        # The dataset's own copy of the DataContext (the process's stays as the user set it).
        ds.context.enable_progress_bars = False
        ds.context.execution_options.preserve_order = True  # the epoch's order, retried tasks included
        ds.context.execution_options.resource_limits = ExecutionResources.for_limits(cpu=opts.ray_cpus)
        return ds, batches

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        """The pipeline's consumer, on a thread, so that the trainer can wait for a batch with a timeout
        (Ray Data's iterator blocks without one while a lost pool's tasks wait for CPUs)."""

        def put(item):
            while not stop.is_set():
                try:
                    return out.put(item, timeout=0.2)
                except queue.Full:
                    continue
            raise _Stop

        try:
            ds, batches = self._dataset()
            if batches:
                for block in ds.iter_batches(
                    batch_size=None, batch_format="numpy", prefetch_batches=self.options.prefetch
                ):
                    put(("batch", block))
            put(("end", None))
        except _Stop:
            pass
        except BaseException as exc:  # a task that raised, a lost cluster: the trainer raises it
            try:
                put(("error", exc))
            except _Stop:
                pass

    def _batches(self):
        out, stop = queue.Queue(maxsize=1), threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), name="ray-loader", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    kind, item = out.get(timeout=self.options.timeout)
                except queue.Empty:
                    # The pipeline thread stays blocked in Ray Data; when the process exits and Ray
                    # disconnects, Ray Data logs that as an internal error: noise after this one.
                    for handler in logging.getLogger("ray.data").handlers:
                        handler.setLevel(logging.CRITICAL + 1)
                    raise LoaderError(
                        f"no batch from Ray within {self.options.timeout:g} s (the {self.where}): its "
                        "nodes may be gone or busy; `ray status` shows what it has (-o timeout=S to wait longer)"
                    ) from None
                if kind == "end":
                    return
                if kind == "error":
                    raise LoaderError(f"ray pipeline stopped: {_first_line(item)}") from item
                batch = self._unpack(item)
                if batch is not None:
                    yield batch
        finally:
            stop.set()
            thread.join(timeout=5.0)

    def _unpack(self, block: dict):
        bad = [tuple(b) for b in json.loads(str(block["bad"][0]))]
        self.nodes.add(str(block["node"][0]))
        images, labels = block["images"][0], block["labels"][0]
        self._skip_or_raise(bad, batch_empty=len(labels) == 0)
        if not len(labels):
            return None
        # Ray hands out read-only views of its object store: the trainer gets its own copy.
        return torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels))

    def _epoch_batches(self):
        self.close_epoch()
        self._running = self._batches()
        return self._feed(self._running)

    def close_epoch(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None

    def close(self) -> None:
        self.close_epoch()
        if self._connected:
            self._connected = False
            release()


def _first_line(exc: BaseException) -> str:
    """The user-facing cause of a Ray error: the task's own exception line ("RuntimeError: ...")
    from the remote traceback Ray's wrappers (RayTaskError, UserCodeException) carry as text."""
    text = [t.strip() for t in str(exc).splitlines()]
    own = [
        t
        for t in text
        if _RAISED.match(t) and not t.startswith(("ray.", "UserCodeException", "RayTaskError"))
    ]
    if own:
        return own[-1][:300]
    lines = [t for t in text if t and not t.startswith("Traceback")]
    return f"{type(exc).__name__}: {lines[0] if lines else exc!r}"[:300]


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit): ")
