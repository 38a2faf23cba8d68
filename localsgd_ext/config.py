"""Every option of `LocalSGD`, validated once, in one frozen object: what the averagers are built with
(`AveragingOptions`), when they run (`SyncSchedule`), what travels (the wire) and what happens around an
average (the outer step, buffers). `LocalSGD` builds one from its arguments; `SyncController` reads it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from .diloco import OuterOptimizerOption, check_anchor_device, resolve_outer_optimizer
from .hierarchy import check_levels
from .options import AveragingOptions, check_bool, check_int_at_least
from .quantized_wire import DEFAULT_BLOCK_SIZE, WIRES
from .schedule import SyncSchedule

__all__ = ["LocalSGDConfig", "FLOAT_WIRES", "WIRE_NAMES", "MERGES"]

# How a sync's result meets what each rank learned while it was on the wire (docs/options.md, merge).
MERGES = ("eager", "streaming")

# The float wires: what the parameters travel as (cast inside the compiled pack); comm_dtype is their alias.
FLOAT_WIRES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WIRE_NAMES = tuple(FLOAT_WIRES) + tuple(WIRES)


def check_local_sgd_steps(local_sgd_steps, enabled: bool) -> Optional[int]:
    # Accelerate's own example passes local_sgd_steps=None together with enabled=False.
    if local_sgd_steps is None and not enabled:
        return None
    # A whole float (8.0, from a YAML or JSON config) counts as Accelerate's `num_steps % 8.0` does.
    if isinstance(local_sgd_steps, float) and local_sgd_steps.is_integer():
        local_sgd_steps = int(local_sgd_steps)
    return check_int_at_least(
        "local_sgd_steps", local_sgd_steps, 1, " (or a whole float such as 8.0; None only with enabled=False)"
    )


def _resolve_wire(wire, comm_dtype):
    """(the wire's name, the float wire's comm_dtype or None) from `wire` and its alias `comm_dtype`."""
    if wire is not None and wire not in WIRE_NAMES:
        raise ValueError(f"wire must be None or one of {WIRE_NAMES}, got {wire!r}")
    if wire is None:
        names = {dtype: name for name, dtype in FLOAT_WIRES.items()}
        return names.get(comm_dtype, "fp32"), comm_dtype
    if wire in FLOAT_WIRES:
        if comm_dtype is not None and comm_dtype != FLOAT_WIRES[wire]:
            raise ValueError(
                f"wire={wire!r} and comm_dtype={comm_dtype} disagree; pass one of them (comm_dtype=torch.bfloat16 is "
                'wire="bf16", comm_dtype=torch.float16 is wire="fp16")'
            )
        return wire, FLOAT_WIRES[wire]
    if comm_dtype is not None:
        raise ValueError(f"wire={wire!r} replaces the float wire: it needs comm_dtype=None, got comm_dtype={comm_dtype}")
    return wire, None


@dataclasses.dataclass(frozen=True)
class LocalSGDConfig:
    """`LocalSGD`'s keyword options (documented there), checked when built. `local_sgd_steps` is None
    only when Local SGD was disabled; then no schedule is built and the cadence options go unchecked
    against it. Derived, read-only: `averaging` (what each fragment's averager is built with: zero-copy
    only where every sync can run in place), `flat_layout` (zero_copy with syncs that stage: a layout-only
    zero-copy engine keeps the parameters in flat buffers), `schedule`, `outer_optimizer_factory`,
    `quantized`."""

    local_sgd_steps: Optional[int]
    bucket_cap_mb: float = 25
    check_finite: bool = False
    zero_copy: bool = False
    comm_dtype: Optional[torch.dtype] = None
    outer_optimizer: OuterOptimizerOption = None
    outer_anchor_device: str = "device"
    sync_buffers: bool = False
    warmup_steps: int = 0
    sync_delay: int = 0
    num_fragments: int = 1
    wire: Optional[str] = None
    error_feedback: bool = False
    wire_block_size: int = DEFAULT_BLOCK_SIZE
    hierarchy: Optional[Mapping[int, int]] = None
    merge: str = "eager"
    fragment_update_alpha: float = 0.0
    # Not an option: whether warm-up averages the parameters every step because nothing (no DDP) syncs
    # the gradients across the replicas; LocalSGD sets it from the model.
    warmup_by_averaging: bool = False
    # Not an option: whether the syncs run in a torchft Manager's quorum (LocalSGD's `manager`).
    fault_tolerant: bool = False

    averaging: AveragingOptions = dataclasses.field(init=False)
    flat_layout: bool = dataclasses.field(init=False)
    schedule: Optional[SyncSchedule] = dataclasses.field(init=False)
    outer_optimizer_factory: Optional[Callable[[List[torch.Tensor]], torch.optim.Optimizer]] = dataclasses.field(init=False)

    def _set(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __post_init__(self):
        self._check_merge_options()
        wire, comm_dtype = _resolve_wire(self.wire, self.comm_dtype)
        check_bool("zero_copy", self.zero_copy)
        sync_delay = check_int_at_least("sync_delay", self.sync_delay, 0)
        # A sync that casts, quantizes or snapshots needs staging buffers; with zero_copy the parameters
        # still live in flat buffers (kept by a layout-only engine) and such syncs stage from them.
        staged = comm_dtype is not None or wire in WIRES or sync_delay > 0
        averaging = AveragingOptions(
            bucket_cap_mb=self.bucket_cap_mb,
            check_finite=self.check_finite,
            zero_copy=self.zero_copy and not staged,
            comm_dtype=comm_dtype,
        )
        self._set(
            flat_layout=self.zero_copy and staged,
            wire=wire,
            comm_dtype=comm_dtype,
            averaging=averaging,
            bucket_cap_mb=averaging.bucket_cap_mb,
            outer_optimizer_factory=resolve_outer_optimizer(self.outer_optimizer),
            outer_anchor_device=check_anchor_device(self.outer_anchor_device),
            sync_buffers=check_bool("sync_buffers", self.sync_buffers),
            warmup_steps=check_int_at_least("warmup_steps", self.warmup_steps, 0),
            sync_delay=sync_delay,
            num_fragments=check_int_at_least("num_fragments", self.num_fragments, 1),
        )
        schedule = None
        levels: Optional[Dict[int, int]] = None
        if self.local_sgd_steps is not None:
            if self.hierarchy is not None:
                levels = check_levels(self.hierarchy, self.local_sgd_steps)
            schedule = SyncSchedule(
                self.local_sgd_steps,
                warmup_steps=self.warmup_steps,
                num_fragments=self.num_fragments,
                sync_delay=self.sync_delay,
                levels=levels or {},
                advance_midway=wire in WIRES,
                warmup_by_averaging=self.warmup_by_averaging,
                streaming=self.merge == "streaming",
            )
        self._set(schedule=schedule, hierarchy=levels)
        self._check_quantized_wire_options()
        self._check_fault_tolerant_options()

    def _check_merge_options(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        alpha = self.fragment_update_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"fragment_update_alpha must be a number between 0 and 1, got {alpha!r}")
        if alpha != 0 and self.merge != "streaming":
            raise ValueError(
                "fragment_update_alpha is the streaming merge's share of local progress kept: it needs "
                f'merge="streaming", got fragment_update_alpha={alpha!r} with merge={self.merge!r}'
            )
        self._set(fragment_update_alpha=float(alpha))

    def _check_fault_tolerant_options(self) -> None:
        # The levels would need groups of their own inside each quorum; a replica group of several processes
        # is already a lower level (its DDP averages gradients every step).
        if self.fault_tolerant and self.hierarchy is not None:
            raise NotImplementedError(
                f"LocalSGD with manager= (torchft) does not support hierarchy yet, got hierarchy={self.hierarchy!r}: "
                "use it without a manager, or replica groups of several DDP processes (with a manager: every wire, "
                "fragments, sync_delay, zero_copy, sync_buffers and the outer step)"
            )

    @property
    def streaming_alpha(self) -> Optional[float]:
        """`fragment_update_alpha` with the streaming merge; None with the eager one."""
        return self.fragment_update_alpha if self.merge == "streaming" else None

    def _check_quantized_wire_options(self) -> None:
        check_bool("error_feedback", self.error_feedback)
        self._set(wire_block_size=check_int_at_least("wire_block_size", self.wire_block_size, 1))
        if self.wire == "int4" and self.wire_block_size % 2:
            raise ValueError(
                f'wire="int4" packs two codes per byte within a block: wire_block_size must be even, got {self.wire_block_size}'
            )
        if not self.quantized:
            if self.error_feedback or self.wire_block_size != DEFAULT_BLOCK_SIZE:
                raise ValueError(
                    'error_feedback and wire_block_size need wire="int8", "fp8" or "int4", got '
                    f"error_feedback={self.error_feedback}, wire_block_size={self.wire_block_size} with wire={self.wire!r}"
                )

    @property
    def wire_name(self) -> str:
        """The wire's name, resolved on construction (`wire` None with `comm_dtype` None is "fp32")."""
        assert self.wire is not None
        return self.wire

    @property
    def quantized(self) -> bool:
        """Whether the wire is a quantized one (its own averager), not a float wire (the engine's cast)."""
        return self.wire in WIRES

    def agreement_settings(self) -> Dict[str, object]:
        """What every rank must share beyond the averager's own options, checked at every sync: when it
        syncs, and what it does around the average."""
        return {
            "local_sgd_steps": self.local_sgd_steps,
            "warmup_steps": self.warmup_steps,
            "outer_optimizer": self.outer_optimizer_factory is not None,
            "sync_buffers": self.sync_buffers,
            "sync_delay": self.sync_delay,
            "num_fragments": self.num_fragments,
            "wire": self.wire,
            "hierarchy": self.hierarchy,
            "merge": self.merge,
            "fragment_update_alpha": self.fragment_update_alpha,
        }

    def settings_to_agree_on(self) -> Dict[str, object]:
        """Everything checked on enter, before any group is created."""
        return {
            **self.averaging.settings(),
            "zero_copy": self.zero_copy,  # as asked: the averagers' own option is off where syncs stage
            **self.agreement_settings(),
            "error_feedback": self.error_feedback,
            "wire_block_size": self.wire_block_size,
            "outer_anchor_device": self.outer_anchor_device,
            "warmup_by_averaging": self.warmup_by_averaging,
        }
