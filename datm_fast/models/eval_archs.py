"""Evaluation architectures for cross-architecture tables, as in MTT/DATM ``networks.py``.

Each class keeps upstream's attribute names and layer order, so ``parameters()`` order and
``state_dict()`` keys match upstream, and initialising from a generator seeded ``s`` reproduces,
draw for draw, a plain construction after ``torch.manual_seed(s)``.

All take ``(channels, num_classes, image_size)`` and an optional ``generator``; inputs are
``(N, channels, H, W)``, outputs ``(N, num_classes)``. Supported image sizes: 1-channel 28 px
(MNIST-like), 3-channel 32 px (CIFAR) and 64 px (Tiny ImageNet). Differences from upstream, none of
which changes a network upstream could build:

* Head sizes are computed from the real feature-map size, where upstream hard-codes them
  (``16*5*5``, ``192*4*4``, ``512``; ``ResNet_AP`` picks 3x3 or 4x4 by ``channel == 1``).
* For inputs larger than 32 px the first layer downsamples by 2, which is what DATM's ``*_Tiny``
  variants do for 64 px (LeNet/AlexNet: first conv stride 2; VGG: final 1x1 pooling stride 2;
  ResNet18/ResNet18BN: stem conv stride 2). ``ResNet18_AP``/``ResNet18BN_AP`` have no such variant
  upstream and don't get one here. MLP takes ``channels * H * W`` inputs.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ._init import build_module

__all__ = [
    "MLP",
    "LeNet",
    "AlexNet",
    "VGG",
    "VGG11",
    "VGG11BN",
    "ResNet",
    "ResNet18",
    "ResNet18BN",
    "ResNet18_AP",
    "ResNet18BN_AP",
]

ImageSize = Union[int, tuple[int, int]]


def _hw(arch: str, image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(int(v) >= 1 for v in image_size)):
        raise ValueError(f"{arch}: image_size must be an int or an (H, W) pair, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _check_positive(arch: str, **values: int) -> None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arch}: {k} must be an int >= 1, got {v!r}")


def _large(hw: tuple[int, int]) -> bool:
    """DATM's ``*_Tiny`` rule: inputs above 32 px are downsampled by 2 early."""
    return max(hw) > 32


def _conv_out(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _features_or_raise(arch: str, image_size: tuple[int, int], *dims: int) -> None:
    if any(d < 1 for d in dims):
        raise ValueError(f"{arch}: image_size {image_size} is too small (the feature map vanishes)")


def _norm2d(norm: str, c: int) -> nn.Module:
    """Upstream's choice in VGG/ResNet: GroupNorm(c, c) for 'instance', else BatchNorm2d(c)."""
    return nn.GroupNorm(c, c, affine=True) if norm == "instance" else nn.BatchNorm2d(c)


def _check_norm(arch: str, norm: str) -> str:
    aliases = {"instancenorm": "instance", "batchnorm": "batch"}
    n = aliases.get(norm, norm)
    if n not in ("instance", "batch"):
        raise ValueError(f"{arch}: norm must be 'instance' or 'batch', got {norm!r}")
    return n


# ----- MLP -------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Three linear layers, 128 hidden units, ReLU.

    Equivalent PyTorch code::

        x = x.flatten(1)                                   # (N, C*H*W)
        x = relu(fc_1(x)); x = relu(fc_2(x)); return fc_3(x)
    """

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        _check_positive("MLP", channels=channels, num_classes=num_classes)
        h, w = _hw("MLP", image_size)

        def build() -> None:
            self.fc_1 = nn.Linear(channels * h * w, 128)
            self.fc_2 = nn.Linear(128, 128)
            self.fc_3 = nn.Linear(128, num_classes)

        build_module(self, build, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.flatten(1)
        out = F.relu(self.fc_1(out))
        out = F.relu(self.fc_2(out))
        return self.fc_3(out)


# ----- LeNet -----------------------------------------------------------------------------------
class LeNet(nn.Module):
    """LeNet-5: conv5(6) relu maxpool, conv5(16) relu maxpool, fc 120, fc 84, fc num_classes.

    The first conv pads by 2 for 1-channel input (28 px -> 28 px, as upstream) and strides by 2 for
    inputs above 32 px (DATM ``LeNet_Tiny``).
    """

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        _check_positive("LeNet", channels=channels, num_classes=num_classes)
        hw = _hw("LeNet", image_size)
        pad, stride = (2 if channels == 1 else 0), (2 if _large(hw) else 1)
        h, w = ((_conv_out(n, 5, stride, pad) // 2 - 4) // 2 for n in hw)
        _features_or_raise("LeNet", hw, h, w)

        def build() -> None:
            self.features = nn.Sequential(
                nn.Conv2d(channels, 6, kernel_size=5, padding=pad, stride=stride),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.Conv2d(6, 16, kernel_size=5),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=2),
            )
            self.fc_1 = nn.Linear(16 * h * w, 120)
            self.fc_2 = nn.Linear(120, 84)
            self.fc_3 = nn.Linear(84, num_classes)

        build_module(self, build, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x).flatten(1)
        out = F.relu(self.fc_1(out))
        out = F.relu(self.fc_2(out))
        return self.fc_3(out)


# ----- AlexNet ---------------------------------------------------------------------------------
class AlexNet(nn.Module):
    """The small AlexNet of dataset condensation: 5 convs (128, 192, 256, 192, 192), 3 max pools, fc.

    The first conv (5x5) pads by 4 for 1-channel input (28 px -> 32 px) and by 2 otherwise, and
    strides by 2 for inputs above 32 px (DATM ``AlexNet_Tiny``).
    """

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        _check_positive("AlexNet", channels=channels, num_classes=num_classes)
        hw = _hw("AlexNet", image_size)
        pad, stride = (4 if channels == 1 else 2), (2 if _large(hw) else 1)
        h, w = (_conv_out(n, 5, stride, pad) // 2 // 2 // 2 for n in hw)
        _features_or_raise("AlexNet", hw, h, w)

        def build() -> None:
            self.features = nn.Sequential(
                nn.Conv2d(channels, 128, kernel_size=5, stride=stride, padding=pad),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.Conv2d(128, 192, kernel_size=5, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.Conv2d(192, 256, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(256, 192, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(192, 192, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=2),
            )
            self.fc = nn.Linear(192 * h * w, num_classes)

        build_module(self, build, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


# ----- VGG -------------------------------------------------------------------------------------
_VGG_CFG: MappingProxyType[str, tuple[Union[int, str], ...]] = MappingProxyType(
    {"VGG11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")}
)


class VGG(nn.Module):
    """VGG with a norm after every conv and a single linear head (upstream ``VGG``).

    Each conv is 3x3, padding 1 (3 on the first layer for 1-channel input: 28 px -> 32 px), followed
    by ``GroupNorm(c, c)`` (``norm="instance"``) or ``BatchNorm2d(c)`` (``norm="batch"``) and ReLU;
    "M" is a 2x2 max pool. The features end with ``AvgPool2d(1, stride)``, stride 2 above 32 px
    (DATM ``VGG11_Tiny``), else 1 (identity).
    """

    def __init__(
        self,
        vgg_name: str,
        channels: int,
        num_classes: int,
        image_size: ImageSize,
        norm: str = "instance",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if vgg_name not in _VGG_CFG:
            raise ValueError(f"VGG: vgg_name must be one of {sorted(_VGG_CFG)}, got {vgg_name!r}")
        _check_positive(vgg_name, channels=channels, num_classes=num_classes)
        norm = _check_norm(vgg_name, norm)
        hw = _hw(vgg_name, image_size)
        cfg = _VGG_CFG[vgg_name]
        final_stride = 2 if _large(hw) else 1
        h, w = hw
        if channels == 1:
            h, w = h + 4, w + 4  # padding 3 on the first 3x3 conv
        for v in cfg:
            if v == "M":
                h, w = h // 2, w // 2
        h, w = (h - 1) // final_stride + 1, (w - 1) // final_stride + 1
        _features_or_raise(vgg_name, hw, h, w)
        last = [v for v in cfg if v != "M"][-1]

        def build() -> None:
            layers: list[nn.Module] = []
            in_c = channels
            for ic, v in enumerate(cfg):
                if v == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    assert isinstance(v, int)
                    pad = 3 if channels == 1 and ic == 0 else 1
                    layers += [nn.Conv2d(in_c, v, kernel_size=3, padding=pad), _norm2d(norm, v), nn.ReLU(inplace=True)]
                    in_c = v
            layers.append(nn.AvgPool2d(kernel_size=1, stride=final_stride))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(int(last) * h * w, num_classes)

        build_module(self, build, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class VGG11(VGG):
    """VGG11 with instance norm (``GroupNorm(c, c)``), upstream's default ``VGG11``."""

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__("VGG11", channels, num_classes, image_size, norm="instance", generator=generator)


class VGG11BN(VGG):
    """VGG11 with ``BatchNorm2d``, upstream's ``VGG11BN``."""

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__("VGG11", channels, num_classes, image_size, norm="batch", generator=generator)


# ----- ResNet ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs without bias, norm after each, projection shortcut).

    With ``avg_pool_downsample`` (upstream ``BasicBlock_AP``) a strided block uses stride-1 convs
    followed by 2x2 average pooling instead of stride-2 convs.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, avg_pool_downsample: bool) -> None:
        super().__init__()
        self.stride = stride
        self.avg_pool_downsample = avg_pool_downsample
        conv_stride = 1 if avg_pool_downsample else stride
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            out = self.expansion * planes
            if avg_pool_downsample:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, out, kernel_size=1, stride=1, bias=False),
                    nn.AvgPool2d(kernel_size=2, stride=2),
                    _norm2d(norm, out),
                )
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, out, kernel_size=1, stride=stride, bias=False), _norm2d(norm, out)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.avg_pool_downsample and self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no max pool) with basic blocks, upstream ``ResNet``/``ResNet_AP``.

    Args:
        channels, num_classes, image_size: data shape.
        num_blocks: blocks per stage, ``(2, 2, 2, 2)`` for ResNet18.
        norm: ``"instance"`` (``GroupNorm(c, c)``) or ``"batch"`` (``BatchNorm2d``).
        avg_pool_downsample: upstream's ``_AP`` variant: downsample with 2x2 average pooling after
            stride-1 convs; the head sees the whole final map (no 4x4 pooling).
        generator: draw the initial parameters from it.

    Head: without ``avg_pool_downsample``, ``avg_pool2d(out, 4)`` then flatten (upstream; 512
    features for 28, 32 and, with the stride-2 stem of DATM's ``ResNet18_Tiny``, 64 px); with it,
    flatten of the final map (512*4*4 for 32 px, 512*3*3 for 28 px).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: ImageSize,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        norm: str = "instance",
        avg_pool_downsample: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        arch = "ResNet"
        _check_positive(arch, channels=channels, num_classes=num_classes)
        norm = _check_norm(arch, norm)
        hw = _hw(arch, image_size)
        stem_stride = 2 if _large(hw) and not avg_pool_downsample else 1
        h, w = (_conv_out(n, 3, stem_stride, 1) for n in hw)
        for _ in range(3):  # stages 2..4 halve the map
            if avg_pool_downsample:
                h, w = h // 2, w // 2
            else:
                h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        if not avg_pool_downsample:
            h, w = h // 4, w // 4  # F.avg_pool2d(out, 4)
        _features_or_raise(arch, hw, h, w)
        self.avg_pool_downsample = avg_pool_downsample

        def build() -> None:
            self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
            self.bn1 = _norm2d(norm, 64)
            in_planes = 64
            for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))):
                blocks = []
                for s in [stride] + [1] * (n - 1):
                    blocks.append(BasicBlock(in_planes, planes, s, norm, avg_pool_downsample))
                    in_planes = planes * BasicBlock.expansion
                self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.classifier = nn.Linear(in_planes * h * w, num_classes)

        build_module(self, build, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if not self.avg_pool_downsample:
            out = F.avg_pool2d(out, 4)
        return self.classifier(out.flatten(1))


class ResNet18(ResNet):
    """ResNet18 with instance norm (``GroupNorm(c, c)``), upstream ``ResNet18``."""

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(channels, num_classes, image_size, norm="instance", generator=generator)


class ResNet18BN(ResNet):
    """ResNet18 with ``BatchNorm2d``, upstream ``ResNet18BN``."""

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(channels, num_classes, image_size, norm="batch", generator=generator)


class ResNet18_AP(ResNet):  # noqa: N801 - upstream's name
    """ResNet18, average-pool downsampling, instance norm: upstream ``ResNet18_AP``."""

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(
            channels, num_classes, image_size, norm="instance", avg_pool_downsample=True, generator=generator
        )


class ResNet18BN_AP(ResNet):  # noqa: N801 - upstream's name
    """ResNet18, average-pool downsampling, ``BatchNorm2d``: upstream ``ResNet18BN_AP``."""

    def __init__(
        self, channels: int, num_classes: int, image_size: ImageSize, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(channels, num_classes, image_size, norm="batch", avg_pool_downsample=True, generator=generator)
