"""Python entry points for the compiled operators, with fake (meta) kernels for torch.compile/opcheck."""

from typing import Sequence

import torch

# Loading the compiled library registers the localsgd_ext::* operators with the dispatcher.
from . import _C  # noqa: F401

__all__ = ["merge_into", "pack_into", "unpack_from"]


def pack_into(
    tensors: Sequence[torch.Tensor], offsets: Sequence[int], buffer: torch.Tensor, scale: float = 1.0
) -> None:
    """Copies each tensor into `buffer` at its element offset, in one compiled pass.

    Args:
        tensors (`Sequence[torch.Tensor]`):
            Tensors of `buffer`'s dtype and device, any shape and strides; or float32 tensors with a
            bfloat16/float16 buffer, cast rounding to nearest even.
        offsets (`Sequence[int]`):
            Element offset of each tensor in `buffer`; `offsets[i] + tensors[i].numel()` must fit.
        buffer (`torch.Tensor`):
            1-D contiguous destination.
        scale (`float`, defaults to 1):
            Finite and positive. Multiplies float32 values (in float32) before their cast to a
            bfloat16/float16 buffer, as `(tensor * scale).to(dtype)` does; must be 1 for plain copies.
            The engine passes a power of two that keeps an fp16 wire in range.
    """
    torch.ops.localsgd_ext.pack_into.default(list(tensors), list(offsets), buffer, float(scale))


def unpack_from(
    buffer: torch.Tensor, offsets: Sequence[int], divisor: float, tensors: Sequence[torch.Tensor]
) -> None:
    """Copies `buffer` back into each tensor from its element offset, divided by `divisor`.

    The division is fused into the copy and rounds as torch's `tensor / divisor` does (in float for
    fp16/bf16), so SUM followed by this unpack matches an all_reduce SUM then `/ world_size` bit for bit.

    Args:
        buffer (`torch.Tensor`):
            1-D contiguous source.
        offsets (`Sequence[int]`):
            Element offset of each tensor in `buffer`.
        divisor (`float`):
            Finite and positive; 1 makes a plain copy.
        tensors (`Sequence[torch.Tensor]`):
            Destinations, updated in place, of `buffer`'s dtype and device; or float32 tensors with a
            bfloat16/float16 buffer, widened and then divided in float32.
    """
    torch.ops.localsgd_ext.unpack_from.default(buffer, list(offsets), float(divisor), list(tensors))


def merge_into(
    sum: torch.Tensor, snapshot: torch.Tensor, offsets: Sequence[int], divisor: float, tensors: Sequence[torch.Tensor]
) -> None:
    """An overlapped sync's merge, in one compiled pass: each tensor `t` becomes
    `t + (sum / divisor - snapshot)`, with `sum` and `snapshot` read from its offset, computed in the
    tensor's dtype (float32 for fp16/bf16 tensors, each operand widened first) and rounded once.

    Args:
        sum (`torch.Tensor`):
            1-D contiguous: the all-reduced snapshot.
        snapshot (`torch.Tensor`):
            1-D contiguous, `sum`'s dtype: the buffer as packed before its all_reduce.
        offsets (`Sequence[int]`):
            Element offset of each tensor in both buffers.
        divisor (`float`):
            Finite and positive (the group size after a SUM, 1 after an AVG).
        tensors (`Sequence[torch.Tensor]`):
            Updated in place; of the buffers' dtype and device, or float32 with bfloat16/float16 buffers.
    """
    torch.ops.localsgd_ext.merge_into.default(sum, snapshot, list(offsets), float(divisor), list(tensors))


def _check_arguments(op, tensors, offsets, buffer):
    """The checks of csrc/pack_common.h, for the fake kernels. They matter beyond tracing: a call that
    mixes meta and real tensors dispatches to the fake kernel, which must refuse it rather than do
    nothing to the real ones."""
    if len(tensors) != len(offsets):
        raise ValueError(
            f"{op}: tensors and offsets must have the same length, got {len(tensors)} tensors and {len(offsets)} offsets."
        )
    if buffer.layout != torch.strided:
        raise ValueError(f"{op}: buffer must be a strided (dense) tensor, got layout {buffer.layout}.")
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(
            f"{op}: buffer must be 1-D and contiguous, got sizes {list(buffer.shape)} and strides {list(buffer.stride())}."
        )
    for i, (t, offset) in enumerate(zip(tensors, offsets)):
        if t.layout != torch.strided:
            raise ValueError(f"{op}: tensors[{i}] must be strided (dense), got layout {t.layout}.")
        wire_cast = t.dtype == torch.float32 and buffer.dtype in (torch.bfloat16, torch.float16)
        if t.dtype != buffer.dtype and not wire_cast:
            raise TypeError(
                f"{op}: tensors[{i}] has dtype {t.dtype} but buffer has dtype {buffer.dtype}; a bucket holds one dtype "
                "(or float32 tensors in a BFloat16 or Half buffer)."
            )
        if t.device != buffer.device:
            raise ValueError(f"{op}: tensors[{i}] is on {t.device} but buffer is on {buffer.device}.")
        if not 0 <= offset <= buffer.numel() - t.numel():
            raise ValueError(
                f"{op}: tensors[{i}] with {t.numel()} elements at offset {offset} does not fit in a buffer of "
                f"{buffer.numel()} elements."
            )


def _check_scale(tensors, buffer, scale):
    if not 0 < scale < float("inf"):
        raise ValueError(f"pack_into: scale must be a finite positive number, got {scale}.")
    for i, t in enumerate(tensors):
        if scale != 1.0 and not (t.dtype == torch.float32 and buffer.dtype in (torch.bfloat16, torch.float16)):
            raise ValueError(
                "pack_into: scale must be 1 unless every tensor is float32 cast to a bfloat16/float16 buffer; "
                f"tensors[{i}] has dtype {t.dtype} and buffer {buffer.dtype}, got scale {scale}."
            )


@torch.library.register_fake("localsgd_ext::pack_into")
def _pack_into_fake(tensors, offsets, buffer, scale=1.0):
    _check_arguments("pack_into", tensors, offsets, buffer)
    _check_scale(tensors, buffer, scale)
    return None


@torch.library.register_fake("localsgd_ext::merge_into")
def _merge_into_fake(sum, snapshot, offsets, divisor, tensors):
    _check_arguments("merge_into", tensors, offsets, sum)
    _check_arguments("merge_into", tensors, offsets, snapshot)
    if sum.dtype != snapshot.dtype:
        raise TypeError(f"merge_into: sum and snapshot must have one dtype, got {sum.dtype} and {snapshot.dtype}.")
    if not 0 < divisor < float("inf"):
        raise ValueError(f"merge_into: divisor must be a finite positive number, got {divisor}.")
    return None


@torch.library.register_fake("localsgd_ext::unpack_from")
def _unpack_from_fake(buffer, offsets, divisor, tensors):
    _check_arguments("unpack_from", tensors, offsets, buffer)
    if not 0 < divisor < float("inf"):
        raise ValueError(f"unpack_from: divisor must be a finite positive number, got {divisor}.")
    return None
