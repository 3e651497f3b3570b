"""Model zoo: a name -> constructor registry and ``build_model``.

Every constructor takes the same keyword arguments (``num_classes``,
``in_channels``, ``width``, ``image_size``) so the trainer can build any of
them from the config alone. All parameters are float32.

- ``resnet20``: the CIFAR ResNet-20 of He et al. (2016): a 3x3 conv with 16k
  channels, three stages of three BasicBlocks (16k, 32k, 64k channels, stride 2
  at the start of stages 2 and 3), BatchNorm, global average pooling and a
  linear classifier; k = ``width``. Shortcuts are option A (strided identity,
  zero-padded channels, no parameters) by default; ``shortcut="conv"`` gives
  1x1-conv + BN projections. ~0.27M parameters at width 1.
- ``small_cnn``: LeNet-like, cheap enough for several ranks on one CPU core:
  conv5x5(16k) - relu - maxpool2 - conv5x5(32k) - relu - maxpool2 -
  adaptive avg pool to 4x4 - linear. ~18k parameters at width 1 for 1x28x28
  inputs (the adaptive pool is the identity there; it makes 32x32 inputs work).
- ``mlp``: flatten - linear(256k) - relu - linear. The input size must be known
  at construction: ``image_size`` (side of a square image) defaults to 28 for
  one input channel and 32 otherwise, matching the datasets in ``data.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _check_common(num_classes: int, in_channels: int, width: int) -> None:
    for key, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("width", width),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.lo = extra_channels // 2
        self.hi = extra_channels - self.lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.lo, self.hi))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(planes - in_planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 1,
        image_size: int | None = None,  # accepted for a uniform signature; size-agnostic
        shortcut: str = "A",
        blocks_per_stage: int = 3,
    ) -> None:
        super().__init__()
        _check_common(num_classes, in_channels, width)
        if shortcut not in ("A", "conv"):
            raise ValueError(f"shortcut must be 'A' or 'conv', got {shortcut!r}")
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class SmallCNN(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 1,
        image_size: int | None = None,  # accepted for a uniform signature; size-agnostic
    ) -> None:
        super().__init__()
        _check_common(num_classes, in_channels, width)
        c1, c2 = 16 * width, 32 * width
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(c2 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.pool(x).flatten(1))


class MLP(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 1,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_common(num_classes, in_channels, width)
        if image_size is None:
            image_size = 28 if in_channels == 1 else 32
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.in_features = in_channels * image_size * image_size
        self.fc1 = nn.Linear(self.in_features, 256 * width)
        self.fc2 = nn.Linear(256 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"mlp was built for {self.in_features} input features, got {x.shape[1]} "
                "(pass image_size to build_model)"
            )
        return self.fc2(F.relu(self.fc1(x)))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": ResNet20,
    "small_cnn": SmallCNN,
    "mlp": MLP,
}


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    width: int = 1,
    image_size: int | None = None,
) -> nn.Module:
    """Build a registered model with float32 parameters.

    ``image_size`` only matters for ``mlp`` (default: 28 for 1 channel, else 32).
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        valid = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; valid names: {valid}") from None
    model = ctor(
        num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size
    )
    return model.to(torch.float32)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
