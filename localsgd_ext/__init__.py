"""Local SGD for PyTorch with a compiled bucketed averaging engine; a drop-in for Accelerate's LocalSGD."""

import torch  # noqa: F401  (loads libtorch before the compiled module, which has no RPATH to it)

from . import ops
from .averager import ParameterAverager
from .consistency import RanksDisagreeError
from .local_sgd import LocalSGD

__all__ = ["LocalSGD", "ParameterAverager", "RanksDisagreeError", "ops"]
__version__ = "0.1.0"
