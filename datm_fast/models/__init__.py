"""Networks of trajectory matching: the ConvNet family (spec, functional form, module), the
evaluation architectures of cross-architecture tables, and a registry of upstream names.

* :class:`ConvNetSpec` describes one ConvNet; :func:`convnet_forward` runs it from one flat
  parameter vector (what the distillation engine differentiates through);
  :class:`ConvNet` is the same network as an ``nn.Module`` whose ``parameters()`` match upstream's,
  so upstream expert buffers load unchanged.
* :func:`init_flat_params` and every module accept an explicit ``torch.Generator``; nothing here
  reseeds the global RNG.
* :func:`get_network` builds any upstream name (``ConvNet``, ``ConvNetD4``, ``ConvNetBN``, ``VGG11``,
  ``ResNet18``, ...).
"""

from .convnet import (
    ACTIVATIONS,
    NORMS,
    POOLINGS,
    BlockShape,
    ConvNet,
    ConvNetSpec,
    LayerParams,
    ParamInfo,
    apply_activation,
    apply_pooling,
    convnet_apply,
    convnet_forward,
    flatten_params,
    init_flat_params,
    unflatten_params,
)
from .eval_archs import (
    MLP,
    VGG,
    VGG11,
    VGG11BN,
    AlexNet,
    LeNet,
    ResNet,
    ResNet18,
    ResNet18_AP,
    ResNet18BN,
    ResNet18BN_AP,
)
from .registry import (
    EVAL_POOLS,
    convnet_names,
    convnet_spec_from_name,
    default_convnet_name,
    get_network,
    network_names,
)

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "POOLINGS",
    "BlockShape",
    "ConvNetSpec",
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
    "EVAL_POOLS",
    "get_network",
    "convnet_spec_from_name",
    "convnet_names",
    "network_names",
    "default_convnet_name",
]
