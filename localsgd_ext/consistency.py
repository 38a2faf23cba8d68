"""Before every average: do all ranks hold the same parameter layout, and (optionally) finite values?

A collective over mismatched models either averages the wrong numbers or waits forever for a bucket
that never comes. One small all_reduce settles it first, in the compiled engine (overlapped with the
first bucket's pack): each rank contributes its layout fingerprint, the fingerprint negated, and a
non-finite flag, reduced with MAX, which gives every rank the same max and min fingerprint and the
same flag. All ranks therefore take the same branch: nothing more when they agree; otherwise they
exchange descriptions of their parameters here and raise the same RuntimeError, naming the first
parameter that differs (or the rank and parameter holding NaN/Inf).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


class RanksDisagreeError(RuntimeError):
    """The ranks' parameters differ in layout, or (with check_finite) some hold NaN/Inf. Raised on every
    rank of the group, with the same message."""


def status_device(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor]) -> torch.device:
    """Where the agreement check's small tensor must live for the group's backend."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")  # also "cpu:gloo,cuda:nccl"
    return tensors[0].device if tensors else torch.device("cpu")


def _describe(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> List[tuple]:
    return [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in zip(names, tensors)]


def _entry(entry: Optional[tuple]) -> str:
    return "no such parameter" if entry is None else f"{entry[0]} {entry[1]} {entry[2]}"


def _first_difference(layouts: List[List[tuple]]) -> str:
    reference = layouts[0]
    for rank, layout in enumerate(layouts[1:], start=1):
        for i in range(max(len(reference), len(layout))):
            mine = reference[i] if i < len(reference) else None
            theirs = layout[i] if i < len(layout) else None
            if mine != theirs:
                return (
                    f"the first difference is at parameter index {i}: rank 0 has {_entry(mine)}, rank {rank} has "
                    f"{_entry(theirs)} (rank 0 has {len(reference)} parameters, rank {rank} has {len(layout)})"
                )
    raise AssertionError("called with identical layouts")


def raise_disagreement(
    engine, tensors: Sequence[torch.Tensor], names: Sequence[str], group: dist.ProcessGroup, check_finite: bool
) -> None:
    """Called on every rank once the engine's check (one MAX all_reduce of [fingerprint, -fingerprint,
    non-finite flag], which every rank reads alike) found a disagreement: exchanges descriptions of the
    parameters and raises the same RanksDisagreeError everywhere. A collective: every rank calls it."""
    nonfinite = engine.first_nonfinite() if check_finite else -1
    mine = {"rank": dist.get_rank(group), "layout": _describe(tensors, names), "nonfinite": nonfinite}
    everyone: List[Optional[dict]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    layouts = [entry["layout"] for entry in everyone]
    if any(layout != layouts[0] for layout in layouts):
        raise RanksDisagreeError(
            "LocalSGD/ParameterAverager: the ranks do not hold the same parameters, so they cannot be averaged; "
            + _first_difference(layouts)
            + ". Every rank must average the same parameters (count, order, shapes, dtypes). Nothing was averaged."
        )
    culprits = [
        f"rank {entry['rank']} at {entry['layout'][entry['nonfinite']][0]}"
        for entry in everyone
        if entry["nonfinite"] >= 0
    ]
    if culprits:
        raise RanksDisagreeError(
            "LocalSGD/ParameterAverager: non-finite values (NaN or Inf) before averaging (check_finite=True): "
            + "; ".join(culprits)
            + ". Nothing was averaged."
        )
    raise RanksDisagreeError(
        "LocalSGD/ParameterAverager: the ranks' layouts hash differently but describe the same (report this). "
        "Nothing was averaged."
    )
