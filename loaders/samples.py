"""One sample of an ImageFolder split by key ``(epoch, index)``, decoded and augmented: what a
DataLoader worker (the torch backend) or a Ray task (the ray backend) runs. Augmentation is seeded
per sample and epoch, so the same seed gives the same images whatever runs it; from a bucket a
batch's GETs go out together."""

from __future__ import annotations

from torch.utils.data import Dataset, Sampler

from . import objstore
from .gpudecode import encoded_sample
from .images import BadSample, sample


class Samples(Dataset):
    """Decodes and augments one sample. Keys are (epoch, index) so that augmentation is seeded
    per sample and epoch: the same seed gives the same images whatever the worker count."""

    def __init__(self, index, transform, seed: int, requests: int = 1, encoded: bool = False):
        self.paths, self.labels = index.paths, index.labels
        self.transform = transform
        self.make = encoded_sample if encoded else sample
        self.seed = seed
        self.remote = objstore.is_url(str(index.root))
        self.requests = requests
        self._pool = None  # (pid, thread pool): a forked worker starts its own

    def __getstate__(self):  # shipped to a Ray task: its own pool starts there
        return {**self.__dict__, "_pool": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        return self._sample(key, self._fetch(str(self.paths[key[1]])))

    def __getitems__(self, keys):
        """A batch's samples; from a bucket, its GETs go out together (``requests`` in flight): one
        at a time, each worker would wait a whole first-byte latency per image."""
        if not self.remote:
            return [self[k] for k in keys]
        import concurrent.futures
        import os

        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), concurrent.futures.ThreadPoolExecutor(self.requests))
        sources = self._pool[1].map(self._fetch, [str(self.paths[i]) for _, i in keys])
        return [self._sample(k, s) for k, s in zip(keys, sources)]

    def _fetch(self, path: str):
        if not self.remote:
            return path
        try:
            return objstore.get(path)
        except objstore.MissingObject as exc:  # as a missing file: the bad-sample policy decides
            return BadSample(path, str(exc))

    def _sample(self, key, source):
        epoch, i = key
        if isinstance(source, BadSample):
            return source
        path = str(self.paths[i])
        return self.make(self.transform, source, path, int(self.labels[i]), self.seed, epoch, int(i))


class EpochKeys(Sampler):
    """A loader's ``epoch_indices()`` as (epoch, index) keys, this epoch's: what the index-order
    backends' DataLoaders sample (``Samples`` and the streaming formats' ``Records`` take them)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.num_samples

    def __iter__(self):
        epoch = self.loader.epoch
        return ((epoch, int(i)) for i in self.loader.epoch_indices())
