"""PyTorch's default parameter initialisation, drawn from an explicit ``torch.Generator``.

PyTorch initialises ``nn.Conv2d`` and ``nn.Linear`` in ``reset_parameters`` with
``kaiming_uniform_(weight, a=sqrt(5))`` (that is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) and the
bias with ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; norm layers get weight 1 and bias 0. The
functions here make exactly those draws, in the same order and with the same bounds, but from a
generator the caller owns. With a generator seeded ``s`` they give bit-identical tensors to modules
built after ``torch.manual_seed(s)`` (both are the same Mersenne-Twister CPU generator), and they never
touch, let alone reseed, the global RNG. Upstream MTT/DATM reseeds the global RNG from the wall
clock on every ``get_network`` call; nothing here does.

``generator=None`` draws from PyTorch's default generator, exactly as the layer constructors do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Callable, TypeVar

import torch
from torch import nn

__all__ = ["init_weight_", "init_bias_", "reset_parameters_", "build_module"]

_SQRT5 = math.sqrt(5.0)

M = TypeVar("M", bound=nn.Module)


def _fan_in(weight_shape: torch.Size | tuple[int, ...]) -> int:
    """fan_in of a conv/linear weight (out, in, *kernel): in * prod(kernel)."""
    fan_in = int(weight_shape[1]) if len(weight_shape) > 1 else 1
    for k in weight_shape[2:]:
        fan_in *= int(k)
    return fan_in


def init_weight_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """In place, PyTorch's default conv/linear weight init.

    Equivalent PyTorch code::

        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    """
    with torch.no_grad():
        return nn.init.kaiming_uniform_(weight, a=_SQRT5, generator=generator)


def init_bias_(
    bias: torch.Tensor, weight_shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """In place, PyTorch's default conv/linear bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    ``weight_shape`` is the shape of the layer's weight, from which fan_in is taken.
    """
    fan_in = _fan_in(weight_shape)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return nn.init.uniform_(bias, -bound, bound, generator=generator)


def reset_parameters_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialise every layer of ``module`` as its constructor would, drawing from ``generator``.

    Layers are visited in ``module.modules()`` order (registration order), which for the networks of
    this package is also their construction order, so the draws match a plain construction under
    the same seed. Conv/Linear layers get PyTorch's default init; norm layers (BatchNorm, GroupNorm,
    LayerNorm, InstanceNorm) get weight 1, bias 0 and, for batch norm, fresh running statistics.
    Modules of other types that own parameters directly raise ``TypeError`` (nothing is left
    uninitialised silently).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            init_weight_(m.weight, generator)
            if m.bias is not None:
                init_bias_(m.bias, m.weight.shape, generator)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            m.reset_parameters()  # ones / zeros / running stats: no random draws
        elif any(True for _ in m.parameters(recurse=False)):
            raise TypeError(f"reset_parameters_: don't know how to initialise {type(m).__name__}")
    return module


@contextlib.contextmanager
def _meta_device() -> Iterator[None]:
    with torch.device("meta"):
        yield


def build_module(module: M, build: Callable[[], None], generator: torch.Generator | None) -> M:
    """Run ``build()`` (which registers ``module``'s layers) and initialise the layers.

    Without a generator the layers are built normally, so PyTorch's constructors initialise them from
    the global default generator (exactly as ``nn.Conv2d(...)`` would). With a generator they are
    built on the meta device (no storage, no random draws), materialised on ``generator.device`` and
    initialised by :func:`reset_parameters_` from ``generator``; the global RNG is not touched.
    """
    if generator is None:
        build()
        return module
    with _meta_device():
        build()
    module.to_empty(device=generator.device)
    reset_parameters_(module, generator)
    return module
