"""datm_fast: dataset distillation by difficulty-aligned trajectory matching, fast, exact and lean.

The pipeline, one subpackage per stage (data flows one way):
    data       loaders, caching, ZCA / normalisation, long-tailed splits
    models     the ConvNet family (functional over one flat parameter vector) and evaluation nets
    augment    differentiable siamese augmentation (DSA), vectorised and replayable
    distill    the DATM loop and its unroll engines (exact, full, tesla)
    ops        fused operators with a backend choice (torch, cpp, cuda, triton)

Importing this package loads no data, compiles nothing and never initialises CUDA. The compiled
operators (``datm_fast._C``) and the Triton kernels are loaded on first use.
"""

from ._version import __version__
from .backends import BackendStatus, backend_info
from .distill import DistillConfig, DistilledSet, distill, load_config, trajectory_matching_loss
from .ops import matching_loss, param_distance

__all__ = [
    "__version__",
    "BackendStatus",
    "DistillConfig",
    "DistilledSet",
    "backend_info",
    "distill",
    "load_config",
    "matching_loss",
    "param_distance",
    "trajectory_matching_loss",
]
