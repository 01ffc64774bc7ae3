"""Checkpoints a training run resumes from, and SIGTERM as "checkpoint at the next step, then exit".

A checkpoint is a folder ``step-NNNNNNNNN`` under the run's checkpoint folder: ``trainer.pt``
(model, optimizer, AMP scaler, the loop's place, the loader's ``state_dict()``, every rank's RNG
states) and ``meta.json``, written into ``.partial-...`` first and renamed into place, so a run
killed while saving leaves the previous checkpoint whole and never a half-written one. FSDP2's
sharded weights and optimizer state go through ``torch.distributed.checkpoint`` (one file per rank,
resharded on load); ZeRO-1's optimizer state is consolidated on rank 0. Only the newest checkpoint
is kept. The trainer stays ignorant of backends: a loader's state is whatever its ``state_dict``
returns (torchdata's protocol), and a loader without one resumes at the start of its epoch.

SIGTERM (SLURM's preemption, torchrun passing on its own) sets a flag; every rank learns every
other rank's flag one step later through an all-reduce on a gloo group (CPU: no device sync), so
all of them checkpoint at the same step and exit with ``Preempted.exit_code`` (143, 128 + SIGTERM).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BenchError, Preempted

__all__ = ["CheckpointError", "Checkpoints", "Preempted", "latest", "read_meta"]

SCHEMA = "loaderbench.checkpoint/1"
PREFIX = "step-"


class CheckpointError(BenchError):
    """A checkpoint folder that cannot be resumed from (missing, damaged, of another run)."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (its meta.json is written last), or None."""
    done = sorted(p for p in Path(folder).glob(PREFIX + "*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: meta.json cannot be read ({exc}): damaged") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise CheckpointError(
            f"checkpoint {path}: not a loaderbench checkpoint (schema {meta.get('schema')!r})"
        )
    return meta


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsynced_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


class Checkpoints:
    """One run's checkpoint folder: when to save (every ``every`` steps, and at the step after a
    SIGTERM), saving, and restoring the newest checkpoint (``resume=True``)."""

    def __init__(self, folder: Path | str, every: int = 0, resume: bool = False):
        self.folder, self.every, self.resume = Path(folder), int(every), resume
        self.saves: list[dict] = []  # seconds and bytes of each save
        self.restored: dict | None = None  # what restore() read: loop and loader state, meta
        self.preempted = False
        self._flag = torch.zeros(1, dtype=torch.int32)  # this rank saw SIGTERM
        self._pending = None  # (work, tensor) of the last step's flag exchange
        self._held: list = []  # exchanged tensors kept alive (gloo's late release, see loop._until_released)
        self._group = None
        self._previous = None

    # -- SIGTERM -----------------------------------------------------------------------------------
    def __enter__(self):
        """Install the SIGTERM handler (before any loader worker forks: a worker inherits it, so a
        signal sent to the whole process group leaves the workers alive for the checkpoint)."""
        _, world = _world()
        if world > 1:
            # The flags travel on gloo whatever the training backend: CPU tensors, no device sync.
            gloo = dist.get_backend() == "gloo"
            self._group = None if gloo else dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def _on_term(self, signum, frame) -> None:
        self._flag[0] = 1
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once

    def boundary(self, steps: int) -> str | None:
        """At the end of a step: "stop" (a rank saw SIGTERM: save, then exit), "save" (every N
        steps) or None. Every rank gets the same answer at the same step."""
        _, world = _world()
        if world == 1:
            stop = bool(self._flag[0])
        else:
            stop = False
            if self._pending is not None:
                work, seen = self._pending
                work.wait()
                stop = bool(seen[0])
            mine = self._flag.clone()
            self._held = [mine]
            self._pending = (dist.all_reduce(mine, group=self._group, async_op=True), mine)
        if stop:
            self.preempted = True
            return "stop"
        return "save" if self.every and steps % self.every == 0 else None

    # -- saving ------------------------------------------------------------------------------------
    def save(self, loop: dict, loader_state: dict | None, objects: dict) -> Path:
        """Write a checkpoint of step ``loop["steps"]`` (every rank calls this at the same step)."""
        start = time.perf_counter()
        rank, world = _world()
        name = f"{PREFIX}{loop['steps']:09d}"
        partial, final = self.folder / f".partial-{name}", self.folder / name
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        rngs = [None] * world
        if world > 1:
            dist.barrier()
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        net, optimizer, shard = objects.get("model"), objects.get("optimizer"), objects.get("shard", "off")
        blob = {"schema": SCHEMA, "loop": loop, "loader": loader_state, "rng": rngs, "world_size": world}
        if net is not None:
            if shard == "fsdp":
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_state_dict

                model_sd, optim_sd = get_state_dict(net, optimizer)
                dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(partial / "dcp"))
            else:
                if shard == "optimizer":  # ZeRO-1: each rank holds a part; rank 0 gathers the whole
                    optimizer.consolidate_state_dict(to=0)
                blob["model"] = net.state_dict()
                blob["optimizer"] = optimizer.state_dict() if rank == 0 else None
            blob["scaler"] = objects["scaler"].state_dict()
            blob["extra"] = objects.get("extra", {})
        if rank == 0:
            _fsynced_write(partial / "trainer.pt", lambda f: torch.save(blob, f))
            meta = {
                "schema": SCHEMA,
                "step": loop["steps"],
                "epoch": loop["epoch"],
                "world_size": world,
                "shard": shard,
                "loader": None
                if loader_state is None
                else {k: loader_state.get(k) for k in ("backend", "epoch", "samples_seen")},
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _fsynced_write(partial / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        if world > 1:
            dist.barrier()  # every rank's shards are in .partial before it becomes the checkpoint
        if rank == 0:
            os.replace(partial, final)
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself survives a crash
            finally:
                os.close(fd)
            for old in self.folder.glob(PREFIX + "*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        if world > 1:
            dist.barrier()
        size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file()) if rank == 0 else None
        self.saves.append({"step": loop["steps"], "seconds": time.perf_counter() - start, "bytes": size})
        return final

    # -- restoring ---------------------------------------------------------------------------------
    def restore(self, objects: dict) -> dict | None:
        """Load the newest checkpoint into the model, optimizer and scaler of ``objects``; return
        the loop's and loader's state (also kept as ``self.restored``). None without ``resume``."""
        if not self.resume:
            return None
        start = time.perf_counter()
        path = latest(self.folder)
        if path is None:
            raise CheckpointError(f"--resume {self.folder}: no checkpoint there (no {PREFIX}*/meta.json)")
        meta = read_meta(path)
        try:
            blob = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, overwritten, not a torch file
            raise CheckpointError(
                f"checkpoint {path / 'trainer.pt'} cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}): damaged"
            ) from None
        if not isinstance(blob, dict) or blob.get("schema") != SCHEMA:
            raise CheckpointError(f"checkpoint {path / 'trainer.pt'}: not a loaderbench checkpoint")
        rank, world = _world()
        net, optimizer, shard = objects.get("model"), objects.get("optimizer"), objects.get("shard", "off")
        if net is not None:
            if (meta.get("shard") == "fsdp") != (shard == "fsdp"):
                raise CheckpointError(
                    f"checkpoint {path} was written {'with' if meta.get('shard') == 'fsdp' else 'without'} "
                    "--fsdp; resume it the same way"
                )
            if "scaler" not in blob:
                raise CheckpointError(f"checkpoint {path} holds no model (a --loader-only run's)")
            try:
                self._load_model(path, blob, net, optimizer, shard)
            except (RuntimeError, KeyError, ValueError) as exc:
                raise CheckpointError(
                    f"checkpoint {path}: its model or optimizer does not fit this run's "
                    f"({str(exc).splitlines()[0][:200]}): another --model or settings?"
                ) from None
            objects["scaler"].load_state_dict(blob["scaler"])
            objects.get("extra", {}).update(blob.get("extra", {}))
        if blob["world_size"] == world:  # the same ranks: each its own RNG streams
            _set_rng_state(blob["rng"][rank])
        self.restored = {
            "path": str(path),
            "meta": meta,
            "loop": blob["loop"],
            "loader": blob["loader"],
            "world_size": blob["world_size"],
            "load_seconds": time.perf_counter() - start,
        }
        return self.restored

    @staticmethod
    def _load_model(path: Path, blob: dict, net, optimizer, shard: str) -> None:
        if shard == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(net, optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(state, checkpoint_id=str(path / "dcp"))  # resharded to this run's ranks
            set_state_dict(
                net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
            )
            return
        net.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])  # ZeRO-1 takes the whole and keeps its part

    def record(self) -> dict:
        """What the result says of checkpointing: saves and their cost, and where it resumed from."""
        secs = sorted(s["seconds"] for s in self.saves)
        out = {
            "folder": str(self.folder),
            "every_steps": self.every,
            "saves": len(self.saves),
            "save_seconds_median": secs[len(secs) // 2] if secs else None,
            "save_seconds_max": secs[-1] if secs else None,
            "bytes": self.saves[-1]["bytes"] if self.saves else None,
            "preempted": self.preempted,
        }
        if self.restored is not None:
            r = self.restored
            out["resumed_from"] = {
                "checkpoint": r["path"],
                "step": r["meta"]["step"],
                "epoch": r["meta"]["epoch"],
                "world_size": r["world_size"],
                "loader": r["meta"].get("loader"),
                "load_seconds": r["load_seconds"],
            }
        return out
