"""Python entry points for the compiled operators, with fake (meta) kernels for torch.compile/opcheck."""

from typing import Sequence

import torch

# Loading the compiled library registers the localsgd_ext::* operators with the dispatcher.
from . import _C  # noqa: F401

__all__ = ["pack_into", "unpack_from"]


def pack_into(tensors: Sequence[torch.Tensor], offsets: Sequence[int], buffer: torch.Tensor) -> None:
    """Copies each tensor into `buffer` at its element offset, in one compiled pass.

    Args:
        tensors (`Sequence[torch.Tensor]`):
            Tensors of `buffer`'s dtype and device, any shape and strides.
        offsets (`Sequence[int]`):
            Element offset of each tensor in `buffer`; `offsets[i] + tensors[i].numel()` must fit.
        buffer (`torch.Tensor`):
            1-D contiguous destination.
    """
    torch.ops.localsgd_ext.pack_into.default(list(tensors), list(offsets), buffer)


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
            Destinations, updated in place, of `buffer`'s dtype and device.
    """
    torch.ops.localsgd_ext.unpack_from.default(buffer, list(offsets), float(divisor), list(tensors))


@torch.library.register_fake("localsgd_ext::pack_into")
def _pack_into_fake(tensors, offsets, buffer):
    return None


@torch.library.register_fake("localsgd_ext::unpack_from")
def _unpack_from_fake(buffer, offsets, divisor, tensors):
    return None
