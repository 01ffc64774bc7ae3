"""How LitData's and Mosaic's own iteration split an epoch over ranks, against the contract's rule
(every sample once, training padded to ceil(n / ranks) per rank): each library's StreamingDataset
with its own shuffle and rank partition, 2 gloo ranks, 2 epochs, over a split of N samples (odd, so
that an exact split is impossible), read with a DataLoader of 0 and 2 workers. Prints, per library,
workers and epoch: samples each rank read, samples missing, samples read twice, and whether the
order changed between epochs. (Our litdata and mosaic backends read by index in the contract's
order instead: docs/backends.md.)
    .venv/bin/python scripts/native-coverage.py [N]
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH, EPOCHS = 3, 2


def write_split(root: Path, n: int) -> Path:
    from PIL import Image

    for i in range(n):
        folder = root / "split" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / f"{i:04d}.jpg")
    return root / "split"


def rank_main(rank, world, port, library, location, workers, out, kwargs):
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    epochs = []
    if library == "litdata":
        from litdata import StreamingDataLoader, StreamingDataset

        ds = StreamingDataset(location, shuffle=True, seed=0, **kwargs)
        loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers)
    else:
        from streaming import StreamingDataset
        from torch.utils.data import DataLoader

        ds = StreamingDataset(local=location, shuffle=True, shuffle_seed=0, batch_size=BATCH)
        loader = DataLoader(ds, batch_size=BATCH, num_workers=workers)
    for epoch in range(EPOCHS):
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        epochs.append([int(i) for b in loader for i in b["index"]])
    algo = getattr(ds, "shuffle_algo", None) or "FullShuffle"  # LitData's shuffler when shuffle=True
    (out / f"{rank}.json").write_text(json.dumps({"epochs": epochs, "shuffle": str(algo)}))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from loaders.lit import LitFormat
    from loaders.mosaic import MosaicFormat
    from loaders.streamed import convert

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    tmp = Path(tempfile.mkdtemp(prefix="native-coverage-"))
    split = write_split(tmp, n)
    print(
        f"{n} samples, 2 ranks, batch {BATCH}; the contract: {-(-n // 2)} per rank in training "
        f"({-(-n // 2) * 2 - n} padded), every sample each epoch\n"
    )
    print("| library | workers | epoch | per rank | missing | read twice | shuffle |")
    print("|---|---|---|---|---|---|---|")
    cases = (
        ("litdata", LitFormat(), {}),
        ("litdata", LitFormat(), {"drop_last": False}),
        ("mosaic", MosaicFormat(), {}),
    )
    for library, fmt, kwargs in cases:
        location = tmp / library
        if not location.exists():
            convert(fmt, split, location, chunk_mb=0.002, progress=False)  # a few samples per chunk
        name = library + "".join(f" {k}={v}" for k, v in kwargs.items())
        for workers in (0, 2):
            out = Path(tempfile.mkdtemp(dir=tmp))
            mp.start_processes(
                rank_main,
                args=(2, free_port(), library, str(location), workers, out, kwargs),
                nprocs=2,
                start_method="spawn",
            )
            records = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
            orders = []
            for e in range(EPOCHS):
                seen = collections.Counter(i for rec in records for i in rec["epochs"][e])
                orders.append(tuple(records[0]["epochs"][e]))
                print(
                    f"| {name} | {workers} | {e} | {' / '.join(str(len(r['epochs'][e])) for r in records)} "
                    f"| {n - len(seen)} | {sum(1 for c in seen.values() if c > 1)} | {records[0]['shuffle']} |"
                )
            print(f"|  |  |  | order changed between epochs: {orders[0] != orders[1]} |  |  |  |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
