"""Hierarchical averaging (as torch's `HierarchicalModelAverager`): besides the every-`local_sgd_steps`
average over all ranks, smaller groups of consecutive ranks (e.g. the ranks of one node) average more
often, over cheaper links. Each level is a torch.distributed subgroup (`new_subgroups`) and is averaged
by the same engine."""

from __future__ import annotations

import datetime
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from .consistency import world_group
from .options import check_int_at_least

__all__ = ["Hierarchy", "check_levels", "group_timeout"]


def group_timeout(group: dist.ProcessGroup) -> Optional[datetime.timedelta]:
    """The timeout `group`'s collectives give up after (as given to `init_process_group` or `new_group`),
    read from its backend; None (torch's default) for a backend that does not say."""
    for device_type in getattr(group, "_device_types", ()):
        try:
            return group._get_backend(torch.device(device_type)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def check_levels(levels: Mapping[int, int], local_sgd_steps: int) -> Dict[int, int]:
    """`{group_size: period}` checked (group sizes >= 2, periods >= 1 and below `local_sgd_steps`), sorted
    by group size."""
    if not isinstance(levels, Mapping) or not levels:
        raise TypeError(f"hierarchy must be a non-empty mapping {{group_size: period}}, got {levels!r}")
    checked: Dict[int, int] = {}
    # Each key and period checked before sorting, which would compare a bad key with the others first.
    for group_size, period in levels.items():
        group_size = check_int_at_least("hierarchy group size", group_size, 2)
        period = check_int_at_least(f"hierarchy[{group_size}] (the period)", period, 1)
        if period >= local_sgd_steps:
            raise ValueError(
                f"hierarchy[{group_size}] (the period) must be below local_sgd_steps (the world's period), got "
                f"{period} with local_sgd_steps={local_sgd_steps}"
            )
        checked[group_size] = period
    return dict(sorted(checked.items()))


class Hierarchy:
    """The levels below the world: `{group_size: period}`, e.g. `{4: 2}` averages each group of 4
    consecutive ranks (ranks 0-3, 4-7, ...) every 2 steps. At a step where several are due, only the
    largest group averages (its average covers the smaller ones'); at the world's steps (every
    `local_sgd_steps`, and during warm-up) only the world does.

    Args:
        levels (`Mapping[int, int]`):
            Group size (>= 2, dividing the world size, below it) to period in steps (>= 1, below
            `local_sgd_steps`).
        local_sgd_steps (`int`):
            The world's period.
    """

    def __init__(self, levels: Mapping[int, int], local_sgd_steps: int):
        self.levels: Dict[int, int] = check_levels(levels, local_sgd_steps)
        self.groups: Dict[int, dist.ProcessGroup] = {}

    def build_groups(self, replicas: Optional[dist.ProcessGroup] = None) -> None:
        """Creates each level's subgroups: a collective, every rank must call it at the same point. With
        `replicas` (this rank's group of replicas, one of several that partition the world, e.g. the
        ranks holding one shard of a sharded model), each level groups consecutive members of every
        such group instead of consecutive ranks of the world."""
        if self.groups:
            return
        # A level's collectives give up as the group it was carved from does, not after torch's default
        # 30 minutes: a stalled peer must fail its partners as soon as it fails everyone else.
        timeout = group_timeout(replicas if replicas is not None else world_group())
        if replicas is None:
            world_size = dist.get_world_size()
            self._check_divides(world_size, f"the world size and be below it, got a world of {world_size} ranks")
            for group_size in self.levels:
                self.groups[group_size], _ = dist.new_subgroups(group_size=group_size, timeout=timeout)
            return
        everyone: List[List[int]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, dist.get_process_group_ranks(replicas))
        replica_groups = sorted({tuple(ranks) for ranks in everyone})
        sizes = sorted({len(ranks) for ranks in replica_groups})
        if len(sizes) != 1 or sum(len(ranks) for ranks in replica_groups) != len(everyone):
            raise ValueError(
                "hierarchy with process_group needs the ranks' groups of replicas to partition the world into groups of "
                f"one size, got {[list(ranks) for ranks in replica_groups]}"
            )
        self._check_divides(sizes[0], f"the number of replicas and be below it, got {sizes[0]} replicas")
        for group_size in self.levels:
            subgroups = [list(ranks[i : i + group_size]) for ranks in replica_groups for i in range(0, len(ranks), group_size)]
            self.groups[group_size], _ = dist.new_subgroups_by_enumeration(subgroups, timeout=timeout)

    def _check_divides(self, total: int, what: str) -> None:
        for group_size in self.levels:
            if group_size >= total or total % group_size != 0:
                raise ValueError(f"hierarchy group size {group_size} must divide {what}")
