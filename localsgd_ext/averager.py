"""`ParameterAverager`: the compiled averaging engine for plain torch.distributed users."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, cast

import torch
import torch.distributed as dist

from . import _C
from .averager_interface import streaming_merge
from .consistency import (
    RanksDisagreeError,
    describe,
    digest,
    explain,
    gather,
    group_backend,
    process_rank,
    settings_fingerprint,
    status_device,
    world_group,
)
from .options import AveragingOptions
from .sharded import FsdpShardAliases, is_sharded, local_tensors, local_tensors_and_replica_group, shaped_like_parameters

__all__ = ["ParameterAverager"]

# Backends whose all_reduce implements ReduceOp.AVG for floating-point tensors, both bit-identical to
# Accelerate's `all_reduce(SUM); t /= world_size` on CPU. NCCL divides inside its kernel, for free. gloo
# computes SUM and then divides in a separate pass over the buffer: in copy mode that pass is better
# fused into the unpack (the same division, so the same bits), in zero-copy mode there is no unpack.
_BACKENDS_WITH_AVG = ("gloo", "nccl")
_BACKENDS_WITH_FREE_AVG = ("nccl",)
# Copy mode: staging buffers per device. Two already overlap packing with the wire; three measured the
# same on gloo (bench/pipeline_depth.py, bench/RESULTS.md) for 50% more memory.
_BUFFERS_IN_FLIGHT = 2


def _check_tensors(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors (e.g. model.parameters()), got a single Tensor")
    tensors = list(params)
    seen = set()
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"params[{i}] must be a dense (strided) tensor, got layout {t.layout}")
        if t.is_meta:
            raise ValueError(f"params[{i}] is on the meta device and has no data to average")
        if not t.is_floating_point():
            raise TypeError(f"params[{i}] must have a floating-point dtype to be averaged, got {t.dtype}")
        if id(t) in seen:
            raise ValueError(f"params[{i}] appears more than once; each tensor is averaged exactly once")
        seen.add(id(t))
    return tensors


class ParameterAverager:
    """
    Averages a fixed list of tensors across the processes of a group, in place, with the compiled engine.

    The tensors are grouped into buckets by device and dtype (each at most `bucket_cap_mb`, in the
    tensors' order; a larger tensor gets a bucket of its own). The plan is built once and rebuilt only
    when a tensor's size, dtype or device changes. Two modes:

    - Copy mode (default): a sync packs each bucket into a reusable flat buffer in one compiled pass,
      runs one all_reduce per bucket, and unpacks the mean back into the same tensors (same objects,
      same storage). The next bucket is packed while the previous one is on the wire. Extra memory is
      two buckets per device, whatever the model size.
    - Zero-copy mode (`zero_copy=True`): at construction, the tensors are moved into persistent flat
      buffers, one per bucket, and rebound as views of them, as `param.data = view` would do (same
      objects, new storage). A sync is then one in-place all_reduce per bucket and nothing else.
      Memory: while flattening, about one bucket above the model (each old storage is freed when its
      tensors are rebound, unless something else still holds it); afterwards no extra memory at all.
      Optimizers, DDP and `state_dict()`/`load_state_dict()` keep working, since the tensors stay the
      same objects. A tensor re-pointed later (`param.data = ...`, `module.to(...)`) is detected at the
      next sync, and all tensors are moved into fresh flat buffers before averaging. Tensors that share
      memory with each other are refused (flattening would untie them). DTensor parameters: their
      local tensors are moved, and FSDP2 is pointed at them (`sharded_model`).

    Every process of the group must call `average()` with the same list of tensors (same names,
    shapes and dtypes, same order) and the same settings, as with any collective. Each call first
    checks that they do, with one small all_reduce that covers everything deciding what goes on the
    wire (layout, names, bucket plan, wire dtype, reduce op, zero_copy, check_finite, the caller's
    `agreement_settings` and the layout of its `agreement_tensors`): ranks that differ all raise a
    `RanksDisagreeError` naming the first difference, instead of averaging the wrong numbers, hanging
    or crashing. A rank that fails to prepare (a tensor whose memory was freed, a staging allocation
    that failed) raises its own error, and the others a `RanksDisagreeError` naming it; nothing is
    averaged anywhere. A rank that died or stopped responding makes the others raise a `RuntimeError`
    within the group's timeout. Ctrl-C during a sync on CPU raises `KeyboardInterrupt` within about
    0.1 s; the averager is then unusable (its collectives were left in flight).

    Args:
        params (`Iterable[torch.Tensor]`):
            The tensors to average, e.g. `model.parameters()`. Floating-point, dense, not meta.
        process_group (`torch.distributed.ProcessGroup`, *optional*):
            The group to average over. Defaults to the default (world) group, looked up at each call
            so that no reference to it outlives `destroy_process_group()`.
        bucket_cap_mb (`float`, defaults to 25):
            Largest bucket, in MiB.
        reduce_op (`str`, defaults to `"auto"`):
            `"avg"`: the backend's ReduceOp.AVG divides. `"sum"`: ReduceOp.SUM, and the division by the
            group size is fused into the unpack (zero-copy mode: one division pass). `"auto"`: AVG on
            NCCL (free, inside its kernel); on gloo SUM with the fused division in copy mode, AVG in
            zero-copy mode; SUM elsewhere. All give the same bits on CPU.
        names (`Sequence[str]`, *optional*):
            A name per tensor for error messages (e.g. from `model.named_parameters()`); default
            `params[i]`.
        check_finite (`bool`, defaults to `False`):
            Before averaging, check every tensor for NaN and Inf; if any rank finds one, every rank
            raises a `RuntimeError` naming the rank and the tensor, and nothing is averaged. Costs one
            pass over the parameters per sync.
        zero_copy (`bool`, defaults to `False`):
            Move the tensors into persistent flat buffers now, so that a sync is only the in-place
            all_reduce (see above).
        comm_dtype (`torch.dtype`, *optional*):
            `torch.bfloat16` or `torch.float16`: float32 tensors travel in that dtype (half the bytes);
            pack casts them (round to nearest even), the all_reduce sums in that dtype, and unpack
            widens the sum to float32 and divides there. Other dtypes travel as they are. Copy mode
            only. The mean then carries the wire dtype's rounding: at most about `world_size * 2**-8`
            (bf16) times the mean magnitude of the ranks' values, per element. fp16 holds only
            magnitudes up to 65504 and flushes those below 6e-8 to zero, so for fp16 the ranks agree
            (within the check) on the largest |value| and scale every fp16 value by one power of two
            that brings it times the group size to at most 2**15: sums cannot overflow, and values
            down to about `2**-40 * world_size` times that largest one survive. In range, the bits
            are those of the unscaled computation. `check_finite` sees the float32 values; with the
            scale, finite values stay finite on the wire.
        agreement_settings (`Mapping[str, Any]`, *optional*):
            The caller's settings that every rank must share (e.g. a sync cadence), compared in the
            same check; a difference raises naming the setting. Values need a stable `repr`.
        agreement_tensors (`Sequence[Tuple[str, torch.Tensor]]`, *optional*):
            Named tensors synced alongside (e.g. buffers) whose layout (names, shapes, dtypes) every
            rank must share, compared in the same check at every sync.
        sharded_model (`torch.nn.Module`, *optional*):
            With DTensor parameters and `zero_copy`: the model that owns them. FSDP2 keeps a reference
            of its own to each shard's memory (what its all-gather reads), which is pointed at the flat
            buffers, after construction and whenever the tensors move again. Needs every FSDP2 shard
            unpadded (each sharded dimension divisible by the shard count) and no CPU offload.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        process_group: Optional[dist.ProcessGroup] = None,
        bucket_cap_mb: float = 25,
        *,
        reduce_op: str = "auto",
        names: Optional[Sequence[str]] = None,
        check_finite: bool = False,
        zero_copy: bool = False,
        comm_dtype: Optional[torch.dtype] = None,
        agreement_settings: Optional[Mapping[str, Any]] = None,
        agreement_tensors: Optional[Sequence[Tuple[str, torch.Tensor]]] = None,
        sharded_model: Optional[torch.nn.Module] = None,
    ):
        options = AveragingOptions(
            bucket_cap_mb=bucket_cap_mb,
            check_finite=check_finite,
            zero_copy=zero_copy,
            comm_dtype=comm_dtype,
            reduce_op=reduce_op,
        )
        self._setup(params, options, process_group, names, agreement_settings, agreement_tensors, sharded_model)

    @classmethod
    def with_options(
        cls,
        params: Iterable[torch.Tensor],
        options: AveragingOptions,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        names: Optional[Sequence[str]] = None,
        agreement_settings: Optional[Mapping[str, Any]] = None,
        agreement_tensors: Optional[Sequence[Tuple[str, torch.Tensor]]] = None,
        sharded_model: Optional[torch.nn.Module] = None,
    ) -> "ParameterAverager":
        """The same averager, from options already built and checked (as `LocalSGD` holds them)."""
        if not isinstance(options, AveragingOptions):
            raise TypeError(f"options must be an AveragingOptions, got {type(options).__name__}")
        averager = cls.__new__(cls)
        averager._setup(params, options, process_group, names, agreement_settings, agreement_tensors, sharded_model)
        return averager

    def _setup(self, params, options, process_group, names, agreement_settings, agreement_tensors, sharded_model) -> None:
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}")
        if sharded_model is not None and not isinstance(sharded_model, torch.nn.Module):
            raise TypeError(f"sharded_model must be a torch.nn.Module or None, got {sharded_model!r}")
        self.options = options
        self.params = _check_tensors(params)
        self.names = [f"params[{i}]" for i in range(len(self.params))] if names is None else list(names)
        if len(self.names) != len(self.params):
            raise ValueError(f"names must have one entry per tensor: got {len(self.names)} names for {len(self.params)} tensors")
        # What the engine reads and writes: the tensors themselves, or DTensors' local shards.
        self._tensors = self.params
        self._shard_aliases = None
        if is_sharded(self.params):
            self._tensors, process_group = local_tensors_and_replica_group(
                self.params, self.names, process_group, own_objects=options.zero_copy
            )
            if options.zero_copy:
                # Refuses what cannot alias before the engine moves anything.
                # sharded_model may be None here: FsdpShardAliases refuses it with the reason.
                self._shard_aliases = FsdpShardAliases(cast(torch.nn.Module, sharded_model), self.params, self.names)
        if agreement_settings is not None and not isinstance(agreement_settings, Mapping):
            raise TypeError(f"agreement_settings must be a mapping or None, got {type(agreement_settings).__name__}")
        self.process_group = process_group
        self.settings = {**options.settings(), **(agreement_settings or {})}
        self._settings_fingerprint = settings_fingerprint(self.settings, self.names)
        self.agreement_tensors = agreement_tensors
        self._engine = _C.BucketedAverager(
            self._tensors,
            options.bucket_cap_bytes,
            _BUFFERS_IN_FLIGHT,
            options.zero_copy,
            options.comm_dtype,
            self.names,
        )
        self._follow_moved_shards()

    def _follow_moved_shards(self) -> None:
        if self._shard_aliases is not None:
            self._shard_aliases.follow(self._tensors, self._engine.plans_built)

    @property
    def local_tensors(self) -> List[torch.Tensor]:
        """What a sync reads and writes: `params` themselves, or their local shards when they are DTensors."""
        return self._tensors

    # The options, as attributes of their own (read-only).
    bucket_cap_mb = property(lambda self: self.options.bucket_cap_mb)
    check_finite = property(lambda self: self.options.check_finite)
    zero_copy = property(lambda self: self.options.zero_copy)
    comm_dtype = property(lambda self: self.options.comm_dtype)
    reduce_op = property(lambda self: self.options.reduce_op)

    @property
    def agreement_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        """Named tensors whose layout every rank must share, checked with the parameters (may be reassigned)."""
        return self._agreement_tensors

    @agreement_tensors.setter
    def agreement_tensors(self, named_tensors: Optional[Sequence[Tuple[str, torch.Tensor]]]) -> None:
        named = list(named_tensors or [])
        for i, item in enumerate(named):
            is_pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            if not (is_pair and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"agreement_tensors[{i}] must be a (name, tensor) pair, got {item!r}")
        self._agreement_tensors = named
        self._agreement_tensor_list = [t for _, t in named]

    @property
    def buckets(self) -> List[dict]:
        """The current plan: per bucket, its `tensor_indices` into `params`, their element `offsets`,
        its `numel` (padding included) and `element_size`."""
        return self._engine.buckets()

    @property
    def staging_bytes(self) -> int:
        """Bytes of staging buffers held (copy mode; allocated at the first `average()`, then reused)."""
        return self._engine.staging_bytes

    @property
    def flat_bytes(self) -> int:
        """Bytes of the flat buffers the tensors live in (zero-copy mode; 0 in copy mode)."""
        return self._engine.flat_bytes

    def group(self) -> dist.ProcessGroup:
        """The group a sync runs over: `process_group`, or the default group."""
        if self.process_group is not None:
            return self.process_group
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ParameterAverager.average() needs torch.distributed to be initialized "
                "(call torch.distributed.init_process_group first) or an explicit process_group"
            )
        return world_group()

    def _use_avg_op(self, group: dist.ProcessGroup) -> bool:
        if self.comm_dtype is not None:
            return False  # the division must happen in float32, after unpack widens the sum
        if self.reduce_op != "auto":
            return self.reduce_op == "avg"
        # A group may name one backend per device type, e.g. "cpu:gloo,cuda:nccl".
        backends = [entry.split(":")[-1] for entry in group_backend(group).split(",")]
        usable = _BACKENDS_WITH_AVG if self.zero_copy else _BACKENDS_WITH_FREE_AVG
        return all(backend in usable for backend in backends)

    def _extra_fingerprint(self) -> int:
        if not self._agreement_tensor_list:
            return self._settings_fingerprint
        return digest(self._settings_fingerprint, _C.layout_fingerprint(self._agreement_tensor_list))

    def _explain_failed_check(self, group: dist.ProcessGroup, values: Optional[List[int]] = None) -> RanksDisagreeError:
        """A collective, after a check failed on every rank: the error every rank raises."""
        local_error = self._engine.local_error()
        mine = {
            "rank": process_rank(group),
            "error": local_error,
            "settings": self.settings,
            "layout": describe(self._tensors, self.names),
            "companions": describe(self._agreement_tensor_list, [name for name, _ in self._agreement_tensors]),
            "values": values,
            "nonfinite": self._engine.first_nonfinite() if self.check_finite and not local_error else -1,
        }
        return explain(gather(group, mine))

    def _run_checked(self, group: dist.ProcessGroup, run, values: Optional[List[int]] = None) -> None:
        """Runs `run()` (an engine call that returns False on every rank when the check failed) and raises
        what a failed check calls for: this rank's own error if it was the one that failed, else the
        explanation every rank shares."""
        with _lost_rank_errors(group):
            try:
                if run():
                    return
            finally:
                self._follow_moved_shards()  # a re-plan in the engine moved the shards
            failure = self._explain_failed_check(group, values)
        self._engine.rethrow_local_error()
        raise failure

    def _run_engine_checked(self, engine_call) -> None:
        """`engine_call(group, use_avg_op, status_device, check_finite, extra_fingerprint)`: an engine sync
        that starts with the agreement check, through `_run_checked`."""
        group = self.group()
        device = status_device(group, self._tensors)
        use_avg_op = self._use_avg_op(group)
        self._run_checked(group, lambda: engine_call(group, use_avg_op, device, self.check_finite, self._extra_fingerprint()))

    def average(self) -> None:
        """Replaces every tensor by its mean over the group's processes.

        On CPU it returns when every tensor holds the mean. On CUDA it returns once the work is queued
        on the current stream, like any torch.distributed collective: later work on that stream sees
        the means, with no host synchronization in between. A group of one process runs the same
        collectives (the mean is then the tensor itself), as Accelerate's sync does.
        """
        self._run_engine_checked(self._engine.average)

    def average_without_check(self) -> None:
        """average() without its check, for a caller whose own check has just covered these tensors'
        layout (LocalSGD's buffers). A local failure raises here only."""
        group = self.group()
        with _lost_rank_errors(group):
            self._engine.average(group, self._use_avg_op(group), status_device(group, self._tensors), False, 0, run_check=False)

    def start_average(self) -> None:
        """Starts an overlapped average and returns without waiting for the wire: the same check as
        `average()` (waited for), then every bucket is packed into a snapshot and its all_reduce started.
        Later `finish_average()` adds to each tensor `mean(snapshot) - snapshot`, the averaged correction,
        so that what the tensors learned meanwhile is kept. A collective: every rank must call it. Copy
        mode only; with an fp16 `comm_dtype` the scale is agreed in that check. Extra memory: two copies of the model in
        its wire dtype, kept for the next call."""
        refuse_overlapped_misuse(self.average_pending, "start_average")
        self._run_engine_checked(self._engine.start_delayed)

    def finish_average(
        self, outer_step: Optional[Callable[[List[torch.Tensor]], None]] = None, fragment_update_alpha: Optional[float] = None
    ) -> None:
        """Waits for the average `start_average()` started and merges it: each tensor `t` becomes
        `t + (mean(snapshot) - snapshot)`, in one compiled pass (the eager merge).

        Args:
            outer_step (`Callable`, *optional*):
                Streaming DiLoCo's outer step: handed tensors shaped like the parameters (DTensors for
                sharded ones) holding the mean of the snapshots, the same bits on every rank; whatever it
                writes there (the outer optimizer's result) is what is merged, `t + (result - snapshot)`.
                With a bfloat16 wire the result is rounded to bfloat16 on its way into the merge, as the
                snapshot was.
            fragment_update_alpha (`float`, *optional*):
                The streaming merge instead (Streaming DiLoCo, torchft): `t = lerp(result, t, alpha)`
                (`streaming_merge`), where `result` is the mean of the snapshots, or what `outer_step` wrote.
        """
        refuse_overlapped_misuse(self.average_pending, "finish_average")
        if outer_step is None and fragment_update_alpha is None:
            with _lost_rank_errors(self.group()):
                self._engine.finish_delayed()
            return
        with torch.no_grad():
            means = [torch.empty_like(t) for t in self._tensors]
            with _lost_rank_errors(self.group()):
                self._engine.finish_delayed_into_mean(means)
            if outer_step is not None:
                outer_step(shaped_like_parameters(means, self.params))
            if fragment_update_alpha is None:
                self._engine.merge_delayed_targets(means)
                return
            # The engine's snapshot is not needed: the sync ends here.
            self._engine.drain_delayed()
            streaming_merge(self._tensors, means, fragment_update_alpha)

    def keep_flat(self) -> None:
        """Zero-copy mode, locally (no collective): flattens the tensors again if one was re-pointed since
        (`param.data = ...`, `model.to(...)`), as a sync's preparation would. For an averager that keeps
        the layout while syncs that stage run through another (LocalSGD's zero_copy with a narrow wire,
        `sync_delay` or the quantized wire)."""
        self._engine.keep_flat()
        self._follow_moved_shards()

    def advance_average(self) -> None:
        """Nothing to move on: `start_average()` put every bucket's all_reduce on the wire at once. (The
        quantized wire's exchange has a second half; every averager has the same interface.)"""
        refuse_overlapped_misuse(self.average_pending, "advance_average")

    def rebase_anchor(self, values: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        """Nothing to rebase: the float wire sends the tensors themselves, not their change since an anchor."""

    def anchor_values(self) -> List[Optional[torch.Tensor]]:
        """No anchor: None per tensor."""
        return [None] * len(self._tensors)

    def state_tensors(self) -> List[torch.Tensor]:
        """Nothing besides the tensors: the float wire keeps no state between syncs."""
        return []

    @property
    def average_pending(self) -> bool:
        """Whether `start_average()` started an average that `finish_average()` has not merged yet."""
        return self._engine.delayed_pending

    def drain_pending_average(self) -> None:
        """Waits for a started average without merging it (an exception is on its way): nothing stays on
        the wire, so the group can be torn down cleanly."""
        self._engine.drain_delayed()

    def verify_ranks_agree(self, equal_values: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Only the check `average()` starts with: every rank of the group raises the same
        `RanksDisagreeError` if they differ in anything the check covers (see the class docstring), or,
        with `check_finite`, if any holds NaN/Inf. A collective: every rank must call it.

        Args:
            equal_values (`Sequence[torch.Tensor]`, *optional*):
                One tensor per parameter (e.g. DiLoCo's anchor) whose values must also be bit-identical on
                every rank; compared by a digest of their bytes, in the same collective.
        """
        group = self.group()
        values = None
        extra = self._extra_fingerprint()
        if equal_values is not None:
            values = _C.content_fingerprints(local_tensors(equal_values))
            extra = digest(extra, *values)
        device = status_device(group, self._tensors)
        use_avg_op = self._use_avg_op(group)
        self._run_checked(group, lambda: self._engine.ranks_agree(group, use_avg_op, device, self.check_finite, extra), values)


def refuse_overlapped_misuse(pending: bool, call: str) -> None:
    """A local mistake, raised here before any collective (so that it is not reported as a lost peer):
    `start_average()` while one is in flight, `finish_average()` or `advance_average()` when none is."""
    if call == "start_average" and pending:
        raise RuntimeError(
            "start_average() while an overlapped average is in flight: call finish_average() first (one average "
            "in flight at a time)"
        )
    if call != "start_average" and not pending:
        raise RuntimeError(f"{call}() without an overlapped average in flight: call start_average() first")


@contextlib.contextmanager
def _lost_rank_errors(group: dist.ProcessGroup):
    """Turns a collective's failure (a peer died or timed out: gloo and NCCL raise RuntimeError or its
    DistError subclasses) into an error that says what happened, keeping the backend's words."""
    try:
        yield
    except RanksDisagreeError:
        raise
    except RuntimeError as error:
        raise RuntimeError(_lost_rank_message(group, error)) from error


def _lost_rank_message(group: dist.ProcessGroup, error: Exception) -> str:
    return (
        f"parameter averaging failed on rank {group.rank()} of {group.size()}: another "
        "process of the group did not take part (it died, is stuck, or left the training loop early), so the "
        "collective gave up when its connection dropped or the group's timeout ran out. The parameters on this "
        f"rank may be partly averaged; restart from a checkpoint. Cause: {error}"
    )
