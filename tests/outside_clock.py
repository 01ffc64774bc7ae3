"""An outside clock on a loader: what a plain perf_counter timing loop would see of the same run.
No import of bench or loaders, so scripts/same-run-timing.py can use it on an older checkout too."""

from __future__ import annotations

import time


class Stamped:
    """A loader seen from outside: per epoch, the perf_counter times the consumer asked for its
    iterator and for each batch, and the images each batch held."""

    def __init__(self, loader):
        self.loader, self.epochs = loader, []

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        epoch = {"iter": time.perf_counter(), "asks": [], "images": []}
        self.epochs.append(epoch)
        it = iter(self.loader)
        while True:
            epoch["asks"].append(time.perf_counter())
            try:
                images, labels = next(it)
            except StopIteration:  # a plain loop's clock runs until the loader says the epoch is over
                epoch["asks"][-1] = time.perf_counter()
                return
            epoch["images"].append(labels.shape[0])
            try:
                yield images, labels
            except GeneratorExit:  # the consumer stopped asking (--steps): stamped before `it` is torn down
                epoch["asks"].append(time.perf_counter())
                raise

    def images_per_second(self, warmup: int) -> float:
        images, seconds, seen = 0, 0.0, 0  # batches seen before this epoch
        for e in self.epochs:
            n = len(e["images"])
            end = e["asks"][n]  # the ask that found no batch, or the moment the asking stopped
            if seen >= warmup:  # a whole measured epoch, its iterator's start included
                start, counted = e["iter"], e["images"]
            elif seen + n > warmup:  # the epoch in which the warm-up ends
                start, counted = e["asks"][warmup - seen], e["images"][warmup - seen :]
            else:
                start = None
            if start is not None:
                images += sum(counted)
                seconds += end - start
            seen += n
        return images / seconds


class BackToBack:
    """A loader seen by the clock of a plain training loop that runs epochs back to back
    (``set_epoch``, ``for batch in loader``): one window from the ask for the first batch after
    ``warmup`` batches to the arrival of the last batch, so every epoch boundary inside it (the
    iterator's end and teardown, ``set_epoch``, the next iterator's start) is paid as the loop pays it.
    The iterator is an object, not a generator, so that the wrapped one is torn down exactly where the
    consumer drops it."""

    def __init__(self, loader, warmup: int):
        self.loader, self.warmup = loader, warmup
        self.batches, self.images, self.start, self.end = 0, 0, None, None

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return _Asking(self, iter(self.loader))

    def images_per_second(self) -> float:
        return self.images / (self.end - self.start)


class _Asking:
    def __init__(self, clock: BackToBack, it):
        self.clock, self.it = clock, it

    def __iter__(self):
        return self

    def __next__(self):
        c = self.clock
        if c.batches == c.warmup and c.start is None:
            c.start = time.perf_counter()
        images, labels = next(self.it)
        if c.start is not None:
            c.images += labels.shape[0]
            c.end = time.perf_counter()
        c.batches += 1
        return images, labels
