"""Worker processes' shared layer: DataLoader workers started, checked and stopped epoch by epoch,
with a dead or stuck worker reported as one LoaderError that says what usually causes it."""

from __future__ import annotations

import signal
import sys
import threading
import time

from torch.utils.data import DataLoader

from .contract import LoaderError


def check_worker_options(opts) -> None:
    """The checks every DataLoader-backed Options shares (num_workers, prefetch_factor, timeout and,
    where the backend has it, persistent_workers)."""
    if opts.num_workers < 0:
        raise LoaderError(f"num_workers must be >= 0, got {opts.num_workers}")
    if opts.num_workers == 0 and (
        getattr(opts, "persistent_workers", False) or opts.prefetch_factor is not None
    ):
        raise LoaderError("persistent_workers and prefetch_factor need num_workers >= 1")
    if opts.prefetch_factor is not None and opts.prefetch_factor < 1:
        raise LoaderError(f"prefetch_factor must be >= 1, got {opts.prefetch_factor}")
    if opts.timeout < 0:
        raise LoaderError(f"timeout must be >= 0 seconds (0 waits forever), got {opts.timeout}")
    if opts.timeout and opts.num_workers == 0:
        raise LoaderError("timeout needs num_workers >= 1 (it bounds the wait for a worker's batch)")


def worker_failed(exc: RuntimeError, backend: str) -> LoaderError | None:
    """DataLoader's report of a dead worker ("DataLoader worker (pid N) exited unexpectedly" or "is
    killed by signal") or of its ``timeout`` expiring, as a LoaderError; None for other errors."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if first.startswith("DataLoader timed out after"):
        seconds = first.split("after", 1)[1].split("seconds")[0].strip()
        return LoaderError(
            f"{backend} loader: no batch from the workers within timeout={seconds} s: a worker is "
            "stuck (a hung network mount, a deadlock) or one batch takes longer than that "
            "(raise -o timeout=...)"
        )
    if "DataLoader worker" not in first:
        return None
    return LoaderError(f"{backend} loader: {first.rstrip('. ')}. {OOM_HINT}")


OOM_HINT = (
    "A worker killed by a signal is usually the kernel's OOM killer (see `dmesg`): fewer "
    "num_workers or a smaller batch needs less memory"
)


def dead_workers(it, wait_s: float = 5.0) -> list[int]:
    """The pids of ``it``'s workers that have exited (waiting a little: the kernel may not have
    reaped a worker yet when the main process sees its end of a pipe close)."""
    procs = list(getattr(it, "_workers", None) or [])
    deadline = time.monotonic() + wait_s
    while procs:
        dead = [p.pid for p in procs if p.exitcode is not None]
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)
    return []


def checked(it, backend: str):
    """Iterate a DataLoader iterator; a dead or stuck worker becomes a LoaderError. The workers are
    stopped before raising: the error's traceback keeps the iterator alive, and with it DataLoader's
    SIGCHLD check of those workers, which would raise again wherever the caller is later."""
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            stop_workers(it)
            raise (worker_failed(exc, backend) or exc) from exc
        except (ConnectionError, EOFError) as exc:
            # A worker killed while handing over a batch's shared memory: the main process's fd
            # transfer from it breaks before DataLoader's own dead-worker check can speak.
            try:
                dead = dead_workers(it)
            except RuntimeError as sigchld:  # DataLoader's SIGCHLD check spoke while we waited
                stop_workers(it)
                raise (worker_failed(sigchld, backend) or sigchld) from exc
            stop_workers(it)
            if not dead:
                raise
            raise LoaderError(
                f"{backend} loader: DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited "
                f"unexpectedly while handing over a batch ({type(exc).__name__}). {OOM_HINT}"
            ) from exc
        except LoaderError as exc:
            stop_workers(it)
            raise from_worker(exc) from None
        yield item


def from_worker(exc: LoaderError) -> LoaderError:
    """A LoaderError a worker raised, as its own line: DataLoader re-raises it in the main process
    with the worker's whole traceback as the message ("Caught LoaderError in DataLoader worker...")."""
    text = str(exc).strip()
    if not text.startswith("Caught "):
        return exc
    last = text.splitlines()[-1]
    return type(exc)(last.split(": ", 1)[1] if ": " in last else last)


def start_workers(loader: DataLoader):
    """``iter(loader)`` with a terminal's Ctrl-C held back while the workers start. Otherwise it can
    land in a starting worker (reported as a dead worker) or in the at-fork handlers, where Python
    drops the KeyboardInterrupt and the run goes on. A held Ctrl-C is passed on once they are up."""
    if threading.current_thread() is not threading.main_thread():  # only it can set handlers
        return iter(loader)
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        it = iter(loader)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if held:
        try:
            signal.raise_signal(signal.SIGINT)  # the caller's handler, KeyboardInterrupt by default
        except BaseException:
            stop_workers(it)
            raise
    return it


def stop_workers(it) -> None:
    """Stop a DataLoader iterator's workers now, not whenever it is garbage-collected. A worker that
    died meanwhile makes DataLoader's SIGCHLD check raise while the others are joined; it has
    nothing left to tell here, and the shutdown's own ``finally`` has stopped the rest."""
    shutdown = getattr(it, "_shutdown_workers", None)  # private, but the only way short of GC
    if shutdown is None:
        return
    try:
        shutdown()
    except RuntimeError as exc:
        if worker_failed(exc, "") is None:
            raise


def quiet_hand_over(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker whose main process dies while taking a batch's shared
    memory from it prints no multiprocessing traceback; the death is reported by bench or torchrun.
    In a worker, only multiprocessing's fd-sharing thread reports through sys.excepthook."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, (EOFError, ConnectionError)):
            default(kind, value, tb)

    sys.excepthook = hook


class WorkerEpochs:
    """A DataLoader iterated epoch by epoch through start_workers() and checked(); close() stops the
    live iterator's workers, whether its epoch ended, failed or was interrupted (persistent workers
    belong to the DataLoader's own ``_iterator``)."""

    def __init__(self, loader: DataLoader, backend: str):
        self.loader, self.backend, self._live = loader, backend, None

    def __iter__(self):
        self._live = start_workers(self.loader)
        return checked(self._live, self.backend)

    def close(self) -> None:
        stop_workers(self._live)
        stop_workers(self.loader._iterator)
        self._live = self.loader._iterator = None


def worker_loader(dataset, opts, backend: str, cuda: bool, **kwargs) -> WorkerEpochs:
    """A DataLoader with the Options' worker knobs (num_workers, pin_memory on CUDA, prefetch_factor,
    timeout, persistent_workers where the backend has it), iterated through WorkerEpochs."""
    return WorkerEpochs(
        DataLoader(
            dataset,
            num_workers=opts.num_workers,
            pin_memory=opts.pin_memory and cuda,
            prefetch_factor=opts.prefetch_factor,
            timeout=opts.timeout,
            persistent_workers=getattr(opts, "persistent_workers", False),
            worker_init_fn=quiet_hand_over,
            **kwargs,
        ),
        backend,
    )
