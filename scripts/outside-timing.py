"""A plain perf_counter timing of `build_loader` iteration, the reference `bench run --loader-only`
is checked against: the same options, batches and warm-up, nothing else in the process.
  python scripts/outside-timing.py LOADER DATA_ROOT STEPS WARMUP '{"num_workers": 2}'
Prints {"images_per_second": ...}: images after WARMUP batches / the time from the WARMUP-th batch
to the last one (STEPS batches in all, over as many epochs as that takes)."""

import json
import sys
import time

from loaders import build_loader

loader, root, steps, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
train = build_loader(
    loader, f"{root}/train", batch_size=64, train=True, drop_last=True, device="cpu", **options
)
step, images, start, end, epoch = 0, 0, None, None, 0
while step < steps:
    train.set_epoch(epoch)
    for _, labels in train:
        step += 1
        if step == warmup:
            start = time.perf_counter()
        elif step > warmup:
            images += labels.shape[0]
        if step == steps:
            end = time.perf_counter()
            break
    epoch += 1
train.close()
print(json.dumps({"images_per_second": images / (end - start)}))
