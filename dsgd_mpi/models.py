"""Model zoo: a name -> constructor registry and ``build_model``.

Every constructor takes the same keyword arguments (``num_classes``,
``in_channels``, ``width``, ``image_size``) so the trainer can build any of
them from the config alone; ``resnet18`` also takes ``pretrained``. All
parameters are float32.

- ``resnet20``: the CIFAR ResNet-20 of He et al. (2016): a 3x3 conv with 16k
  channels, three stages of three BasicBlocks (16k, 32k, 64k channels, stride 2
  at the start of stages 2 and 3), BatchNorm, global average pooling and a
  linear classifier; k = ``width``. Shortcuts are option A (strided identity,
  zero-padded channels, no parameters) by default; ``shortcut="conv"`` gives
  1x1-conv + BN projections. ~0.27M parameters at width 1.
- ``resnet18``: torchvision's ImageNet ResNet-18 in the small-image form of
  Zhu et al. (2023), who train it on CIFAR-10 upsampled to 56x56 and on Tiny
  ImageNet: the 7x7 stem conv and the 3x3 max-pool keep their kernels but take
  stride 1 (so a 32x32 input reaches the last stage at 4x4, not 1x1), and the
  1000-way head is replaced by a fresh ``num_classes`` linear layer. Keeping the
  kernel shapes is what lets ``pretrained=True`` load torchvision's ImageNet
  weights (``ResNet18_Weights.IMAGENET1K_V1``; the papers start from them) into
  every layer but the head. Fixed width (``width`` must be 1); ~11.2M
  parameters for 10 classes. torchvision is imported only when one is built.
- ``small_cnn``: LeNet-like, cheap enough for several ranks on one CPU core:
  conv5x5(16k) - relu - maxpool2 - conv5x5(32k) - relu - maxpool2 -
  adaptive avg pool to 4x4 - linear. ~18k parameters at width 1 for 1x28x28
  inputs (the adaptive pool is the identity there; it makes 32x32 inputs work).
- ``mlp``: flatten - linear(256k) - relu - linear. The input size must be known
  at construction: ``image_size`` (side of a square image) defaults to 28 for
  one input channel and 32 otherwise, matching the datasets in ``data.py``.
"""

from __future__ import annotations

import os
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
        # Pool, then ReLU: they commute (ReLU is monotone), and ReLU then runs on a
        # quarter of the values. Pool in channels-last layout: torch's CPU max-pool
        # is ~10x faster there. The simulator's step on CPU: ~1.1x faster, with
        # the same values (to float rounding of conv2).
        x = F.relu(F.max_pool2d(_channels_last(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(_channels_last(self.conv2(x)), 2))
        return self.fc(self.pool(x).flatten(1))

    def forward_stacked(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward`` of N replicas at once (the simulator's fast mode).

        ``params[name]`` holds the N replicas' values (N, *shape), ``x`` their
        batches (N, B, C, H, W); returns logits (N, B, classes). The replicas'
        channels sit side by side in grouped convolutions (one group a replica)
        and one batched matmul: the step without ``vmap``'s per-operator
        dispatch, which dominates at small batches (4 replicas x 4 samples:
        ~1.5x faster).
        """
        n, b = x.shape[:2]

        def conv(x: torch.Tensor, name: str) -> torch.Tensor:
            w = params[f"{name}.weight"]
            bias = params[f"{name}.bias"].reshape(-1)
            return F.conv2d(x, w.reshape(-1, *w.shape[2:]), bias, groups=n)

        x = x.transpose(0, 1).flatten(1, 2)  # (B, N*C, H, W): replica-major channels
        x = F.relu(F.max_pool2d(_channels_last(conv(x, "conv1")), 2))
        x = F.relu(F.max_pool2d(_channels_last(conv(x, "conv2")), 2))
        x = self.pool(x).reshape(b, n, -1).transpose(0, 1)  # (N, B, C2 * 16)
        weight, bias = params["fc.weight"], params["fc.bias"]
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with channels-last strides; by permutes because ``vmap``
    (the simulator) refuses ``contiguous(memory_format=...)``."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


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


def _stem_weight_from_rgb(rgb: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained RGB stem filters [64, 3, k, k] for ``in_channels`` inputs.

    Three channels keep the filters. Otherwise every input channel gets the sum
    of the three RGB filters divided by ``in_channels``, so an image whose
    channels are all equal to a grey image g produces exactly the features the
    RGB network computes for (g, g, g): a grey MNIST digit (one channel) is seen
    as the pretrained network sees a grey photo. No colour meaning survives for
    in_channels != 3, and none is claimed.
    """
    if in_channels == 3:
        return rgb.clone()
    grey = rgb.sum(dim=1, keepdim=True) / in_channels
    return grey.expand(-1, in_channels, -1, -1).clone()


def resnet18(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 1,
    image_size: int | None = None,  # accepted for a uniform signature; size-agnostic
    pretrained: bool = False,
) -> nn.Module:
    """ResNet-18 in Zhu et al.'s small-image form (module docstring), optionally pretrained.

    ``pretrained=True`` needs torchvision's weight file: downloaded on first use
    into ``$TORCH_HOME/hub/checkpoints`` (network needed), read from there
    afterwards; a failure becomes a ``ValueError`` saying what to do. The new
    head is initialised as ``nn.Linear`` does by default, as in Zhu et al.
    """
    _check_common(num_classes, in_channels, width)
    if width != 1:
        raise ValueError(f"resnet18 has fixed channel widths: width must be 1, got {width}")
    import torchvision  # lazily: only runs that build this model pay for the import

    net = torchvision.models.resnet18(weights=None)
    if pretrained:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # offline, proxy, corrupt file: all need the same advice
            raise ValueError(
                f"resnet18: cannot load torchvision's ImageNet weights from {weights.url} "
                f"({type(err).__name__}: {err}). Pre-download the file into "
                f"{torch.hub.get_dir()}/checkpoints (set TORCH_HOME to choose the place) on a "
                "machine with network access, or set model.pretrained to false."
            ) from err
        net.load_state_dict(state)

    stem = nn.Conv2d(in_channels, 64, kernel_size=7, stride=1, padding=3, bias=False)
    with torch.no_grad():
        if pretrained:
            stem.weight.copy_(_stem_weight_from_rgb(net.conv1.weight, in_channels))
        else:  # torchvision's init for its convs; fan_out does not depend on in_channels
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    net.conv1 = stem
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def fetch_pretrained(name: str) -> str:
    """Put ``name``'s pretrained weight file in torch's cache unless it is there; "" on
    success, else what went wrong and what to do (no network here, a proxy, a bad file)."""
    if name not in PRETRAINED:
        return f"model {name!r} has no pretrained weights"
    import torchvision  # lazily, as in resnet18

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.isfile(path):
        return ""
    try:
        weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # offline, proxy, corrupt download: all need the same advice
        return (
            f"cannot download torchvision's ImageNet weights of {name} from {weights.url} "
            f"({type(err).__name__}: {err}). Put the file in {os.path.dirname(path)} (set "
            "TORCH_HOME to choose the place) from a machine with network access, or set "
            "model.pretrained=false"
        )
    return ""


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": ResNet20,
    "resnet18": resnet18,
    "small_cnn": SmallCNN,
    "mlp": MLP,
}
PRETRAINED = frozenset({"resnet18"})
"""Models whose constructor takes ``pretrained``."""


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    width: int = 1,
    image_size: int | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build a registered model with float32 parameters.

    ``image_size`` only matters for ``mlp`` (default: 28 for 1 channel, else 32).
    ``pretrained`` loads ImageNet weights into the models in ``PRETRAINED``
    (network or a pre-downloaded file needed) and is an error for the others.
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        valid = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; valid names: {valid}") from None
    extra = {}
    if pretrained:
        if name not in PRETRAINED:
            raise ValueError(
                f"model {name!r} has no pretrained weights; pretrained works for: "
                + ", ".join(sorted(PRETRAINED))
            )
        extra["pretrained"] = True
    model = ctor(
        num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size,
        **extra,
    )
    return model.to(torch.float32)
