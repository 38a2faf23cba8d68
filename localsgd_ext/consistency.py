"""Before every average: do all ranks agree on everything that decides what goes on the wire?

A collective over mismatched ranks either averages the wrong numbers, waits forever for a bucket that
never comes, or aborts a process (gloo: "Received data size doesn't match"). One small all_reduce
settles it first, in the compiled engine (csrc/agreement.h), overlapped with the first bucket's pack.
Each rank contributes a fingerprint of its parameter layout and names, its bucket plan, wire dtype and
reduce op, the settings every rank must share (`settings_fingerprint`: the averager's, and the
caller's, e.g. LocalSGD's sync cadence), the layout of tensors synced alongside (buffers), and flags
for NaN/Inf and for a local failure. All ranks read the same reduced values and so take the same
branch: nothing more when they agree; otherwise they exchange descriptions here and raise the same
`RanksDisagreeError`, naming the first thing that differs. A rank whose own preparation failed raises
its own error instead, and the others name it.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Dict, List, Mapping, Optional, Sequence, cast

import torch
import torch.distributed as dist

from . import _C


class RanksDisagreeError(RuntimeError):
    """The ranks differ in what they would average (layout, names, settings, buffers, starting values),
    some hold NaN/Inf (with check_finite), or one of them failed before averaging. Raised on every rank
    of the group (the failing rank raises its own error), with the same message."""


def group_backend(group: dist.ProcessGroup) -> str:
    """The group's backend, e.g. "gloo", "nccl" or "cpu:gloo,cuda:nccl". A group that torch.distributed did
    not create (torchft's reconfigurable groups, or one built from a store by hand) is not in its group map,
    where `dist.get_backend` looks: such a group names its backend itself."""
    try:
        return str(dist.get_backend(group))
    except ValueError:
        return group.name()


def process_rank(group: dist.ProcessGroup) -> int:
    """This process's rank as error messages name it: the global rank where there is a default group (also
    within a subgroup), else the rank within `group`."""
    return dist.get_rank() if dist.is_initialized() else group.rank()


def status_device(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor]) -> torch.device:
    """Where the agreement check's small tensor must live for the group's backend."""
    backend = group_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")  # also "cpu:gloo,cuda:nccl"
    return tensors[0].device if tensors else torch.device("cpu")


def digest(*parts: Any) -> int:
    """A signed 64-bit digest, stable across processes (unlike hash()), of ints and reprs."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, int):
            h.update(struct.pack("<q", part))
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return int.from_bytes(h.digest(), "little", signed=True)


def settings_fingerprint(settings: Mapping[str, Any], names: Sequence[str]) -> int:
    return digest(sorted(settings.items()), list(names))


def describe(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> List[tuple]:
    return [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in zip(names, tensors)]


def _entry(entry: Optional[tuple], what: str) -> str:
    return f"no such {what}" if entry is None else f"{entry[0]} {entry[1]} {entry[2]}"


def _first_difference(layouts: List[List[tuple]], what: str, ranks: List[int]) -> Optional[str]:
    reference, first = layouts[0], ranks[0]
    for rank, layout in zip(ranks[1:], layouts[1:]):
        for i in range(max(len(reference), len(layout))):
            mine = reference[i] if i < len(reference) else None
            theirs = layout[i] if i < len(layout) else None
            if mine != theirs:
                return (
                    f"the first difference is at {what} index {i}: rank {first} has {_entry(mine, what)}, rank {rank} "
                    f"has {_entry(theirs, what)} (rank {first} has {len(reference)} {what}s, rank {rank} has {len(layout)})"
                )
    return None


def _first_setting_difference(everyone: List[dict]) -> Optional[str]:
    # A setting that some rank lacks follows from another that differs (wire="int8" brings its
    # error_feedback), so the settings every rank has come first, in the order they were given.
    keys = list(dict.fromkeys(key for entry in everyone for key in entry["settings"]))
    keys.sort(key=lambda key: not all(key in entry["settings"] for entry in everyone))
    for key in keys:
        values = [entry["settings"].get(key, "<unset>") for entry in everyone]
        if any(value != values[0] for value in values):
            per_rank = ", ".join(f"{value!r} on rank {entry['rank']}" for value, entry in zip(values, everyone))
            return f"the ranks' settings differ: {key} is {per_rank}"
    return None


def _first_value_difference(everyone: List[dict], names: Sequence[str]) -> Optional[str]:
    reference = everyone[0]["values"]
    for entry in everyone[1:]:
        for i, (mine, theirs) in enumerate(zip(reference, entry["values"])):
            if mine != theirs:
                first = everyone[0]["rank"]
                return (
                    f"the ranks start from different values, first at {names[i]} (rank {first} and rank {entry['rank']} "
                    "differ); the outer optimizer (DiLoCo) needs the same starting parameters on every rank, as DDP "
                    "makes them (broadcast from rank 0, or seed every rank alike)"
                )
    return None


def confirm_settings_agree(group: dist.ProcessGroup, settings: Mapping[str, Any], what: str) -> None:
    """Before anything else collective (creating subgroups is one every rank must join): one small
    all_reduce tells whether every rank of `group` has the same `settings`; if not, every rank raises the
    same `RanksDisagreeError` naming the first setting that differs, and nothing is created."""
    # 62 bits, so that negating it cannot overflow int64.
    mine = digest(sorted((key, repr(value)) for key, value in settings.items())) >> 2
    # The largest digest and the largest negated one, in one all_reduce: equal everywhere iff max == min.
    extremes = torch.tensor([mine, -mine], dtype=torch.int64, device=status_device(group, []))
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    if int(extremes[0]) == -int(extremes[1]):
        return
    reason = _first_setting_difference(gather(group, {"rank": process_rank(group), "settings": dict(settings)}))
    raise RanksDisagreeError(
        f"LocalSGD: {reason}. Every rank must be configured alike, or they would send different messages. Nothing was {what}."
    )


def world_group() -> dist.ProcessGroup:
    """torch's default group. Typed Optional by torch: it is None before init_process_group, and then the
    collective it is handed to raises torch's own error saying so."""
    return cast(dist.ProcessGroup, dist.group.WORLD)


def gather(group: dist.ProcessGroup, mine: Dict[str, Any]) -> List[dict]:
    everyone: List[Any] = [None] * group.size()
    dist.all_gather_object(everyone, mine, group=group)
    return everyone


def explain(everyone: List[dict]) -> RanksDisagreeError:
    """What every rank raises after a failed check, from every rank's description (see `gather`); ranks
    are named by their global rank, also within a subgroup."""
    ranks = [entry["rank"] for entry in everyone]
    failed = [entry for entry in everyone if entry.get("error")]
    if failed:
        return RanksDisagreeError(
            "LocalSGD/ParameterAverager: "
            + "; ".join(f"rank {entry['rank']} could not take part in averaging: {entry['error']}" for entry in failed)
            + ". Nothing was averaged on any rank."
        )
    reason = _first_setting_difference(everyone)
    if reason:
        return RanksDisagreeError(
            f"LocalSGD/ParameterAverager: {reason}. Every rank must be configured alike, or they would send "
            "different messages. Nothing was averaged."
        )
    reason = _first_difference([entry["layout"] for entry in everyone], "parameter", ranks)
    if reason:
        return RanksDisagreeError(
            "LocalSGD/ParameterAverager: the ranks do not hold the same parameters, so they cannot be averaged; "
            + reason
            + ". Every rank must average the same parameters (names, count, order, shapes, dtypes). Nothing was "
            "averaged."
        )
    reason = _first_difference([entry["companions"] for entry in everyone], "buffer", ranks)
    if reason:
        return RanksDisagreeError(
            "LocalSGD/ParameterAverager: the ranks do not hold the same buffers, so they cannot be synced "
            f"(sync_buffers=True); {reason}. Nothing was averaged."
        )
    if everyone[0].get("values") is not None:
        reason = _first_value_difference(everyone, [name for name, _, _ in everyone[0]["layout"]])
        if reason:
            return RanksDisagreeError(f"LocalSGD/ParameterAverager: {reason}. Nothing was averaged.")
    culprits = [
        f"rank {entry['rank']} at {entry['layout'][entry['nonfinite']][0]}" for entry in everyone if entry["nonfinite"] >= 0
    ]
    if culprits:
        return RanksDisagreeError(
            "LocalSGD/ParameterAverager: non-finite values (NaN or Inf) before averaging (check_finite=True): "
            + "; ".join(culprits)
            + ". Nothing was averaged."
        )
    return RanksDisagreeError(
        "LocalSGD/ParameterAverager: the ranks' fingerprints differ but their descriptions agree (report this). "
        "Nothing was averaged."
    )


def confirm_across_world(group: dist.ProcessGroup, outcome: Optional[BaseException]) -> None:
    """After a check within `group`, one of several groups of replicas (a sharded model's ranks holding
    one shard): the ranks of the other groups train alongside this one (FSDP's collectives within each
    replica), so if this group refused to start they would wait on it until the timeout. A gather over
    the world tells every rank; `outcome` (this rank's error, None when it passed) is raised here, and
    ranks that passed raise a `RanksDisagreeError` naming the ranks that did not."""
    if isinstance(outcome, RuntimeError) and not isinstance(outcome, RanksDisagreeError):
        raise outcome  # a lost rank: the world gather would only wait for it too
    if dist.get_world_size(group) == dist.get_world_size():
        if outcome is not None:
            raise outcome
        return
    mine = None if outcome is None else f"{type(outcome).__name__}: {outcome}"
    everyone = gather(world_group(), {"rank": dist.get_rank(), "error": mine})
    if outcome is not None:
        raise outcome
    failed = [entry for entry in everyone if entry["error"]]
    if failed:
        raise RanksDisagreeError(
            f"LocalSGD: the replicas of another shard could not start averaging, so this rank (rank {dist.get_rank()}, "
            "whose own replicas agree) stops too: "
            + "; ".join(f"rank {entry['rank']}: {entry['error']}" for entry in failed[:2])
            + (f"; and {len(failed) - 2} more ranks" if len(failed) > 2 else "")
        )


def fail_together(group: dist.ProcessGroup, error: BaseException) -> None:
    """For a rank that failed before its averager could take part (e.g. a parameter refused while
    planning): joins the agreement check as failed, so that the others raise at once naming this rank
    and its error, instead of waiting out the group's timeout; then raises `error` here."""
    try:
        _C.join_agreement_check_as_failed(group, status_device(group, []))
        gather(group, {"rank": process_rank(group), "error": f"{type(error).__name__}: {error}"})
    except RuntimeError:
        pass  # the others are gone too; this rank's own error is the one to report
    raise error
