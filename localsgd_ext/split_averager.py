"""`SplitAverager`: one fragment of a model whose parameters a single averager cannot all take, split into
parts that each can, driven as one. The quantized wire's codec reads float32 on one device: its float32
parameters go through one `QuantizedAverager` per device, and every other parameter (bfloat16, float16,
float64...) travels on the float wire as it is, as the bf16 wire leaves other dtypes alone."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .averager_interface import Averager, OuterStepCallback
from .consistency import digest

__all__ = ["SplitAverager"]


def split_by_codec(params: Sequence[torch.Tensor]) -> List[Tuple[Optional[torch.device], List[int]]]:
    """The parts of a quantized fragment, in order: per device, the positions of its float32 parameters
    (device given), then the positions of every other parameter (device None: the float wire)."""
    by_device: Dict[torch.device, List[int]] = {}
    others: List[int] = []
    for i, p in enumerate(params):
        if p.dtype == torch.float32:
            by_device.setdefault(p.device, []).append(i)
        else:
            others.append(i)
    parts: List[Tuple[Optional[torch.device], List[int]]] = list(by_device.items())
    return parts + ([(None, others)] if others else [])


def layout_digest(params: Sequence[torch.Tensor], names: Sequence[str]) -> int:
    """What decides the split, as one number for every part's agreement check: ranks that would split
    differently fail their first check together instead of running different collectives."""
    return digest(*[(name, str(p.dtype), str(p.device), tuple(p.shape)) for p, name in zip(params, names)])


class _OnPositions:
    """A part's outer step: the fragment's, told where the part's tensors sit among the fragment's."""

    def __init__(self, outer_step: OuterStepCallback, positions: List[int]):
        self.outer_step, self.positions = outer_step, positions

    def __call__(self, means: List[torch.Tensor], positions: Optional[Sequence[int]] = None) -> None:
        self.outer_step(means, self.positions if positions is None else [self.positions[i] for i in positions])


class SplitAverager:
    """Averagers over disjoint parts of one fragment, run one after the other, in the order of the parts.

    Args:
        params (`List[torch.Tensor]`): the fragment's parameters, in order.
        names (`List[str]`): their names.
        parts (`List[Tuple[List[int], Averager]]`): each part's positions in `params` and its averager.
    """

    def __init__(self, params: List[torch.Tensor], names: List[str], parts: List[Tuple[List[int], Averager]]):
        self.params = params
        self.names = names
        self.parts = parts

    @property
    def agreement_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        return self.parts[-1][1].agreement_tensors

    @agreement_tensors.setter
    def agreement_tensors(self, named_tensors) -> None:
        self.parts[-1][1].agreement_tensors = named_tensors

    def average(self) -> None:
        for _, part in self.parts:
            part.average()

    def start_average(self) -> None:
        for _, part in self.parts:
            part.start_average()

    def advance_average(self) -> None:
        for _, part in self.parts:
            if part.average_pending:
                part.advance_average()

    def finish_average(
        self, outer_step: Optional[OuterStepCallback] = None, fragment_update_alpha: Optional[float] = None
    ) -> None:
        for positions, part in self.parts:
            part.finish_average(
                outer_step=None if outer_step is None else _OnPositions(outer_step, positions),
                fragment_update_alpha=fragment_update_alpha,
            )

    @property
    def average_pending(self) -> bool:
        return any(part.average_pending for _, part in self.parts)

    def drain_pending_average(self) -> None:
        for _, part in self.parts:
            part.drain_pending_average()

    def rebase_anchor(self, values: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        for positions, part in self.parts:
            part.rebase_anchor(None if values is None else [values[i] for i in positions])

    def anchor_values(self) -> List[Optional[torch.Tensor]]:
        values: List[Optional[torch.Tensor]] = [None] * len(self.params)
        for positions, part in self.parts:
            for position, value in zip(positions, part.anchor_values()):
                values[position] = value
        return values

    def state_tensors(self) -> List[torch.Tensor]:
        return [t for _, part in self.parts for t in part.state_tensors()]

    def verify_ranks_agree(self, equal_values: Optional[Sequence[torch.Tensor]] = None) -> None:
        for positions, part in self.parts:
            part.verify_ranks_agree(None if equal_values is None else [equal_values[i] for i in positions])
