"""The trainer: a minimal DDP + AMP loop over any iterable of ``(images, labels)``, and its models."""

from .loop import TrainConfig, TrainError, TrainResult, all_reduce_values, evaluate, measure, train
from .models import MODELS, build_model

__all__ = [
    "MODELS",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "all_reduce_values",
    "build_model",
    "evaluate",
    "measure",
    "train",
]
