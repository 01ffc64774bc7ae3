"""`litdata` backend: Lightning's LitData streaming format.

Written with LitData's ``BinaryWriter`` (what ``litdata.optimize`` runs in each of its workers: its
chunk files and ``index.json``); read
with ``litdata.StreamingDataset``, in place from a local folder, or from an ``s3://`` URL through
LitData's own downloader into a private cache (``loaders.streamed`` has the shared layer: index
order, exact-once over ranks, decode and augmentation as the torch backend, state on any world size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import objstore
from .contract import LoaderConfig
from .streamed import Format, StreamedBackend, _item


class LitFormat(Format):
    kind = "loaderbench litdata"
    backend = "litdata"

    def write(self, index, order, out: Path, chunk_bytes: int, workers: int, progress: bool) -> None:
        # The writer ``litdata.optimize`` runs in each of its workers, run here in-process: optimize
        # waits forever when a worker fails (a full disk, measured), and copying JPEG bytes gains
        # nothing from its processes.
        from litdata.streaming.writer import BinaryWriter
        from litdata.utilities.env import _DistributedEnv
        from tqdm import tqdm

        out.mkdir(parents=True)
        writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
        # One writer, whatever the run's world: under torchrun it would otherwise wait in merge() for
        # an index from every rank, and only one rank converts.
        writer._distributed_env, writer._rank = _DistributedEnv(1, 0, 1), 0
        for position, i in enumerate(tqdm(order, desc="litdata", disable=not progress, leave=False)):
            writer.add_item(position, _item(index, int(i)))
        writer.done()
        writer.merge()

    def chunk_samples(self, out: Path) -> list[int]:
        with open(out / "index.json") as f:
            return [c["chunk_size"] for c in json.load(f)["chunks"]]

    def open(self, location: str, cache: Path | None, cfg: LoaderConfig):
        from litdata import StreamingDataset
        from litdata.utilities.env import _WorkerEnv

        if objstore.is_url(location):
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            if endpoint and endpoint.startswith("http://"):
                # LitData builds obstore's S3 store for chunk downloads without allow_http: every GET
                # from an http:// endpoint (our loopback store, a MinIO) fails with "builder error".
                from litdata.streaming import downloader

                downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True
            ds = StreamingDataset(
                location, cache_dir=str(cache), storage_options={"endpoint_url": endpoint} if endpoint else {}
            )
            # Whole chunks into the cache, as LitData's own iteration fetches them (its access by
            # index would otherwise GET each sample's byte range).
            ds._on_demand_bytes = False
        else:
            ds = StreamingDataset(location)
        ds.worker_env = _WorkerEnv.detect()
        ds.cache = ds._create_cache(worker_env=ds.worker_env)
        # Read memory-mapped, in a local folder as in the cache. LitData maps only the chunks its
        # iteration gives one worker (a shared chunk may be evicted under a reader); these chunks are
        # never evicted, and unmapped, each read by index reads its whole chunk file (measured: 13 ms a
        # sample with 64 MB chunks).
        ds.cache._reader.enable_mmap_for_chunks(set(range(len(ds.cache._reader.config._chunks))))
        return ds

    def version(self) -> str:
        import litdata

        return f"litdata {litdata.__version__}"


class LitBackend(StreamedBackend):
    name = "litdata"
    summary = "LitData: chunks from its BinaryWriter (converted once from the ImageFolder), read by StreamingDataset"
    requires = ("litdata",)
    stored_format = "LitData chunks"
    fmt = LitFormat()
