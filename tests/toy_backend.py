"""A toy backend: PIL decode in a thread pool of the main process, a few batches ahead. It proves
that a backend plugs in with its own module and one registry line: tests/conftest.py names it in
LOADERBENCH_BACKENDS, and then the conformance suite, `bench run`, `bench tune` and `bench sweep`
take it like any other (no edit anywhere else)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loaders.backend import Backend
from loaders.contract import BaseLoader, LoaderError, rank_share, scan_imagefolder
from loaders.feed import DeviceFeed
from loaders.images import collate_checked, sample, transform_for


@dataclass(frozen=True)
class Options:
    threads: int = 1
    ahead: int = 2  # batches in flight


class ToyBackend(Backend):
    name = "toy"
    summary = "a test backend: PIL decode in a thread pool of the main process"
    Options = Options
    knobs = {"workers": "threads", "prefetch": "ahead"}
    min_workers = 1
    prefetch_values = (1, 2)

    def build(self, cfg, opts):
        if opts.threads < 1 or opts.ahead < 1:
            raise LoaderError(f"toy threads and ahead must be >= 1, got {opts.threads} and {opts.ahead}")
        if cfg.data is None:
            raise LoaderError("the toy backend needs data= (an ImageFolder split folder)")
        return ToyLoader(cfg, opts, scan_imagefolder(cfg.data))


class ToyLoader(BaseLoader):
    name = "toy"
    index_order = True  # reads epoch_indices(): loader.sampler iterates them

    def __init__(self, cfg, opts, index):
        super().__init__(cfg, *rank_share(len(index), cfg, cfg.data), index.classes, split_size=len(index))
        self.options, self.index = opts, index
        self._transform = transform_for(cfg, float_in_workers=False)
        self._feed = DeviceFeed(cfg, device_normalize=True, non_blocking=False)

    def _sample(self, i):
        path, cfg = str(self.index.paths[i]), self.config
        return sample(self._transform, path, path, int(self.index.labels[i]), cfg.seed, self.epoch, int(i))

    def _batches(self):
        cfg = self.config
        order = self.epoch_indices()
        stop = len(order) - len(order) % cfg.batch_size if cfg.drop_last else len(order)
        with ThreadPoolExecutor(self.options.threads) as pool:
            pending = []
            for k in range(0, stop, cfg.batch_size):
                pending.append([pool.submit(self._sample, i) for i in order[k : k + cfg.batch_size]])
                if len(pending) > self.options.ahead:
                    yield from self._collate(pending.pop(0))
            for futures in pending:
                yield from self._collate(futures)

    def _collate(self, futures):
        images, labels, bad = collate_checked([f.result() for f in futures])
        self._skip_or_raise(bad, batch_empty=images is None)
        if images is not None:
            yield images, labels

    def _epoch_batches(self):
        return self._feed(self._batches())
