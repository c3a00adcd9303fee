"""Build networks by upstream MTT/DATM name (``utils.get_network``), without touching the global RNG.

ConvNet names: ``ConvNet`` (width 128, depth 3, instance norm, ReLU, average pooling) and its
one-change ablations: ``ConvNetD1``..``ConvNetD8`` (depth; ``ConvNetD4`` is the Tiny ImageNet 64 px
network), ``ConvNetD4BN``, ``ConvNetW32``..``ConvNetW1024`` (width), ``ConvNetKIP`` (width 1024, no
norm), ``ConvNetAS``/``AR``/``AL`` (sigmoid / ReLU / leaky ReLU), ``ConvNetNN``/``BN``/``LN``/``IN``/``GN``
(norm), ``ConvNetNP``/``MP``/``AP`` (pooling). Evaluation architectures: ``MLP``, ``LeNet``,
``AlexNet``, ``VGG11``, ``VGG11BN``, ``ResNet18``, ``ResNet18BN``, ``ResNet18_AP``, ``ResNet18BN_AP``,
and DATM's ``*_Tiny`` names, which here are aliases (the image size picks the 64 px variant).

Unlike upstream, every name gets the real image size (upstream forgets ``im_size`` for the
width/activation/norm/pooling ablations, which then only work at 32 px) and ``get_network`` never
reseeds the global RNG (upstream seeds it from the wall clock on every call).
"""

from __future__ import annotations

import difflib
from types import MappingProxyType
from typing import Any, Callable, Union

import torch
from torch import nn

from .convnet import ConvNet, ConvNetSpec
from .eval_archs import MLP, VGG11, VGG11BN, AlexNet, LeNet, ResNet18, ResNet18_AP, ResNet18BN, ResNet18BN_AP

__all__ = [
    "EVAL_POOLS",
    "get_network",
    "convnet_spec_from_name",
    "network_names",
    "convnet_names",
    "default_convnet_name",
]

#: Upstream's ``get_eval_pool`` modes: a name for each cross-architecture or ablation pool of networks.
EVAL_POOLS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "M": ("ConvNet", "AlexNet", "VGG11", "ResNet18"),  # multiple architectures (DATM's table)
        "W": ("ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"),  # width
        "D": ("ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"),  # depth
        "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL"),  # activation
        "P": ("ConvNetNP", "ConvNetMP", "ConvNetAP"),  # pooling
        "N": ("ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"),  # normalisation
        "BN": ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "AlexNet", "VGG11", "ResNet18_AP"),
    }
)

ImageSize = Union[int, tuple[int, int]]


def _convnet_variants() -> MappingProxyType[str, MappingProxyType[str, Any]]:
    """name -> the ConvNetSpec fields that differ from the default ConvNet (read-only)."""
    v: dict[str, dict[str, Any]] = {"ConvNet": {}}
    v.update({f"ConvNetD{d}": {"depth": d} for d in range(1, 9)})
    v["ConvNetD4BN"] = {"depth": 4, "norm": "batch"}
    v.update({f"ConvNetW{w}": {"width": w} for w in (32, 64, 128, 256, 512, 1024)})
    v["ConvNetKIP"] = {"width": 1024, "norm": "none"}
    v.update(
        {
            "ConvNetAS": {"activation": "sigmoid"},
            "ConvNetAR": {"activation": "relu"},
            "ConvNetAL": {"activation": "leakyrelu"},
            "ConvNetNN": {"norm": "none"},
            "ConvNetBN": {"norm": "batch"},
            "ConvNetLN": {"norm": "layer"},
            "ConvNetIN": {"norm": "instance"},
            "ConvNetGN": {"norm": "group"},
            "ConvNetNP": {"pooling": "none"},
            "ConvNetMP": {"pooling": "max"},
            "ConvNetAP": {"pooling": "avg"},
        }
    )
    return MappingProxyType({k: MappingProxyType(c) for k, c in v.items()})


_CONVNETS = _convnet_variants()

_Factory = Callable[..., nn.Module]
_EVAL_ARCHS: MappingProxyType[str, _Factory] = MappingProxyType(
    {
        "MLP": MLP,
        "LeNet": LeNet,
        "AlexNet": AlexNet,
        "VGG11": VGG11,
        "VGG11BN": VGG11BN,
        "ResNet18": ResNet18,
        "ResNet18BN": ResNet18BN,
        "ResNet18_AP": ResNet18_AP,
        "ResNet18BN_AP": ResNet18BN_AP,
        # DATM's 64 px variants: our classes pick them from the image size.
        "MLP_Tiny": MLP,
        "LeNet_Tiny": LeNet,
        "AlexNet_Tiny": AlexNet,
        "VGG11_Tiny": VGG11,
        "ResNet18_Tiny": ResNet18,
        "ResNet18BN_Tiny": ResNet18BN,
    }
)


def convnet_names() -> tuple[str, ...]:
    """Every upstream ConvNet name understood by :func:`convnet_spec_from_name`."""
    return tuple(_CONVNETS)


def network_names() -> tuple[str, ...]:
    """Every name understood by :func:`get_network`."""
    return tuple(_CONVNETS) + tuple(_EVAL_ARCHS)


def default_convnet_name(image_size: ImageSize) -> str:
    """The ConvNet upstream distils with at this size: ``ConvNetD4`` for 64 px, else ``ConvNet``."""
    h = image_size if isinstance(image_size, int) else max(image_size)
    return "ConvNetD4" if h == 64 else "ConvNet"


def _unknown(name: object, valid: tuple[str, ...], what: str) -> ValueError:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {what} {name!r}.{hint} Valid names: {', '.join(valid)}")


def convnet_spec_from_name(name: str, channels: int, num_classes: int, image_size: ImageSize) -> ConvNetSpec:
    """The :class:`ConvNetSpec` of an upstream ConvNet name, e.g. ``"ConvNetD4"`` or ``"ConvNetBN"``.

    Raises ``ValueError`` (listing the valid names, suggesting the closest) for any other name,
    including evaluation architectures, which have no spec.

    Equivalent upstream code::

        utils.get_network(name, channels, num_classes, im_size)   # for the ConvNet names
    """
    if name not in _CONVNETS:
        raise _unknown(name, convnet_names(), "ConvNet name")
    return ConvNetSpec(channels=channels, num_classes=num_classes, image_size=image_size, **_CONVNETS[name])


def get_network(
    name: str,
    channels: int,
    num_classes: int,
    image_size: ImageSize,
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build the network upstream calls ``name``, initialised from ``generator``.

    Args:
        name: an upstream name (see :func:`network_names`).
        channels, num_classes, image_size: data shape (image_size an int or an (H, W) pair).
        generator: initial parameters are drawn from it (PyTorch's default init); without one,
            PyTorch's global generator is used as the layer constructors use it. The global RNG is
            never reseeded.

    Returns an ``nn.Module`` on ``generator.device`` (CPU without a generator) in training mode:
    a :class:`ConvNet` for ConvNet names, else an evaluation architecture. ``ValueError`` for an
    unknown name, listing the valid ones and suggesting the closest.

    Equivalent upstream code::

        utils.get_network(name, channels, num_classes, im_size, dist=False)  # minus the reseeding
    """
    if name in _CONVNETS:
        return ConvNet(convnet_spec_from_name(name, channels, num_classes, image_size), generator=generator)
    if name in _EVAL_ARCHS:
        return _EVAL_ARCHS[name](channels, num_classes, image_size, generator=generator)
    raise _unknown(name, network_names(), "network name")
