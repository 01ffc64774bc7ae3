"""Interchangeable data-loader backends behind one contract.

from loaders import build_loader
train = build_loader("torch", data="/data/imagenet/train", batch_size=256, train=True, num_workers=8)
for epoch in range(epochs):
    train.set_epoch(epoch)
    for images, labels in train:  # on the device, normalised, labels int64 [N]
        ...
"""

from .backend import Backend
from .contract import MEAN, STD, BadSampleError, LoaderConfig, LoaderError
from .registry import backends, build_loader, get_backend, register

__all__ = [
    "MEAN",
    "STD",
    "Backend",
    "BadSampleError",
    "LoaderConfig",
    "LoaderError",
    "backends",
    "build_loader",
    "get_backend",
    "register",
]
