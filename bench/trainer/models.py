"""Models the harness trains: torchvision ResNets (random init) and a CNN small enough for a CPU."""

from __future__ import annotations

from torch import nn


def small_cnn(num_classes: int) -> nn.Module:
    """~0.2 GFLOP per training image at 224 px: cheap enough that on a 2-core CPU the input
    pipeline, not the model, decides the step time, as on a fast GPU."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        nn.Conv2d(3, 24, 4, 4, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU(inplace=True),  # patchify stem
        *block(24, 48, 2),
        *block(48, 96, 2),
        *block(96, 192, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(192, num_classes),
    )


MODELS = {
    "small": small_cnn,
    "resnet18": lambda n: __import__("torchvision").models.resnet18(num_classes=n),
    "resnet50": lambda n: __import__("torchvision").models.resnet50(num_classes=n),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](num_classes)
