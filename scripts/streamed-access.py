"""What one read by index costs in each streaming format, by order: the library's dataset as our
``litdata`` and ``mosaic`` backends open it (loaders/lit.py, loaders/mosaic.py: memory-mapped, one
process, warm page cache), every sample of the default generated set's training split read once in
index order, in a random order (the contract's ``order=random``) and in 256-sample windows within a
chunk (``order=chunks``); fresh dataset per pass, passes alternated, medians of TRIALS. Only the
record read (JPEG bytes, label), no decode. Prints a Markdown table; docs/backends.md quotes it.
    .venv/bin/python scripts/streamed-access.py [TRIALS]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def orders(folder: Path, n: int) -> dict[str, np.ndarray]:
    import json

    from loaders.streamed import MANIFEST, chunk_windows

    rng = np.random.default_rng(0)
    windows = [
        np.arange(a, b)
        for a, b in chunk_windows(json.loads((folder / MANIFEST).read_text())["chunk_samples"])
    ]
    return {
        "index order": np.arange(n),
        "random (order=random)": rng.permutation(n),
        "windows in a chunk (order=chunks)": np.concatenate(
            [rng.permutation(windows[k]) for k in rng.permutation(len(windows))]
        ),
    }


def main() -> None:
    from types import SimpleNamespace

    from bench.data.synth import default_dataset
    from loaders.registry import get_backend
    from loaders.streamed import Options

    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    split = Path(default_dataset()) / "train"
    print("| format | order | ms per sample, median (min-max) |\n|---|---|---|")
    for name in ("litdata", "mosaic"):
        b = get_backend(name)
        folder, fmt, cfg = b.stored(split, Options()), b.fmt, SimpleNamespace(batch_size=64)
        n = len(fmt.open(str(folder), None, cfg))
        plans = orders(folder, n)
        times = {k: [] for k in plans}
        for _ in range(trials):
            for what, order in plans.items():
                ds = fmt.open(str(folder), None, cfg)
                t = time.perf_counter()
                for i in order:
                    ds[int(i)]
                times[what].append((time.perf_counter() - t) / n * 1e3)
                fmt.close(ds)
        for what, ts in times.items():
            print(
                f"| {name} ({fmt.version()}) | {what} | {statistics.median(ts):.3f} ({min(ts):.3f}-{max(ts):.3f}) |"
            )


if __name__ == "__main__":
    main()
