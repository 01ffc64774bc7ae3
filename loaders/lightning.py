"""A LightningDataModule over any backend (extra ``lightning``).

    dm = LoaderDataModule("dali", train="/data/imagenet/train", val="/data/imagenet/val",
                          batch_size=256, num_workers=8)
    Trainer(precision="bf16-mixed", strategy="ddp", callbacks=[EarlyStopping("val_loss")]).fit(model, dm)

The loaders are built in ``setup()``, once Lightning knows the rank, the world size and the device,
and keep the contract's sharding: Lightning only adds its DistributedSampler to a
``torch.utils.data.DataLoader``, which these loaders are not, and its per-epoch
``sampler.set_epoch(epoch)`` reaches them through ``loader.sampler``. Batches arrive on the
device already; Lightning's transfer is then a no-op. Mixed precision is Lightning's business:
the loaders hand fp32 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "loaders.lightning needs Lightning: pip install 'loaderbench[lightning]' (lightning>=2.2)"
    ) from exc

from .registry import build_loader, get_backend


class LoaderDataModule(pl.LightningDataModule):
    """Training and validation loaders of backend ``loader`` over the splits ``train`` and ``val``
    (folders, a backend's stored format, or ``s3://`` URLs, as ``build_loader`` reads them; ``None``
    for the synthetic backend). ``**options`` are the backend's own (``num_workers`` for every
    backend)."""

    def __init__(
        self,
        loader: str,
        train: str | Path | None,
        val: str | Path | None = None,
        *,
        batch_size: int,
        image_size: int = 224,
        dtype: torch.dtype | str = torch.float32,
        channels_last: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        on_bad_sample: str = "stop",
        **options,
    ):
        super().__init__()
        get_backend(loader).options(**options)  # a wrong name or option fails here, not in setup()
        self.loader, self.train_data, self.val_data = loader, train, val
        self.common = dict(
            batch_size=batch_size,
            image_size=image_size,
            dtype=dtype,
            channels_last=channels_last,
            seed=seed,
            on_bad_sample=on_bad_sample,
        )
        self.drop_last, self.options = drop_last, options
        self._loaders: dict[str, object] = {}

    def _build(self, split: str):
        if split not in self._loaders:
            trainer = self.trainer
            where = dict(rank=None, world_size=None, device=None)  # no trainer: the process group or env
            if trainer is not None:
                where = dict(
                    rank=trainer.global_rank,
                    world_size=trainer.world_size,
                    device=trainer.strategy.root_device,
                )
            train = split == "train"
            self._loaders[split] = build_loader(
                self.loader,
                self.train_data if train else self.val_data,
                train=train,
                drop_last=self.drop_last and train,
                **where,
                **self.common,
                **self.options,
            )
        return self._loaders[split]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._build("train")
        if stage in ("fit", "validate") and self.val_data is not None:
            self._build("val")

    def train_dataloader(self):
        return self._build("train")

    def val_dataloader(self):
        return self._build("val") if self.val_data is not None else []

    def teardown(self, stage: str) -> None:
        for loader in self._loaders.values():
            loader.close()
        self._loaders.clear()
