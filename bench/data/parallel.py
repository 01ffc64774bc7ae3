"""One process per core over a list of tasks, with a progress bar: the data tools' writers."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor


def pool_map(fn, tasks: list, desc: str, workers: int | None = None, progress: bool = True) -> list:
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(
            tqdm(
                pool.map(fn, tasks, chunksize=16),
                total=len(tasks),
                desc=desc,
                unit="img",
                disable=not progress,
            )
        )
