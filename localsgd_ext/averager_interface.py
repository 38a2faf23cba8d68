"""The one interface every averager has (`ParameterAverager` on the float wires, `QuantizedAverager` on
int8/fp8), so that `SyncController` drives either without knowing which."""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple

import torch

__all__ = ["Averager", "OuterStepCallback", "streaming_merge"]


def streaming_merge(tensors: Sequence[torch.Tensor], results: Sequence[torch.Tensor], alpha: float) -> None:
    """Streaming DiLoCo's merge (torchft's `fragment_update_alpha`): each tensor becomes
    `lerp(result, tensor, alpha)`, i.e. `result + alpha * (tensor - result)`: the averaged (outer-stepped)
    result, with a share `alpha` of what this rank learned since the sync started kept. The same torch
    kernel as torchft's `p.lerp_(local, alpha)`, so the same bits."""
    with torch.no_grad():
        for tensor, result in zip(tensors, results):
            tensor.copy_(torch.lerp(result, tensor, alpha))


class OuterStepCallback(Protocol):
    """What `finish_average(outer_step=...)` hands the means of the snapshots to: it writes the outer step's
    result into them. `positions`: where these tensors sit among the averager's (None: all, in order)."""

    def __call__(self, means: List[torch.Tensor], positions: Optional[Sequence[int]] = None) -> None: ...


class Averager(Protocol):
    """A fixed list of tensors averaged in place across one process group. Every method that moves data
    is a collective: every rank of the group calls it at the same point."""

    params: List[torch.Tensor]
    names: List[str]

    @property
    def agreement_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        """Named tensors (e.g. buffers) whose names, shapes and dtypes join the agreement check."""
        ...

    @agreement_tensors.setter
    def agreement_tensors(self, named_tensors: Optional[Sequence[Tuple[str, torch.Tensor]]]) -> None: ...

    def average(self) -> None:
        """Waited for: each tensor becomes its mean across the group."""
        ...

    def start_average(self) -> None:
        """Starts an average of a snapshot of the tensors and returns; `finish_average()` merges it."""
        ...

    def advance_average(self) -> None:
        """Puts the next part of the started average on the wire (if it has one)."""
        ...

    def finish_average(
        self, outer_step: Optional[OuterStepCallback] = None, fragment_update_alpha: Optional[float] = None
    ) -> None:
        """Waits for the started average and merges it, through `outer_step` when given: with
        `fragment_update_alpha` None the eager merge `t + (result - snapshot)`, else the streaming one,
        `t = lerp(result, t, fragment_update_alpha)` (`streaming_merge`)."""
        ...

    @property
    def average_pending(self) -> bool:
        """Whether a started average has not been finished."""
        ...

    def drain_pending_average(self) -> None:
        """Waits for a started average without merging it."""
        ...

    def rebase_anchor(self, values: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        """Takes the tensors' current values (or `values`, one per tensor) as what the next change is measured
        from (if anything is)."""
        ...

    def anchor_values(self) -> List[Optional[torch.Tensor]]:
        """What the next change is measured from, one tensor per tensor (None where nothing is)."""
        ...

    def state_tensors(self) -> List[torch.Tensor]:
        """What a sync changes besides the tensors (the quantized wire's anchor and residual): what a
        fault-tolerant sync restores with them when its commit fails."""
        ...

    def verify_ranks_agree(self, equal_values: Optional[Sequence[torch.Tensor]] = None) -> None:
        """The agreement check alone, optionally with values that must be bit-identical on every rank."""
        ...
