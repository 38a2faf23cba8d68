"""When each average runs: a pure function from the step count to the actions due at that step.

The axes are warm-up (every step syncs every fragment), fragments (after warm-up one fragment every
`local_sgd_steps / num_fragments` steps, in turn; Streaming DiLoCo), delay (a sync started at one step is
merged `sync_delay` steps later: started at the fragment's boundary with the eager merge, or `sync_delay`
steps before it and merged at it with the streaming merge, as torchft and the Streaming DiLoCo paper
time it) and the levels below the world (`hierarchy`: groups of consecutive ranks
averaging between the world's syncs; the world is the last level, as in torch's
`HierarchicalModelAverager`). Nothing here touches a tensor or a process group: `SyncController` carries
the actions out, and tests/test_schedule.py checks them as a table.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple, Union

__all__ = ["Merge", "Advance", "Sync", "LevelAverage", "EndWarmUp", "Action", "SyncSchedule"]


@dataclasses.dataclass(frozen=True)
class Merge:
    """Complete the delayed sync of `fragment` (started `sync_delay` steps ago) and merge its result."""

    fragment: int


@dataclasses.dataclass(frozen=True)
class Advance:
    """Put the second half of `fragment`'s delayed quantized sync (its all_gather) on the wire."""

    fragment: int


@dataclasses.dataclass(frozen=True)
class Sync:
    """The world's sync of `fragments`, in order: waited for, or (`delayed`) started and merged later.
    `final`: the exit sync, which averages what the loop left (the controller may skip a fragment whose
    outer step just ran)."""

    fragments: Tuple[int, ...]
    delayed: bool = False
    final: bool = False


@dataclasses.dataclass(frozen=True)
class LevelAverage:
    """A plain average within each group of `group_size` consecutive ranks (a level below the world)."""

    group_size: int


@dataclasses.dataclass(frozen=True)
class EndWarmUp:
    """Warm-up by gradient all-reduce is over: switch gradient sync off (`no_sync`) and take the anchors
    from the parameters, which DDP kept identical on every rank."""


Action = Union[Merge, Advance, Sync, LevelAverage, EndWarmUp]


@dataclasses.dataclass(frozen=True)
class SyncSchedule:
    """The sync cadence of one `LocalSGD`, checked where it is built.

    Args:
        local_sgd_steps (`int`): each fragment's period after warm-up, in steps.
        warmup_steps (`int`, defaults to 0): steps before Local SGD starts. With `warmup_by_averaging`
            each of them syncs every fragment, waited for; otherwise DDP's gradient all-reduce keeps the
            ranks together meanwhile (post-local SGD) and the last of them ends warm-up (`EndWarmUp`).
        num_fragments (`int`, defaults to 1): fragments syncing in turn; must divide `local_sgd_steps`.
        sync_delay (`int`, defaults to 0): steps between a sync's start and its merge; below
            `local_sgd_steps / num_fragments`, so that one sync at most is in flight.
        levels (`Mapping[int, int]`, defaults to none): `{group_size: period}` below the world, periods
            counted from the end of warm-up. At a step where several are due only the largest averages,
            and at the world's steps only the world.
        advance_midway (`bool`, defaults to `False`): a delayed sync in two halves (the quantized wire's
            all_to_all, then its all_gather), the second started midway through the delay.
        warmup_by_averaging (`bool`, defaults to `False`): warm up by averaging the parameters after
            every step, for models whose gradients nothing syncs across the replicas (FSDP2 within each
            replica).
        streaming (`bool`, defaults to `False`): a delayed sync starts `sync_delay` steps before its
            fragment's boundary and is merged at it (`merge="streaming"`), instead of starting at the
            boundary and merging `sync_delay` steps after it (`merge="eager"`).
    """

    local_sgd_steps: int
    warmup_steps: int = 0
    num_fragments: int = 1
    sync_delay: int = 0
    levels: Mapping[int, int] = dataclasses.field(default_factory=dict)
    advance_midway: bool = False
    warmup_by_averaging: bool = False
    streaming: bool = False

    def __post_init__(self):
        if self.local_sgd_steps % self.num_fragments != 0:
            raise ValueError(
                "local_sgd_steps must be a multiple of num_fragments (each fragment syncs every local_sgd_steps "
                f"steps, one every local_sgd_steps / num_fragments), got local_sgd_steps={self.local_sgd_steps}, "
                f"num_fragments={self.num_fragments}"
            )
        if self.sync_delay >= self.stride:
            raise ValueError(
                "sync_delay must be below local_sgd_steps / num_fragments (one average in flight at a time), got "
                f"sync_delay={self.sync_delay} with local_sgd_steps={self.local_sgd_steps}, "
                f"num_fragments={self.num_fragments}"
            )
        levels: Dict[int, int] = dict(sorted(self.levels.items()))
        object.__setattr__(self, "levels", levels)

    @property
    def stride(self) -> int:
        """Steps between two syncs after warm-up (each of a different fragment)."""
        return self.local_sgd_steps // self.num_fragments

    def _world_fragment_after_warmup(self, step: int) -> Optional[int]:
        """The fragment the world syncs at `step` (past warm-up), or None."""
        since_warmup = step - self.warmup_steps
        if since_warmup <= 0 or since_warmup % self.stride != 0:
            return None
        return (since_warmup // self.stride - 1) % self.num_fragments

    def _started_delayed(self, step: int) -> Optional[int]:
        """The fragment whose delayed sync starts at `step`, or None."""
        if self.sync_delay == 0:
            return None
        return self._world_fragment_after_warmup(step + self.sync_delay if self.streaming else step)

    def actions(self, step: int) -> Tuple[Action, ...]:
        """What runs after the `step`-th call of `step()` (counted from 1), in order."""
        if step <= self.warmup_steps:
            if self.warmup_by_averaging:
                return (Sync(tuple(range(self.num_fragments))),)
            return (EndWarmUp(),) if step == self.warmup_steps else ()
        actions: Tuple[Action, ...] = ()
        if self.sync_delay > 0:
            merging = self._started_delayed(step - self.sync_delay)
            midway = (self.sync_delay + 1) // 2
            if merging is not None:
                actions += (Merge(merging),)
            elif self.advance_midway and midway < self.sync_delay:
                advancing = self._started_delayed(step - midway)
                if advancing is not None:
                    actions += (Advance(advancing),)
        fragment = self._started_delayed(step) if self.sync_delay > 0 else self._world_fragment_after_warmup(step)
        if fragment is not None:
            return actions + (Sync((fragment,), delayed=self.sync_delay > 0),)
        # A streaming merge is at the fragment's boundary, which belongs to the world as a sync step does.
        world_boundary = self.streaming and any(isinstance(action, Merge) for action in actions)
        due = [size for size, period in self.levels.items() if (step - self.warmup_steps) % period == 0]
        if due and not world_boundary:
            actions += (LevelAverage(max(due)),)
        return actions

    def in_flight_after(self, step: int) -> Optional[int]:
        """The fragment whose delayed sync is still in flight after `step`'s actions, or None."""
        for started in range(max(step - self.sync_delay + 1, 1), step + 1):
            fragment = self._started_delayed(started)
            if fragment is not None:
                return fragment
        return None

    def exit_actions(self, step: int) -> Tuple[Action, ...]:
        """What the end of the loop runs after `step` steps: the merge of a sync still in flight, then a
        waited sync of every fragment (Accelerate's exit average)."""
        in_flight = self.in_flight_after(step)
        merge: Tuple[Action, ...] = () if in_flight is None else (Merge(in_flight),)
        return merge + (Sync(tuple(range(self.num_fragments)), final=True),)
