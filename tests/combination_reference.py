"""A pure-Python reference of LocalSGD's documented semantics (docs/options.md), simulating every rank in
one process: which steps sync which fragment and level, what a waited sync, a delayed merge, the outer
step, the buffers' sync and the exit do. Written from the documentation, independent of the engine: it
uses neither localsgd_ext's schedule nor its averagers.

The inputs are dyadic (multiples of 1/8, small): sums and means of them are exact in float32 whatever the
order of summation, so float32 results must match the reference bit for bit.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch

# Each option of the combination test at the value it is tested with (local_sgd_steps 4, 4 ranks).
AXES: Dict[str, dict] = {
    "sync_delay": {"sync_delay": 1},
    "num_fragments": {"num_fragments": 2},
    "int8": {"wire": "int8"},
    "fp8": {"wire": "fp8"},
    "int4": {"wire": "int4"},
    "bf16": {"wire": "bf16"},
    "hierarchy": {"hierarchy": {2: 1}},
    "outer_optimizer": {"outer_optimizer": "diloco"},
    "zero_copy": {"zero_copy": True},
    "sync_buffers": {"sync_buffers": True},
    "warmup_steps": {"warmup_steps": 2},
    "error_feedback": {"error_feedback": True},  # on the int8 wire, unless the pair names fp8
}
WIRES = ("int8", "fp8", "int4", "bf16")
# Beyond the pairs: Streaming DiLoCo's merge (docs/options.md, merge), as tokens a case may also name:
# "streaming" (merge="streaming"), "alpha=<a>" (fragment_update_alpha=a); and "steps=<n>", a run of n steps
# instead of STEPS.
STREAMING_TOKENS: Dict[str, dict] = {"streaming": {"merge": "streaming"}}
LOCAL_SGD_STEPS = 4
STEPS = 10
WORLD_SIZE = 4

# The pairs that are refused, each with the row of docs/options.md's refusal table that says why: none
# of these options' pairs is (the table's rows are about other models, backends and cadences).
REFUSED: Dict[frozenset, tuple] = {}


def pairs() -> List[tuple]:
    """Every pair of axes that names two settings (two wires, or error feedback with the bf16 wire, are
    one setting of one axis: skipped)."""
    chosen = []
    for a, b in itertools.combinations(AXES, 2):
        if {a, b} <= set(WIRES) or {a, b} == {"error_feedback", "bf16"}:
            continue
        chosen.append((a, b))
    return chosen


def options_of(case: Sequence[str]) -> dict:
    options: dict = {}
    for axis in case:
        if axis.startswith("steps="):
            continue
        if axis.startswith("alpha="):
            options["fragment_update_alpha"] = float(axis.split("=", 1)[1])
        else:
            options.update(AXES.get(axis) or STREAMING_TOKENS[axis])
    if options.get("error_feedback") and "wire" not in options:
        options["wire"] = "int8"
    return options


def steps_of(case: Sequence[str]) -> int:
    """The steps a case runs before its exit."""
    named = [int(axis.split("=", 1)[1]) for axis in case if axis.startswith("steps=")]
    return named[0] if named else STEPS


def move(rank: int, step: int, index: int, shape) -> torch.Tensor:
    """What rank `rank` adds to tensor `index` before its `step`-th `step()`: multiples of 1/8 in [-1/4, 1/4]."""
    generator = torch.Generator().manual_seed(100_000 * rank + 100 * step + index)
    return torch.randint(-2, 3, tuple(shape), generator=generator).float() / 8


def mover_of(rank: int, step: int, in_step: bool) -> int:
    """Whose moves rank `rank` makes at `step`: its own, or rank 0's while DDP keeps the ranks in step."""
    return 0 if in_step else rank


def initial(index: int, shape) -> torch.Tensor:
    """Every rank's starting value of tensor `index`: multiples of 1/8 in [-1, 1]."""
    generator = torch.Generator().manual_seed(7 + index)
    return torch.randint(-8, 9, tuple(shape), generator=generator).float() / 8


def fragment_cuts(sizes: Sequence[int], parts: int) -> List[int]:
    """Contiguous groups of about equal bytes, each cut where the running count is nearest an equal share,
    every group keeping at least one tensor (docs/options.md, num_fragments)."""
    prefix = list(itertools.accumulate(sizes, initial=0))
    cuts = [0]
    for k in range(1, parts):
        target = prefix[-1] * k / parts
        candidates = range(cuts[-1] + 1, len(sizes) - (parts - k) + 1)
        cuts.append(min(candidates, key=lambda c: (abs(prefix[c] - target), c)))
    return cuts + [len(sizes)]


class Reference:
    """Every rank's parameters and buffers through `steps` steps and the exit, as documented."""

    def __init__(
        self,
        options: dict,
        params: List[torch.Tensor],
        float_buffers: List[torch.Tensor],
        int_buffers: int,
        world: int = WORLD_SIZE,
        warmup_by_averaging: bool = False,
    ):
        self.world = world
        # Warm-up: DDP's gradient all-reduce keeps the ranks identical (the workers then move every rank
        # alike, as rank 0) and nothing is averaged; without DDP (FSDP2 replicas) every step averages.
        self.warmup_by_averaging = warmup_by_averaging
        self.k = LOCAL_SGD_STEPS
        self.fragments = options.get("num_fragments", 1)
        self.delay = options.get("sync_delay", 0)
        self.warmup = options.get("warmup_steps", 0)
        self.levels: Dict[int, int] = dict(options.get("hierarchy") or {})
        self.outer = options.get("outer_optimizer") == "diloco"
        # The streaming merge: started `delay` steps before the boundary, merged at it as
        # lerp(result, own values, alpha); with no delay, at the boundary the same way.
        self.streaming = options.get("merge") == "streaming"
        self.alpha = options.get("fragment_update_alpha", 0.0)
        self.sync_buffers = options.get("sync_buffers", False)
        self.params = [[p.clone() for p in params] for _ in range(self.world)]
        self.float_buffers = [[b.clone() for b in float_buffers] for _ in range(self.world)]
        self.int_buffers = [[0] * int_buffers for _ in range(self.world)]
        cuts = fragment_cuts([p.numel() * 4 for p in params], self.fragments)
        self.fragment_indices = [range(cuts[f], cuts[f + 1]) for f in range(self.fragments)]
        self.anchor = [p.clone() for p in params]
        self.momentum: List[Optional[torch.Tensor]] = [None] * len(params)
        self.in_flight: Optional[tuple] = None  # (fragment, merge step, each rank's snapshot)
        self.synced_at: List[Optional[int]] = [None] * self.fragments
        self.sync_count = 0
        self.level_sync_counts = dict.fromkeys(self.levels, 0)

    def _mean(self, values: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).sum(0) / len(values)

    def _outer_step(self, i: int, mean: torch.Tensor) -> torch.Tensor:
        """DiLoCo's outer step on the anchor (SGD, lr 0.7, momentum 0.9, Nesterov), the mean as its target."""
        gradient = self.anchor[i] - mean
        buffer = self.momentum[i]
        buffer = gradient.clone() if buffer is None else buffer * 0.9 + gradient
        self.momentum[i] = buffer
        self.anchor[i] = self.anchor[i] - 0.7 * (gradient + 0.9 * buffer)
        return self.anchor[i].clone()

    def _waited(self, fragment: int, step: int, lerp: bool = False) -> None:
        """With `lerp` (the streaming merge at a scheduled step), each rank keeps `alpha` of its own values."""
        for i in self.fragment_indices[fragment]:
            target = self._mean([self.params[r][i] for r in range(self.world)])
            if self.outer:
                target = self._outer_step(i, target)
            for r in range(self.world):
                self.params[r][i] = torch.lerp(target, self.params[r][i], self.alpha) if lerp else target.clone()
        if not lerp or self.alpha == 0:
            self.synced_at[fragment] = step
        self.sync_count += 1

    def _start(self, fragment: int, step: int) -> None:
        snapshot = {(r, i): self.params[r][i].clone() for r in range(self.world) for i in self.fragment_indices[fragment]}
        self.in_flight = (fragment, step + self.delay, snapshot)

    def _merge(self, step: int) -> None:
        assert self.in_flight is not None
        fragment, _, snapshot = self.in_flight
        self.in_flight = None
        for i in self.fragment_indices[fragment]:
            target = self._mean([snapshot[(r, i)] for r in range(self.world)])
            if self.outer:
                target = self._outer_step(i, target)
            for r in range(self.world):
                if self.streaming:
                    self.params[r][i] = torch.lerp(target, self.params[r][i], self.alpha)
                else:
                    self.params[r][i] = self.params[r][i] + (target - snapshot[(r, i)])
        if self.streaming and self.alpha == 0:
            self.synced_at[fragment] = step  # every rank holds the result: nothing changed since
        self.sync_count += 1

    def _sync(self, fragments: List[int], step: int, delayed: bool, lerp: bool = False) -> None:
        for fragment in fragments:
            if delayed:
                self._start(fragment, step)
            else:
                self._waited(fragment, step, lerp)
        if self.sync_buffers and fragments and fragments[-1] == self.fragments - 1:
            for j in range(len(self.float_buffers[0])):
                mean = self._mean([self.float_buffers[r][j] for r in range(self.world)])
                for r in range(self.world):
                    self.float_buffers[r][j] = mean.clone()
            for r in range(self.world):
                self.int_buffers[r] = list(self.int_buffers[0])

    def _level(self, size: int) -> None:
        for first in range(0, self.world, size):
            group = range(first, first + size)
            for i in range(len(self.params[0])):
                mean = self._mean([self.params[r][i] for r in group])
                for r in group:
                    self.params[r][i] = mean.clone()
        self.level_sync_counts[size] += 1

    def step(self, step: int) -> None:
        in_step = step <= self.warmup and not self.warmup_by_averaging
        for r in range(self.world):
            mover = mover_of(r, step, in_step)
            for i, p in enumerate(self.params[r]):
                self.params[r][i] = p + move(mover, step, i, p.shape)
            for j, b in enumerate(self.float_buffers[r]):
                self.float_buffers[r][j] = b + move(mover, step, 1000 + j, b.shape)
            self.int_buffers[r] = [step * (mover + 1) + j for j in range(len(self.int_buffers[r]))]
        if step <= self.warmup:
            if self.warmup_by_averaging:
                self._sync(list(range(self.fragments)), step, delayed=False)
            elif step == self.warmup:
                self.anchor = [p.clone() for p in self.params[0]]  # the anchors start from here
            return
        merged = self.in_flight is not None and self.in_flight[1] == step
        if merged:
            self._merge(step)
        since = step - self.warmup
        stride = self.k // self.fragments
        if self.streaming and self.delay > 0:
            boundary = since + self.delay
            if boundary % stride == 0:
                self._sync([(boundary // stride - 1) % self.fragments], step, delayed=True)
                return
            if merged:
                return  # the boundary is the world's step: no level average
        elif since % stride == 0:
            lerp = self.streaming and self.alpha > 0
            self._sync([(since // stride - 1) % self.fragments], step, delayed=self.delay > 0, lerp=lerp)
            return
        due = [size for size, period in self.levels.items() if since % period == 0]
        if due:
            self._level(max(due))

    def exit(self, step: int) -> None:
        if self.in_flight is not None:
            self._merge(step)
        fragments = list(range(self.fragments))
        if self.outer:
            fragments = [f for f in fragments if self.synced_at[f] != step]
        self._sync(fragments, step, delayed=False)
