"""`mosaic` backend: Mosaic (Databricks) Streaming's MDS shards.

Written with ``streaming.MDSWriter``; read with ``streaming.StreamingDataset``, in place from a local
folder, or from an ``s3://`` URL through its own S3 download into a private local cache
(``loaders.streamed`` has the shared layer: index order, exact-once over ranks, decode and
augmentation as the torch backend, state on any world size).

Its known trap: a StreamingDataset keeps its coordination in shared memory (/dev/shm) registered
under its local cache folder, and a run killed before it frees it leaves it there: the next dataset
on that folder is refused ("Reused local directory"). Each loader here downloads into a private
cache folder of its own process, so a killed run's leftovers never meet the next run; when the next
loader is made, the folders of processes that are gone are removed and their shared memory freed.

Ranks: samples are taken by index in the contract's order, so Mosaic's partition of the world is
not used; each loader opens its dataset as a world of one (``_alone``), whatever the process group
(Mosaic would otherwise read RANK/LOCAL_RANK, wait on the group's barriers while it registers its
shared memory, and start a process group of its own where WORLD_SIZE is set and none is).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

import torch

from . import objstore
from .contract import LoaderConfig
from .streamed import Format, StreamedBackend, _item

SHM = Path("/dev/shm")
PREFIX_FILE = "mosaic-shm-prefix"  # in the private cache: the shared memory prefix its dataset took


class MosaicFormat(Format):
    kind = "loaderbench mds"
    backend = "mosaic"
    per_process = False  # its workers attach to the parent dataset's shared memory

    def write(self, index, order, out: Path, chunk_bytes: int, workers: int, progress: bool) -> None:
        from streaming import MDSWriter
        from tqdm import tqdm

        columns = {"index": "int", "jpg": "bytes", "cls": "int"}
        with MDSWriter(out=str(out), columns=columns, size_limit=chunk_bytes, progress_bar=False) as w:
            for i in tqdm(order, desc="mds", disable=not progress, leave=False):
                w.write(_item(index, int(i)))

    def chunk_samples(self, out: Path) -> list[int]:
        with open(out / "index.json") as f:
            return [shard["samples"] for shard in json.load(f)["shards"]]

    def open(self, location: str, cache: Path | None, cfg: LoaderConfig):
        from streaming import StreamingDataset

        if not objstore.is_url(location):
            with _alone():
                return StreamingDataset(local=location, shuffle=False, batch_size=cfg.batch_size)
        if os.environ.get("AWS_ENDPOINT_URL"):  # Mosaic's S3 client reads its own variable, when it fetches
            os.environ["S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]
        with _alone():
            ds = StreamingDataset(remote=location, local=str(cache), shuffle=False, batch_size=cfg.batch_size)
        prefix = getattr(ds, "_shm_prefix_int", None)
        if prefix is not None:
            (cache / PREFIX_FILE).write_text(str(prefix))
        return ds

    def version(self) -> str:
        import streaming

        return f"mosaicml-streaming {streaming.__version__}"

    def forget(self, cache: Path) -> None:
        """Free the shared memory and file locks that the dead process of ``cache`` left."""
        try:
            prefix = int((cache / PREFIX_FILE).read_text())
        except (OSError, ValueError):
            return
        for leftover in [*SHM.glob(f"{prefix:06}_*"), *Path(tempfile.gettempdir()).glob(f"{prefix:06}_*")]:
            leftover.unlink(missing_ok=True)


WORLD_OF_ONE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


@contextlib.contextmanager
def _alone():
    """A StreamingDataset made as the only rank of a world of one: the environment Mosaic reads says
    so and the process group is hidden from it while it registers its shared memory; datasets made
    at once by other processes of the machine (ranks) take turns under a file lock, since each one
    claims the first free shared-memory prefix."""
    saved = {k: os.environ.get(k) for k in WORLD_OF_ONE}
    initialized = torch.distributed.is_initialized
    lock = open(Path(tempfile.gettempdir()) / "loaderbench-mosaic.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.environ.update(WORLD_OF_ONE)
        torch.distributed.is_initialized = lambda: False
        yield
    finally:
        torch.distributed.is_initialized = initialized
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lock.close()  # releases the lock


class MosaicBackend(StreamedBackend):
    name = "mosaic"
    summary = "Mosaic Streaming: MDS shards (converted once from the ImageFolder), read by StreamingDataset"
    requires = ("streaming",)
    stored_format = "Mosaic MDS shards"
    fmt = MosaicFormat()
