"""A Lightning fit over ``LoaderDataModule`` that records the sample ids each rank saw, per epoch
(the probe images encode them in their colour). Run in-process by tests/test_lightning.py, and as
``torchrun --nproc-per-node 2 -m tests.lightning_fit BACKEND DATA OUT`` for its two-rank test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from loaders.lightning import LoaderDataModule

from .conftest import decode_ids


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        # BatchNorm's buffers make DDP broadcast in forward: uneven evaluation shards must not hang it.
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(4, 3)
        self.train_ids: list[list[int]] = []
        self.val_ids: list[list[int]] = []

    def forward(self, x):
        return self.head(self.net(x))

    def on_train_epoch_start(self):
        self.train_ids.append([])

    def training_step(self, batch, _):
        images, labels = batch
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        if not self.train_ids:  # a fit resumed mid-epoch starts without on_train_epoch_start
            self.train_ids.append([])
        self.train_ids[-1] += decode_ids(images)
        loss = torch.nn.functional.cross_entropy(self(images), labels)
        assert loss.dtype == torch.float32  # bf16-mixed: the logits are bf16 under autocast
        return loss

    def on_validation_epoch_start(self):
        if not self.trainer.sanity_checking:
            self.val_ids.append([])

    def validation_step(self, batch, _):
        images, labels = batch
        if not self.trainer.sanity_checking:
            self.val_ids[-1] += decode_ids(images)
        self.log("val_loss", torch.nn.functional.cross_entropy(self(images), labels), sync_dist=True)

    def on_validation_epoch_end(self):
        # Counts down to 0 at the second epoch: EarlyStopping's threshold stops the fit there.
        self.log("epochs_left", 1.0 - self.current_epoch, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(backend: str, data: Path, devices: int = 1, **options) -> Recorder:
    model = Recorder()
    dm = LoaderDataModule(backend, data / "train", data / "val", batch_size=4, image_size=16, **options)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="bf16-mixed",
        max_epochs=5,
        callbacks=[EarlyStopping("epochs_left", mode="min", stopping_threshold=0.5, patience=5)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, dm)
    return model


if __name__ == "__main__":
    backend, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    model = fit(backend, data, devices=2, num_workers=0)
    rank = model.trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({"train": model.train_ids, "val": model.val_ids}))
    # Lightning's last collectives and FFCV's pipeline thread can abort the rank in the
    # interpreter's teardown: see loaders.launch.exit_now.
    from loaders.launch import exit_now

    exit_now(0)
