"""Local SGD for PyTorch with a compiled bucketed averaging engine; a drop-in for Accelerate's LocalSGD."""

import torch  # noqa: F401  (loads libtorch before the compiled module, which has no RPATH to it)

from . import ops
from .averager import ParameterAverager
from .consistency import RanksDisagreeError
from .local_sgd import LocalSGD

__all__ = ["LocalSGD", "ParameterAverager", "RanksDisagreeError", "ops", "patch_accelerate"]


def patch_accelerate() -> type:
    """Makes `accelerate.local_sgd.LocalSGD` ours for every import that follows; see `localsgd_ext.patch`.
    (Imported lazily, so that `python -m localsgd_ext.patch` finds its module unimported.)"""
    from .patch import patch_accelerate as patch

    return patch()
__version__ = "0.1.0"
