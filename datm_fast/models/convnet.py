"""The ConvNet of trajectory matching (MTT / DATM), as a spec, a functional form and a module.

Upstream (MTT ``networks.py``, copied unchanged into DATM) builds, for ``depth`` layers::

    Conv2d(c_in, width, 3, padding=3 if channels == 1 and d == 0 else 1)
    [norm]          # GroupNorm(width, width) "instancenorm", BatchNorm2d, LayerNorm((C, H, W)),
                    # GroupNorm(4, width), or nothing
    activation      # ReLU, LeakyReLU(0.01) or Sigmoid
    [pool]          # AvgPool2d(2, 2) or MaxPool2d(2, 2), or nothing

then ``Linear(C * H * W, num_classes)`` on the (C, H, W)-flattened feature map. Its ``parameters()``
are, per layer, conv weight, conv bias, norm weight, norm bias (no norm parameters for ``none``),
then head weight, head bias. Expert buffers written by upstream are lists of tensors in exactly
that order; :class:`ConvNet` has the same module tree (``features.<i>`` / ``classifier``), so its
``parameters()`` and ``state_dict()`` keys match upstream's and those buffers load unchanged.

The distillation engine does not use the module: it uses :func:`convnet_forward`, which evaluates
the same network from ONE flat parameter vector (views into it, no copies), is differentiable with
respect to both the parameters and the input, supports double backward (``create_graph=True``,
needed to differentiate through unrolled SGD steps) and float64.

Feature sizes: the first conv pads by 3 for 1-channel input, so 28 px MNIST-like images become
32 px, as upstream. We compute every spatial size from the real padding instead of upstream's
"28 means 32" rule; the two agree wherever upstream works (1-channel 28 px, 3-channel any size) and
ours also works where upstream's head would have the wrong size (e.g. 3-channel 28 px).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import conv2d, norm_relu_pool
from ._init import build_module, init_bias_, init_weight_

__all__ = [
    "ConvNetSpec",
    "BlockShape",
    "LayerParams",
    "ParamInfo",
    "apply_activation",
    "apply_pooling",
    "ConvNet",
    "convnet_apply",
    "convnet_forward",
    "init_flat_params",
    "unflatten_params",
    "flatten_params",
    "NORMS",
    "ACTIVATIONS",
    "POOLINGS",
]

NORMS: tuple[str, ...] = ("instance", "batch", "layer", "group", "none")
ACTIVATIONS: tuple[str, ...] = ("relu", "leakyrelu", "sigmoid")
POOLINGS: tuple[str, ...] = ("avg", "max", "none")

# Upstream spellings (get_default_convnet_setting / _get_normlayer) accepted as aliases.
_NORM_ALIASES = MappingProxyType(
    {"instancenorm": "instance", "batchnorm": "batch", "layernorm": "layer", "groupnorm": "group"}
)
_ACT_ALIASES = MappingProxyType({"leaky_relu": "leakyrelu"})
_POOL_ALIASES = MappingProxyType({"avgpooling": "avg", "maxpooling": "max"})

NORM_EPS = 1e-5  # every upstream norm layer uses PyTorch's default eps
LEAKY_SLOPE = 0.01
GROUPNORM_GROUPS = 4  # upstream "groupnorm" is GroupNorm(4, C)


class ParamInfo(NamedTuple):
    """One parameter tensor of a :class:`ConvNetSpec` (see ``ConvNetSpec.params``)."""

    name: str  # upstream state_dict key, e.g. "features.0.weight"
    shape: torch.Size
    kind: str  # "conv_weight", "conv_bias", "norm_weight", "norm_bias", "linear_weight", "linear_bias"
    offset: int  # start in the flat vector
    weight_shape: torch.Size  # for biases: the shape of the layer's weight (gives fan_in); else shape

    @property
    def numel(self) -> int:
        return self.shape.numel()


class LayerParams(NamedTuple):
    """Where one conv block's parameters are in the parameter list (indices into ``ConvNetSpec.params``)."""

    conv_weight: int
    conv_bias: int
    norm_weight: int | None  # None without a norm (or its affine parameters)
    norm_bias: int | None


class BlockShape(NamedTuple):
    """Shapes of one conv block of a :class:`ConvNetSpec` (see ``ConvNetSpec.layers``)."""

    in_channels: int
    padding: int
    conv_shape: tuple[int, int, int]  # (C, H, W) after the conv (= norm's input shape)
    out_shape: tuple[int, int, int]  # (C, H, W) after the pooling


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"ConvNetSpec.{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(name: str, value: object, allowed: tuple[str, ...], aliases: Mapping[str, str]) -> str:
    if isinstance(value, str):
        v = value.strip().lower()
        v = aliases.get(v, v)
        if v in allowed:
            return v
    hint = f" (upstream spellings {', '.join(map(repr, aliases))} are accepted too)" if aliases else ""
    raise ValueError(f"ConvNetSpec.{name} must be one of {', '.join(map(repr, allowed))}{hint}; got {value!r}")


def _image_hw(value: object) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, (tuple, list, torch.Size))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"ConvNetSpec.image_size must be an int >= 1 or a pair (H, W) of them, got {value!r}")


@dataclass(frozen=True)
class ConvNetSpec:
    """The architecture of one ConvNet: everything needed to build it, init it and run it.

    Args:
        channels: input channels (1 for MNIST-like data, 3 for CIFAR/Tiny).
        num_classes: output logits.
        image_size: input height/width, an int or an (H, W) pair; stored as (H, W).
        width: channels of every conv layer (upstream ``net_width``, default 128).
        depth: number of conv blocks (upstream ``net_depth``; 3, and 4 for 64 px Tiny ImageNet,
            which upstream names ``ConvNetD4``).
        norm: ``"instance"`` (GroupNorm(width, width), affine), ``"batch"`` (BatchNorm2d),
            ``"layer"`` (LayerNorm over (C, H, W), elementwise affine), ``"group"``
            (GroupNorm(4, width)) or ``"none"``. Upstream's ``"instancenorm"`` etc. are accepted.
        activation: ``"relu"``, ``"leakyrelu"`` (slope 0.01) or ``"sigmoid"``.
        pooling: ``"avg"``, ``"max"`` (2x2, stride 2) or ``"none"``. ``"avgpooling"`` etc. accepted.

    Raises ``ValueError`` naming the bad field and the allowed values, and when the network
    cannot be built (feature map pooled down to nothing, group norm on a width not divisible by 4).

    Example::

        spec = ConvNetSpec(channels=3, num_classes=10, image_size=32)   # MTT/DATM's CIFAR ConvNet
        spec.num_params                    # 320010
        spec.feature_shape                 # (128, 4, 4)
        flat = init_flat_params(spec, torch.Generator().manual_seed(0))
        logits = convnet_forward(spec, flat, images)                    # (N, 10)
    """

    channels: int
    num_classes: int
    image_size: Union[int, tuple[int, int]]
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    activation: str = "relu"
    pooling: str = "avg"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "channels", _check_int("channels", self.channels))
        set_(self, "num_classes", _check_int("num_classes", self.num_classes))
        set_(self, "image_size", _image_hw(self.image_size))
        set_(self, "width", _check_int("width", self.width))
        set_(self, "depth", _check_int("depth", self.depth))
        set_(self, "norm", _check_choice("norm", self.norm, NORMS, _NORM_ALIASES))
        set_(self, "activation", _check_choice("activation", self.activation, ACTIVATIONS, _ACT_ALIASES))
        set_(self, "pooling", _check_choice("pooling", self.pooling, POOLINGS, _POOL_ALIASES))
        if self.norm == "group" and self.width % GROUPNORM_GROUPS != 0:
            raise ValueError(
                f"ConvNetSpec.width must be divisible by {GROUPNORM_GROUPS} for norm 'group' "
                f"(GroupNorm({GROUPNORM_GROUPS}, width)), got width={self.width}"
            )
        _, h, w = self.feature_shape  # computes the layers; raises if the map vanishes
        if h < 1 or w < 1:
            raise ValueError(
                f"ConvNetSpec: image_size {self.image_size} is too small for depth {self.depth} with "
                f"pooling {self.pooling!r}: the feature map would be {h}x{w}"
            )

    # cached_property stores into the instance __dict__ directly, which a frozen dataclass allows.
    # ----- shapes ------------------------------------------------------------------------------
    @cached_property
    def layers(self) -> tuple[BlockShape, ...]:
        """Per conv block: input channels, conv padding, (C, H, W) after the conv and after pooling."""
        out = []
        c, (h, w) = self.channels, self.image_size
        for d in range(self.depth):
            pad = 3 if self.channels == 1 and d == 0 else 1
            h, w = h + 2 * pad - 2, w + 2 * pad - 2  # 3x3 kernel, stride 1
            conv_shape = (self.width, h, w)
            if self.pooling != "none":
                h, w = h // 2, w // 2  # 2x2 window, stride 2, floor (as nn.AvgPool2d/MaxPool2d)
            out.append(BlockShape(c, pad, conv_shape, (self.width, h, w)))
            c = self.width
        return tuple(out)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the feature map the linear head sees."""
        return self.layers[-1].out_shape

    @property
    def num_features(self) -> int:
        """C * H * W: the head's in_features."""
        c, h, w = self.feature_shape
        return c * h * w

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        return (self.channels, *self.image_size)

    @property
    def norm_relu_pool_blocks(self) -> bool:
        """Whether every block is instance norm -> ReLU -> 2x2 average pool (upstream's default ConvNet):
        the blocks :func:`datm_fast.ops.norm_relu_pool` computes as one fused op."""
        return (self.norm, self.activation, self.pooling) == ("instance", "relu", "avg")

    @cached_property
    def params(self) -> tuple[ParamInfo, ...]:
        """Every parameter tensor in upstream ``parameters()`` order: name, shape, kind, flat offset."""
        params: list[ParamInfo] = []
        offset = 0

        def add(name: str, shape: tuple[int, ...], kind: str, weight_shape: tuple[int, ...] | None = None) -> None:
            nonlocal offset
            s = torch.Size(shape)
            params.append(ParamInfo(name, s, kind, offset, torch.Size(weight_shape or shape)))
            offset += s.numel()

        idx = 0  # index inside upstream's nn.Sequential `features`
        for layer in self.layers:
            wshape = (self.width, layer.in_channels, 3, 3)
            add(f"features.{idx}.weight", wshape, "conv_weight")
            add(f"features.{idx}.bias", (self.width,), "conv_bias", wshape)
            idx += 1
            if self.norm != "none":
                nshape = layer.conv_shape if self.norm == "layer" else (self.width,)
                add(f"features.{idx}.weight", nshape, "norm_weight")
                add(f"features.{idx}.bias", nshape, "norm_bias")
                idx += 1
            idx += 1  # activation
            if self.pooling != "none":
                idx += 1
        hshape = (self.num_classes, self.num_features)
        add("classifier.weight", hshape, "linear_weight")
        add("classifier.bias", (self.num_classes,), "linear_bias", hshape)
        return tuple(params)

    @cached_property
    def layer_params(self) -> tuple[LayerParams, ...]:
        """Per conv block, the indices of its conv weight and bias and norm weight and bias in :attr:`params`."""
        out, i = [], 0
        has_norm = self.norm != "none"
        for _ in self.layers:
            out.append(LayerParams(i, i + 1, i + 2 if has_norm else None, i + 3 if has_norm else None))
            i += 4 if has_norm else 2
        return tuple(out)

    @property
    def head_params(self) -> tuple[int, int]:
        """Indices of the linear head's weight and bias in :attr:`params` (the last two)."""
        return len(self.params) - 2, len(self.params) - 1

    def param_shapes(self) -> list[tuple[str, torch.Size]]:
        """(name, shape) of every parameter in upstream ``parameters()`` order.

        Names are upstream's ``state_dict`` keys (``features.0.weight``, ..., ``classifier.bias``).
        """
        return [(p.name, p.shape) for p in self.params]

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        last = self.params[-1]
        return last.offset + last.shape.numel()

    def replace(self, **changes: object) -> ConvNetSpec:
        """A copy with some fields changed (``dataclasses.replace``), validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# ----- flat parameters -------------------------------------------------------------------------
def _check_flat(spec: ConvNetSpec, flat: torch.Tensor) -> None:
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"flat parameters must be a torch.Tensor, got {type(flat).__name__}")
    if flat.dim() != 1 or flat.shape[0] != spec.num_params:
        raise ValueError(f"flat parameters must have shape ({spec.num_params},) for {spec}, got {tuple(flat.shape)}")


def unflatten_params(spec: ConvNetSpec, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``flat`` (shape ``(spec.num_params,)``), one per parameter, in ``parameters()`` order.

    The views share ``flat``'s storage (no copies) and carry its autograd history, so gradients of
    anything computed from them flow back into ``flat``.

    Equivalent PyTorch code::

        out, i = [], 0
        for _, shape in spec.param_shapes():
            out.append(flat[i : i + shape.numel()].view(shape)); i += shape.numel()
    """
    _check_flat(spec, flat)
    return [flat.narrow(0, p.offset, p.shape.numel()).view(p.shape) for p in spec.params]


def flatten_params(module_or_list: Union[nn.Module, Iterable[torch.Tensor]]) -> torch.Tensor:
    """Concatenate parameters (a module's ``parameters()``, or a list of tensors) into one 1-D tensor.

    This is a new tensor (a copy), differentiable with respect to the inputs; ``.detach()`` it for a
    snapshot. Upstream expert buffers (one list of tensors per epoch) flatten the same way.

    Equivalent PyTorch code::

        torch.cat([p.reshape(-1) for p in module.parameters()])
    """
    tensors = list(module_or_list.parameters() if isinstance(module_or_list, nn.Module) else module_or_list)
    if not tensors:
        raise ValueError("flatten_params: no parameters to flatten")
    return torch.cat([t.reshape(-1) for t in tensors])


def init_flat_params(
    spec: ConvNetSpec,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """A fresh flat parameter vector, initialised as PyTorch initialises the upstream ConvNet.

    Conv and linear weights: ``kaiming_uniform_(a=sqrt(5))``; their biases:
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; norm weights 1 and biases 0. The draws are made in
    ``parameters()`` order from ``generator`` (default: PyTorch's global generator, which is consumed
    but never reseeded), so with a generator seeded ``s`` the result equals, bit for bit, the
    parameters of the upstream network built after ``torch.manual_seed(s)`` (for float32 on CPU).

    ``device`` defaults to ``generator.device`` (CPU without a generator).
    Returns a tensor of shape ``(spec.num_params,)``, ``requires_grad=False``.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    flat = torch.empty(spec.num_params, dtype=dtype, device=device)
    for p, view in zip(spec.params, unflatten_params(spec, flat)):
        if p.kind in ("conv_weight", "linear_weight"):
            init_weight_(view, generator)
        elif p.kind in ("conv_bias", "linear_bias"):
            init_bias_(view, p.weight_shape, generator)
        elif p.kind == "norm_weight":
            view.fill_(1.0)
        else:
            view.zero_()
    return flat


# ----- functional forward ----------------------------------------------------------------------
def _norm(spec: ConvNetSpec, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if spec.norm == "instance":
        return F.group_norm(h, spec.width, w, b, eps=NORM_EPS)
    if spec.norm == "group":
        return F.group_norm(h, GROUPNORM_GROUPS, w, b, eps=NORM_EPS)
    if spec.norm == "layer":
        return F.layer_norm(h, tuple(h.shape[1:]), w, b, eps=NORM_EPS)
    # "batch": statistics of this batch (training mode); no running statistics are read or kept.
    return F.batch_norm(h, None, None, w, b, training=True, eps=NORM_EPS)


def apply_activation(spec: ConvNetSpec, h: torch.Tensor) -> torch.Tensor:
    """The block's activation (``spec.activation``) of ``h``."""
    if spec.activation == "relu":
        return F.relu(h)
    if spec.activation == "leakyrelu":
        return F.leaky_relu(h, LEAKY_SLOPE)
    return torch.sigmoid(h)


def apply_pooling(spec: ConvNetSpec, h: torch.Tensor) -> torch.Tensor:
    """The block's 2x2 pooling (``spec.pooling``) of ``h``, or ``h`` itself for ``"none"``."""
    if spec.pooling == "avg":
        return F.avg_pool2d(h, kernel_size=2, stride=2)
    if spec.pooling == "max":
        return F.max_pool2d(h, kernel_size=2, stride=2)
    return h


def convnet_forward(spec: ConvNetSpec, flat_params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits of the ConvNet ``spec`` with parameters ``flat_params`` on images ``x``.

    Args:
        spec: the architecture.
        flat_params: shape ``(spec.num_params,)``, in upstream ``parameters()`` order.
        x: shape ``(N, spec.channels, H, W)`` with ``(H, W) == spec.image_size``; same dtype and device.

    Returns logits of shape ``(N, spec.num_classes)``. Differentiable in ``flat_params`` and ``x``,
    twice (``create_graph=True`` works), in any floating dtype.

    Batch norm (``norm="batch"``) always normalises with the statistics of ``x`` itself, as a module
    in training mode does, and neither reads nor updates running statistics. (Upstream trains
    students and experts in training mode, so this is what it computes.)

    Works under ``torch.func.vmap`` over a stack of parameter vectors (several students at once).

    Equivalent PyTorch code::

        net = ConvNet(spec); net.load_flat_(flat_params); net.train()
        logits = net(x)   # but differentiable w.r.t. flat_params
    """
    return convnet_apply(spec, unflatten_params(spec, flat_params), x)


Conv = Callable[..., torch.Tensor]  # (x, weight, bias, padding=...) -> y, as F.conv2d


def convnet_apply(
    spec: ConvNetSpec,
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
    *,
    fused: bool = False,
    backend: str = "auto",
    conv: Conv | None = None,
) -> torch.Tensor:
    """:func:`convnet_forward` with the parameters as separate tensors (``unflatten_params`` order).

    Differentiating with respect to separate leaf tensors avoids what a flat vector costs in every
    backward: each view's gradient is scattered into a zero-filled copy of the whole vector (one
    per parameter tensor, 14 for ConvNet-3), which the unroll engines would pay at every step.

    ``fused=True`` runs each instance norm -> ReLU -> 2x2 average pool block as one fused op
    (:func:`datm_fast.ops.norm_relu_pool`, on ``backend``) where ``spec.norm_relu_pool_blocks`` (other
    architectures keep PyTorch's ops there), and every convolution as :func:`datm_fast.ops.conv2d`, whose
    second derivative runs on the convolution library's own backward kernels. Same values and
    derivatives to rounding.

    ``conv``, when given, computes every convolution instead (called as ``conv(x, weight, bias,
    padding=p)``, in layer order), e.g. a wrapper that keeps the convolutions' inputs and outputs.
    """
    if x.dim() != 4 or tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"convnet_forward: x must have shape (N, {', '.join(map(str, spec.input_shape))}), got {tuple(x.shape)}"
        )
    if len(params) != len(spec.params):
        raise ValueError(f"convnet_apply: expected {len(spec.params)} parameter tensors, got {len(params)}")
    if conv is None:
        conv = conv2d if fused else F.conv2d
    fuse = fused and spec.norm_relu_pool_blocks
    h = x
    for layer, where in zip(spec.layers, spec.layer_params):
        h = conv(h, params[where.conv_weight], params[where.conv_bias], padding=layer.padding)
        if fuse:
            h = norm_relu_pool(h, params[where.norm_weight], params[where.norm_bias], NORM_EPS, backend=backend)
            continue
        if where.norm_weight is not None:
            h = _norm(spec, h, params[where.norm_weight], params[where.norm_bias])
        h = apply_pooling(spec, apply_activation(spec, h))
    weight, bias = spec.head_params
    return F.linear(h.flatten(1), params[weight], params[bias])


# ----- module ----------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """The upstream ConvNet as an ``nn.Module``, with upstream's exact module tree.

    ``features`` is an ``nn.Sequential`` of conv / norm / activation / pool layers and ``classifier``
    the linear head, so ``parameters()`` order and shapes, and ``state_dict()`` keys, are upstream's:
    an upstream expert checkpoint (a list of tensors in ``parameters()`` order) loads with
    :meth:`load_flat_`, an upstream ``state_dict`` with ``load_state_dict``.

    Args:
        spec: the architecture (:class:`ConvNetSpec`).
        generator: draw the initial parameters from this generator (see :func:`init_flat_params`);
            without one, PyTorch's layer constructors draw from the global generator as usual.

    Input ``(N, channels, H, W)``, output ``(N, num_classes)``.

    Equivalent PyTorch code (upstream, ``utils.get_network("ConvNet", 3, 10, (32, 32))``)::

        ConvNet(channel=3, num_classes=10, net_width=128, net_depth=3, net_act="relu",
                net_norm="instancenorm", net_pooling="avgpooling", im_size=(32, 32))
    """

    def __init__(self, spec: ConvNetSpec, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(spec, ConvNetSpec):
            raise TypeError(f"ConvNet expects a ConvNetSpec, got {type(spec).__name__}")
        self.spec = spec
        build_module(self, self._build, generator)

    def _build(self) -> None:
        spec = self.spec
        layers: list[nn.Module] = []
        for layer in spec.layers:
            layers.append(nn.Conv2d(layer.in_channels, spec.width, kernel_size=3, padding=layer.padding))
            if spec.norm == "instance":
                layers.append(nn.GroupNorm(spec.width, spec.width, eps=NORM_EPS, affine=True))
            elif spec.norm == "group":
                layers.append(nn.GroupNorm(GROUPNORM_GROUPS, spec.width, eps=NORM_EPS, affine=True))
            elif spec.norm == "layer":
                layers.append(nn.LayerNorm(list(layer.conv_shape), eps=NORM_EPS, elementwise_affine=True))
            elif spec.norm == "batch":
                layers.append(nn.BatchNorm2d(spec.width, eps=NORM_EPS, affine=True))
            if spec.activation == "relu":
                layers.append(nn.ReLU())
            elif spec.activation == "leakyrelu":
                layers.append(nn.LeakyReLU(negative_slope=LEAKY_SLOPE))
            else:
                layers.append(nn.Sigmoid())
            if spec.pooling == "avg":
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            elif spec.pooling == "max":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(spec.num_features, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.flatten(1))

    def flat_parameters(self) -> torch.Tensor:
        """All parameters as one 1-D tensor of length ``spec.num_params`` (a differentiable copy)."""
        return flatten_params(self)

    @torch.no_grad()
    def load_flat_(self, flat: Union[torch.Tensor, Sequence[torch.Tensor]]) -> ConvNet:
        """Copy parameters in: a flat vector ``(spec.num_params,)`` or an upstream-layout list.

        The list form is what upstream expert buffers hold for one epoch: one tensor per parameter,
        in ``parameters()`` order, each of the parameter's shape (flattened tensors of the right
        size are accepted too). Values are cast to the module's dtype and device. Returns ``self``.
        """
        params = list(self.parameters())
        if isinstance(flat, torch.Tensor):
            _check_flat(self.spec, flat)
            for p, v in zip(params, unflatten_params(self.spec, flat)):
                p.copy_(v)
            return self
        tensors = list(flat)
        if len(tensors) != len(params):
            raise ValueError(
                f"load_flat_: expected {len(params)} tensors (upstream parameters() order), got {len(tensors)}"
            )
        for (name, shape), p, t in zip(self.spec.param_shapes(), params, tensors):
            if t.numel() != shape.numel() or (t.dim() != 1 and t.shape != shape):
                raise ValueError(f"load_flat_: tensor for {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            p.copy_(t.reshape(shape))
        return self

    def extra_repr(self) -> str:
        return f"spec={self.spec}"
