"""What handing a normalised float32 batch over costs (reports/limit-cpu/NOTES.md): filling 64 uint8
224 px images into a fresh float32 batch, malloc'd or in shared memory (as a DataLoader worker's
collate allocates it), with and without madvise(MADV_POPULATE_WRITE); one core, ms per batch.
    python scripts/handover-cost.py
"""

import ctypes
import os
import time

import torch

os.sched_setaffinity(0, {0})
torch.set_num_threads(1)
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_WRITE = 23
img = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)


def run(populate, shared):
    t = time.perf_counter()
    for _ in range(20):
        if shared:
            st = torch.empty(0)._typed_storage()._new_shared(64 * 3 * 224 * 224)
            out = torch.empty(0).set_(st).view(64, 3, 224, 224)
        else:
            out = torch.empty(64, 3, 224, 224)
        if populate:
            p = out.data_ptr()
            a = p & ~4095
            n = out.numel() * 4 + (p - a)
            r = libc.madvise(a, n, MADV_POPULATE_WRITE)
            assert r == 0, ctypes.get_errno()
        for k in range(64):
            out[k].copy_(img)
    return (time.perf_counter() - t) / 20 * 1000


for shared in (False, True):
    for populate in (False, True):
        print(
            "shared" if shared else "malloc",
            "populate" if populate else "faults",
            f"{run(populate, shared):.1f} ms per batch of 64",
        )
