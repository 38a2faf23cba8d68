"""The averaging options, checked once where they are built, and the argument checks every entry point
shares (one wording per message). `LocalSGD` builds one `AveragingOptions` and hands it to every
`ParameterAverager` it makes; the compiled engine keeps its own checks only as guards."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Dict, Optional

import torch

__all__ = ["AveragingOptions", "check_bool", "check_int_at_least"]

REDUCE_OPS = ("auto", "avg", "sum")
COMM_DTYPES = (torch.bfloat16, torch.float16)
# Any cap at or above the model's size plans one bucket per device and dtype; larger ones would only
# overflow the engine's int64.
LARGEST_BUCKET_CAP_BYTES = 2**62


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_int_at_least(name: str, value, minimum: int, type_note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}{type_note}, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_bucket_cap_mb(bucket_cap_mb) -> float:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real):
        raise TypeError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
    value = float(bucket_cap_mb)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"bucket_cap_mb must be a positive finite number, got {bucket_cap_mb!r}")
    return value


@dataclasses.dataclass(frozen=True)
class AveragingOptions:
    """How the engine averages; each field is validated when the object is built.

    Args:
        bucket_cap_mb (`float`, defaults to 25): largest bucket, in MiB.
        check_finite (`bool`, defaults to `False`): refuse NaN/Inf before averaging.
        zero_copy (`bool`, defaults to `False`): keep the tensors in persistent flat buffers.
        comm_dtype (`torch.dtype`, *optional*): `torch.bfloat16` or `torch.float16` wire for float32
            tensors (copy mode only).
        reduce_op (`str`, defaults to `"auto"`): `"auto"`, `"avg"` or `"sum"`.
    """

    bucket_cap_mb: float = 25
    check_finite: bool = False
    zero_copy: bool = False
    comm_dtype: Optional[torch.dtype] = None
    reduce_op: str = "auto"

    def __post_init__(self):
        if self.reduce_op not in REDUCE_OPS:
            raise ValueError(f"reduce_op must be one of {REDUCE_OPS}, got {self.reduce_op!r}")
        check_bool("check_finite", self.check_finite)
        check_bool("zero_copy", self.zero_copy)
        if self.comm_dtype is not None and self.comm_dtype not in COMM_DTYPES:
            raise ValueError(f"comm_dtype must be None, torch.bfloat16 or torch.float16, got {self.comm_dtype!r}")
        if self.comm_dtype is not None and self.zero_copy:
            raise ValueError(
                "comm_dtype needs copy mode (zero_copy=False): zero-copy mode all-reduces the parameters' own memory, "
                "in their own dtype"
            )
        object.__setattr__(self, "bucket_cap_mb", _check_bucket_cap_mb(self.bucket_cap_mb))

    @property
    def bucket_cap_bytes(self) -> int:
        return min(max(1, int(self.bucket_cap_mb * 2**20)), LARGEST_BUCKET_CAP_BYTES)

    def settings(self) -> Dict[str, Any]:
        """What every rank must share, as the agreement check compares and reports it."""
        return {
            "bucket_cap_mb": self.bucket_cap_mb,
            "check_finite": self.check_finite,
            "comm_dtype": str(self.comm_dtype),
            "reduce_op": self.reduce_op,
            "zero_copy": self.zero_copy,
        }
