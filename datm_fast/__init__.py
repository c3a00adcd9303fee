"""datm_fast: dataset distillation by difficulty-aligned trajectory matching, fast, exact and lean.

Importing this package loads no data, compiles nothing and never initialises CUDA. The compiled
operators (``datm_fast._C``) and the Triton kernels are loaded on first use.
"""

from ._version import __version__
from .backends import BackendStatus, backend_info
from .ops import matching_loss, param_distance

__all__ = ["__version__", "BackendStatus", "backend_info", "matching_loss", "param_distance"]
