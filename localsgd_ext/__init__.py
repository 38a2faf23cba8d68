"""Local SGD for PyTorch with a compiled bucketed averaging engine; a drop-in for Accelerate's LocalSGD.

`ParameterAverager` needs only torch. `LocalSGD` and `patch_accelerate` need Hugging Face Accelerate
(`pip install accelerate`) and load it on first use."""

__version__ = "0.1.0"

import torch  # noqa: E402  (loads libtorch before the compiled module, which has no RPATH to it)


def _check_built_against_this_torch() -> None:
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:  # built by CMake, which does not record it
        return
    if TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"localsgd_ext was compiled against torch {TORCH_VERSION}, but torch {torch.__version__} is installed; its "
            "compiled core works only with the torch it was built against. Rebuild it against this torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps . (from the localsgd_ext checkout), or "
            "bash scripts/bootstrap.sh"
        )


_check_built_against_this_torch()

from . import ops  # noqa: E402
from .averager import ParameterAverager  # noqa: E402
from .consistency import RanksDisagreeError  # noqa: E402
from .options import AveragingOptions  # noqa: E402
from .quantized_wire import QuantizedAverager  # noqa: E402

__all__ = [
    "AveragingOptions",
    "LocalSGD",
    "ParameterAverager",
    "QuantizedAverager",
    "RanksDisagreeError",
    "ops",
    "patch_accelerate",
]

_NEEDS_ACCELERATE = (
    "{what} needs Hugging Face Accelerate, which is not installed: pip install accelerate (or, from the "
    'localsgd_ext checkout, pip install --no-build-isolation ".[accelerate]"). ParameterAverager works without it.'
)


def _import_needing_accelerate(what: str, run):
    try:
        return run()
    except ImportError as error:
        if (error.name or "").split(".")[0] == "accelerate":
            raise ImportError(_NEEDS_ACCELERATE.format(what=what), name=error.name) from error
        raise


def __dir__():
    # LocalSGD is loaded on first use (it needs Accelerate), but belongs to the package's surface.
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name == "LocalSGD":

        def load():
            from .local_sgd import LocalSGD

            return LocalSGD

        local_sgd = _import_needing_accelerate("localsgd_ext.LocalSGD", load)
        globals()["LocalSGD"] = local_sgd
        return local_sgd
    raise AttributeError(f"module 'localsgd_ext' has no attribute {name!r}")


def patch_accelerate() -> type:
    """Makes `accelerate.local_sgd.LocalSGD` ours for every import that follows; see `localsgd_ext.patch`.
    (Imported lazily, so that `python -m localsgd_ext.patch` finds its module unimported.)"""

    def patch():
        from .patch import patch_accelerate as patch_now

        return patch_now()

    return _import_needing_accelerate("localsgd_ext.patch_accelerate", patch)
