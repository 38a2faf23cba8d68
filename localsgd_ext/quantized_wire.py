"""`QuantizedAverager`: averaging with a one-byte wire (int8 or float8 e4m3). What travels is each rank's
change since the last sync (its pseudo-gradient, as in DiLoCo), quantized per block of elements with one
float32 scale each, so a sync moves about a quarter of the bytes of a float32 all_reduce (INTELLECT-1's
int8, Streaming DiLoCo's low-precision outer gradients)."""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _C, ops
from .averager import ParameterAverager, _lost_rank_errors, refuse_overlapped_misuse
from .averager_interface import streaming_merge
from .consistency import fail_together
from .options import AveragingOptions, check_bool, check_int_at_least
from .sharded import shaped_like_parameters

__all__ = ["QuantizedAverager", "DEFAULT_BLOCK_SIZE", "WIRES"]

# The codes' dtype of each wire: int8 and fp8 take a byte per element; int4 packs two per byte (uint8),
# half the bytes (Streaming DiLoCo's 4-bit outer gradients).
WIRES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}

# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single; older releases may lack the new name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Elements per scale: the scales add 4 / 1024 bytes per element (0.4%), and one outlier coarsens only
# its own 1024 neighbours. Streaming DiLoCo and INTELLECT-1 use blocks of this order.
DEFAULT_BLOCK_SIZE = 1024


class QuantizedAverager:
    """
    Averages a fixed list of float32 tensors across a group with an int8, float8 or int4 wire, in place.

    Every rank keeps an anchor: the tensors' values after the last sync, the same bits on every rank.
    A sync sends each rank's delta `tensor - anchor` (plus, with error feedback, what earlier
    quantization left out), quantized to int8 in blocks of `block_size` elements with a scale
    `max|delta| / 127` each (the compiled `quantize_tensors_change`, one pass over the tensors themselves
    that never stores the delta; with `wire="fp8"`, e4m3 codes of `delta / scale` with scale
    `max|delta| / 448`; with `wire="int4"`, codes -7..7 two per byte, scale `max|delta| / 7`). The
    reduction cannot overflow: an all_to_all hands each rank one chunk of everyone's codes, which it
    dequantizes and averages in float32 (`requantize_mean`), quantizes again, and an all_gather gives
    every rank every averaged chunk. Every rank then adds the same dequantized mean delta to the same
    anchor (`apply_quantized_mean_to`, which writes the tensors in the same pass), so the tensors leave
    the sync bit-identical on every rank. Bytes sent per rank and sync: `2 (W-1)/W` times the padded
    element count times `1 + 4 / block_size` (int4: `1/2 + 4 / block_size`), a quarter (an eighth) of a
    float32 ring all_reduce.

    Error, int8: per element, at most half a step of the sender's block, averaged over the ranks, plus
    half a step of the averaged block (`step = max|block| / 127`; int4 the same with `/ 7`):
    `|result - exact mean| <= mean_r(step_r) / 2 + step_mean / 2` (plus float32 rounding). fp8: each
    quantization errs by at most `max(|value| / 16, scale / 1024)` (3 mantissa bits; subnormals below
    `2**-6 * scale`), so relative to each value rather than to its block's largest. With
    `error_feedback`, what each rank's quantization left out (`delta - dequantized codes`) is kept and
    added to its next delta, so no part of any update is lost for good, only delayed.

    The anchor is taken by `rebase_anchor()` (LocalSGD does so on enter, once the ranks' tensors are
    checked bit-identical). Without one (used on its own, or after a tensor changed shape) the first sync
    averages in float32 (an ordinary `ParameterAverager` sync, waited for) and takes its result as the
    anchor. Every sync starts with that averager's agreement check, which also covers `block_size` and
    `error_feedback`.

    Args:
        params (`Iterable[torch.Tensor]`):
            float32 tensors on one device.
        wire (`str`, defaults to `"int8"`):
            `"int8"`, `"fp8"` (float8 e4m3fn codes, made by our CPU and CUDA kernels: no fp8 hardware needed)
            or `"int4"` (-7..7, two codes per byte: half the bytes; scale `max|delta| / 7`; even block_size).
        process_group (`torch.distributed.ProcessGroup`, *optional*):
            The group to average over; the default group when None.
        block_size (`int`, defaults to 1024):
            Elements per scale.
        error_feedback (`bool`, defaults to `False`):
            Keep each rank's quantization residual and send it with the next delta.
        names, agreement_settings, agreement_tensors, check_finite, bucket_cap_mb:
            As for `ParameterAverager` (the first sync and the checks run through one).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        wire: str = "int8",
        block_size: int = DEFAULT_BLOCK_SIZE,
        error_feedback: bool = False,
        names: Optional[Sequence[str]] = None,
        check_finite: bool = False,
        bucket_cap_mb: float = 25,
        agreement_settings: Optional[Mapping[str, Any]] = None,
        agreement_tensors: Optional[Sequence[Tuple[str, torch.Tensor]]] = None,
    ):
        options = AveragingOptions(bucket_cap_mb=bucket_cap_mb, check_finite=check_finite)
        self._setup(
            params, options, process_group, names, agreement_settings, agreement_tensors, wire, block_size, error_feedback
        )

    @classmethod
    def with_options(
        cls,
        params: Iterable[torch.Tensor],
        options: AveragingOptions,
        *,
        wire: str = "int8",
        block_size: int = DEFAULT_BLOCK_SIZE,
        error_feedback: bool = False,
        process_group: Optional[dist.ProcessGroup] = None,
        names: Optional[Sequence[str]] = None,
        agreement_settings: Optional[Mapping[str, Any]] = None,
        agreement_tensors: Optional[Sequence[Tuple[str, torch.Tensor]]] = None,
    ) -> "QuantizedAverager":
        averager = cls.__new__(cls)
        averager._setup(
            params, options, process_group, names, agreement_settings, agreement_tensors, wire, block_size, error_feedback
        )
        return averager

    def _setup(
        self, params, options, process_group, names, agreement_settings, agreement_tensors, wire, block_size, error_feedback
    ):
        if wire not in WIRES:
            raise ValueError(f"wire must be one of {tuple(WIRES)}, got {wire!r}")
        self.wire = wire
        self._code_dtype = WIRES[wire]
        if options.zero_copy or options.comm_dtype is not None:
            raise ValueError(
                f"the {wire} wire replaces the float wire: it needs zero_copy=False and comm_dtype=None, got "
                f"zero_copy={options.zero_copy}, comm_dtype={options.comm_dtype}"
            )
        self.block_size = check_int_at_least("block_size", block_size, 1)
        if self.block_size > 1 << 20:
            raise ValueError(f"block_size must be at most 1048576, got {self.block_size}")
        # Elements per byte of codes: int4's pair up within a block.
        self._per_storage = ops.codes_per_storage(self._code_dtype)
        if self.block_size % self._per_storage:
            raise ValueError(f"the {wire} wire packs two codes per byte: block_size must be even, got {self.block_size}")
        self.error_feedback = check_bool("error_feedback", error_feedback)
        wire_settings = {"wire": wire, "wire_block_size": self.block_size, "error_feedback": self.error_feedback}
        # The checks and the first (float32) sync.
        self._full_precision = ParameterAverager.with_options(
            params,
            options,
            process_group=process_group,
            names=names,
            agreement_settings={**(agreement_settings or {}), **wire_settings},
            agreement_tensors=agreement_tensors,
        )
        self.params: List[torch.Tensor] = self._full_precision.params
        # What is packed and written: the tensors themselves, or DTensors' local shards.
        self._tensors: List[torch.Tensor] = self._full_precision.local_tensors
        self.names = self._full_precision.names
        # The anchor and the buffers around it, from the first sync on.
        self._anchored: Optional[_Anchored] = None
        # An overlapped sync in flight.
        self._pending: Optional[_Exchange] = None
        self.last_wire_bytes = 0
        self._plan()

    def _layout(self) -> List[tuple]:
        return [(tuple(t.shape), t.dtype, t.device) for t in self._tensors]

    def _plan(self) -> None:
        """Each tensor's offset in the flat buffers, for the tensors as they are now (also after
        `param.data = ...` changed a shape): the anchor and the buffers start again, at the next sync."""
        for i, (p, name) in enumerate(zip(self._tensors, self.names)):
            if p.dtype != torch.float32:
                raise TypeError(
                    f"the {self.wire} wire averages float32 tensors; {name} (params[{i}]) is {p.dtype} (e.g. after "
                    "model.double() or .half()): keep the parameters float32, or use the float wire (wire=None)"
                )
            if p.device != self._tensors[0].device:
                raise ValueError(
                    f"the {self.wire} wire averages tensors on one device; {name} (params[{i}]) is on {p.device}, "
                    f"{self.names[0]} on {self._tensors[0].device}"
                )
        self.offsets: List[int] = []
        total = 0
        for p in self._tensors:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self._planned_layout = self._layout()
        self._anchored = None

    @property
    def _device(self) -> torch.device:
        return self._tensors[0].device if self._tensors else torch.device("cpu")

    @property
    def process_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks averaged over (None: all), as `ParameterAverager.process_group`."""
        return self._full_precision.process_group

    @property
    def agreement_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        return self._full_precision.agreement_tensors

    @agreement_tensors.setter
    def agreement_tensors(self, named_tensors) -> None:
        self._full_precision.agreement_tensors = named_tensors

    def group(self) -> dist.ProcessGroup:
        """The group a sync runs over, as `ParameterAverager.group`."""
        return self._full_precision.group()

    def _padded_length(self, world_size: int) -> int:
        # Each rank owns an equal chunk of whole blocks.
        unit = world_size * self.block_size
        return max(1, math.ceil(self.numel / unit)) * unit

    def _take_anchor_by_averaging(self) -> None:
        self._full_precision.average()
        self._allocate_anchor()

    def _allocate_anchor(self) -> None:
        """The anchor, packed from the tensors as they are now, and the buffers every sync reuses."""
        world_size = self.group().size()
        device = self._device
        length = self._padded_length(world_size)
        anchor = torch.zeros(length, dtype=torch.float32, device=device)
        ops.pack_into(self._tensors, self.offsets, anchor)
        pieces = self._wire_pieces(world_size, length)
        self._anchored = _Anchored(
            anchor=anchor,
            snapshot=None,
            residual=torch.zeros_like(anchor) if self.error_feedback else None,
            wire=_WireBuffers.for_length(
                length, world_size, self.block_size, self._code_dtype, device, piece_length=pieces[0][1] - pieces[0][0]
            ),
            pieces=pieces,
        )

    def _snapshot(self) -> torch.Tensor:
        """The tensors' values at the start of an overlapped sync, which its merge needs (a waited sync reads
        and writes the tensors themselves and has none): allocated at the first, then reused."""
        state = self._state()
        if state.snapshot is None:
            state.snapshot = torch.empty_like(state.anchor)
        return state.snapshot

    def _state(self) -> "_Anchored":
        if self._anchored is None:
            raise RuntimeError("the quantized wire has no anchor yet: its first sync takes it")
        return self._anchored

    def _wire_pieces(self, world_size: int, length: int) -> List[Tuple[int, int]]:
        """The stretches of the flat buffers that travel as one exchange each, about a bucket (bucket_cap_mb
        of float32) long and a whole number of every rank's blocks: while one piece's chunks are averaged
        and re-quantized, the next pieces are on the wire. Each element is reduced by the same rank as a
        whole-buffer exchange would pick within its piece, and each block's mean is the same, so the result
        does not depend on the pieces (tested)."""
        unit = world_size * self.block_size
        per_piece = max(unit, self._full_precision.options.bucket_cap_bytes // 4 // unit * unit)
        return [(start, min(start + per_piece, length)) for start in range(0, length, per_piece)]

    @torch.no_grad()
    def rebase_anchor(self, values: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        """Makes the tensors' current values (or `values`, one per tensor, shaped like its local part) the
        anchor, locally: they must be the same bits on every rank. On enter (LocalSGD checks that first, as
        DDP makes them), so that the first sync already sends changes, with no float32 sync first; after
        something that changed them alike on every rank (e.g. DiLoCo's outer step); with the anchor a healthy
        replica sent (fault tolerance)."""
        if self._layout() != self._planned_layout:
            self._plan()
        given = None if values is None else [v for v in values if v is not None]
        if given is not None and len(given) != len(self._tensors):
            raise ValueError(f"rebase_anchor needs a tensor for each of the {len(self._tensors)} tensors, got {values!r}")
        if self._anchored is None:
            self._allocate_anchor()  # packs the tensors
            if given is None:
                return
        ops.pack_into(self._tensors if given is None else given, self.offsets, self._state().anchor)

    def anchor_values(self) -> List[Optional[torch.Tensor]]:
        """The anchor, one view per tensor shaped like its local part (None for each before the first anchor)."""
        if self._anchored is None:
            return [None] * len(self._tensors)
        return list(self._views_of(self._anchored.anchor))

    def state_tensors(self) -> List[torch.Tensor]:
        """The anchor and, with error feedback, the residual: what a sync changes besides the tensors."""
        state = self._anchored
        if state is None:
            return []
        return [state.anchor] + ([] if state.residual is None else [state.residual])

    def _quantize_window(self, start: int, end: int, codes: torch.Tensor, keep_snapshot: bool) -> None:
        """Quantizes the change since the anchor (plus the residual, with error feedback) of the flat layout's
        elements start..end into `codes` and the wire's scales, reading the tensors themselves, in one pass;
        with `keep_snapshot` (an overlapped sync) their values are also kept in the snapshot."""
        state = self._state()
        window = slice(start, end)
        ops.quantize_tensors_change(
            self._tensors,
            self.offsets,
            start,
            state.anchor[window],
            None if state.residual is None else state.residual[window],
            self.block_size,
            codes,
            state.wire.scales[self._scales_of(start, end)],
            self._snapshot()[window] if keep_snapshot else None,
        )

    def _quantized_delta(self, keep_snapshot: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole change quantized at once, into the whole-length codes (see `_quantize_window`); refuses
        one that float32 cannot hold."""
        state = self._state()
        codes = state.wire.sent.whole()
        self._quantize_window(0, state.anchor.numel(), codes, keep_snapshot)
        error = self._overflowed_change(state.wire.scales)
        if error is not None:
            raise error
        return codes, state.wire.scales

    def _overflowed_change(self, scales: torch.Tensor) -> Optional[ValueError]:
        """A block holding NaN or Inf has a non-finite scale (one pass over the scales, not the model). If the
        tensors there are finite, their change since the anchor overflowed float32 (e.g. -1.6e38 to 1.9e38)
        and would arrive as NaN on every rank: the error to refuse it with (error feedback starts again from
        zero). Non-finite values of the tensors themselves travel as they are (check_finite refuses them in
        the agreement check)."""
        if self.numel == 0 or bool(torch.isfinite(scales).all()):
            return None
        state = self._state()
        block = int((~torch.isfinite(scales)).nonzero()[0])
        begin, end = block * self.block_size, min((block + 1) * self.block_size, self.numel)
        values = self._snapshot()
        ops.pack_into(self._tensors, self.offsets, values)
        if not bool(torch.isfinite(values[begin:end]).all()) or not bool(torch.isfinite(state.anchor[begin:end]).all()):
            return None
        index = bisect.bisect_right(self.offsets, begin) - 1
        while self._tensors[index].numel() == 0 or self.offsets[index] + self._tensors[index].numel() <= begin:
            index += 1
        if state.residual is not None:
            state.residual.zero_()  # its overflowing block holds NaN now
        return ValueError(
            f"the {self.wire} wire cannot send the change of {self.names[index]} since the last sync: it overflows "
            "float32 (a value moved by more than 3.4e38), so it would arrive as NaN on every rank. Nothing was "
            "averaged"
            + ("; error feedback starts again from zero" if state.residual is not None else "")
            + ". Values this large need the float wire (wire=None)"
        )

    def _scales_of(self, start: int, end: int) -> slice:
        """The scales of the elements start..end (whole blocks)."""
        return slice(start // self.block_size, end // self.block_size)

    def _codes_of(self, start: int, end: int) -> slice:
        """The codes of the elements start..end (whole blocks), in the codes buffers' units."""
        return slice(start // self._per_storage, end // self._per_storage)

    def _start_exchange(self, group: dist.ProcessGroup, quantize_pieces: bool) -> "_Exchange":
        """Phase 1, started: per piece, an all_to_all gives rank r chunk r of the piece of every rank's codes
        and scales. Codes travel as bytes (backends may not know float8). With `quantize_pieces` (a waited
        sync), each piece is quantized just before its all_to_all starts, so the next is quantized while it
        travels, into the slot of the piece two before it once that one was sent (two pieces of codes in
        flight); whether a rank's change overflowed float32 then travels last, in a one-number all_reduce
        that `_check_overflow` reads before anything is applied. Else (an overlapped sync, quantized whole
        before the check) every piece is left on the wire at once."""
        state = self._state()
        wire = state.wire
        scales = wire.scales
        exchange = _Exchange(phase=1, works=[], host_blocking=wire.received_codes.device.type == "cpu", whole=not quantize_pieces)
        for index, (start, end) in enumerate(state.pieces):
            its_scales, its_codes = self._scales_of(start, end), self._codes_of(start, end)
            exchange.wait_for_slot(exchange.works, index)
            codes = wire.sent.for_piece(index, its_codes, whole=exchange.whole)
            if quantize_pieces:
                self._quantize_window(start, end, codes, keep_snapshot=False)
            exchange.works.append(
                [
                    dist.all_to_all_single(
                        _as_bytes(wire.received_codes[its_codes]), _as_bytes(codes), group=group, async_op=True
                    ),
                    dist.all_to_all_single(wire.received_scales[its_scales], scales[its_scales], group=group, async_op=True),
                ]
            )
        if quantize_pieces:
            exchange.overflow = self._overflowed_change(scales)
            flag = torch.tensor([0.0 if exchange.overflow is None else 1.0], device=scales.device)
            exchange.overflow_flag = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True))
        return exchange

    def _check_overflow(self, group: dist.ProcessGroup, exchange: "_Exchange") -> None:
        """Before the first piece is applied: if any rank's change overflowed float32, the exchange is
        drained and every rank raises, nothing applied: that rank its own error, the others the agreement
        check's naming it (as when a rank fails before sending)."""
        if exchange.overflow_flag is None:
            return
        flag, work = exchange.overflow_flag
        exchange.overflow_flag = None
        exchange.wait_for([work])
        if float(flag) == 0.0:
            return
        exchange.wait()
        if exchange.overflow is not None:
            fail_together(group, exchange.overflow)
        self._full_precision.verify_ranks_agree()
        raise RuntimeError("a rank's change overflowed float32, but the agreement check passed")  # not reached

    def _start_gather(self, group: dist.ProcessGroup, exchange: "_Exchange") -> None:
        """Phase 2, started: piece by piece as its all_to_all arrives, this rank's chunk averaged in float32
        and quantized again, then an all_gather of every rank's chunk of it (while the next pieces arrive).
        A waited sync's chunks of the mean take turns in two slots, as its sent codes do."""
        world_size = group.size()
        wire = self._state().wire
        gathers: List[list] = []
        for index, ((start, end), arriving) in enumerate(zip(self._state().pieces, exchange.works)):
            exchange.wait_for(arriving)
            its_scales, its_codes = self._scales_of(start, end), self._codes_of(start, end)
            # This rank's chunk of the piece's mean: elements start / W .. end / W of the mean buffers.
            mine_scales, mine_codes = (
                self._scales_of(start // world_size, end // world_size),
                self._codes_of(start // world_size, end // world_size),
            )
            exchange.wait_for_slot(gathers, index)
            mean_codes = wire.mean.for_piece(index, mine_codes, whole=exchange.whole)
            ops.requantize_mean(
                wire.received_codes[its_codes].view(world_size, -1),
                wire.received_scales[its_scales].view(world_size, -1),
                self.block_size,
                mean_codes,
                wire.mean_scales[mine_scales],
            )
            gathers.append(
                [
                    _all_gather_single(
                        _as_bytes(wire.gathered_codes[its_codes]), _as_bytes(mean_codes), group=group, async_op=True
                    ),
                    _all_gather_single(
                        wire.gathered_scales[its_scales], wire.mean_scales[mine_scales], group=group, async_op=True
                    ),
                ]
            )
        exchange.phase, exchange.works = 2, gathers
        mean_bytes = wire.mean.length + 4 * wire.mean_scales.numel()  # codes are stored in bytes
        self.last_wire_bytes = 2 * (world_size - 1) * mean_bytes

    def _finish_exchange(self, group: dist.ProcessGroup, exchange: "_Exchange", write_tensors: bool) -> None:
        """Both phases completed, piece by piece: the anchor moves by the mean delta, the same bits on every
        rank; with `write_tensors` (a waited sync), the tensors take its values in the same pass."""
        if exchange.phase == 1:
            self._start_gather(group, exchange)
        self._check_overflow(group, exchange)
        state = self._state()
        for (start, end), arriving in zip(state.pieces, exchange.works):
            exchange.wait_for(arriving)
            codes = state.wire.gathered_codes[self._codes_of(start, end)]
            scales = state.wire.gathered_scales[self._scales_of(start, end)]
            if write_tensors:
                ops.apply_quantized_mean_to(
                    codes, scales, self.block_size, state.anchor[start:end], self.offsets, start, self._tensors
                )
            else:
                ops.apply_quantized_mean(codes, scales, self.block_size, state.anchor[start:end])
        exchange.works = []

    def _begin_sync(self, call: str, quantize_now: bool) -> bool:
        """What every sync starts with; False when it is already done. Refuses one while another is in flight.
        Without an anchor (the first sync, or the first after a tensor changed shape), averages in float32 and
        takes the result as the anchor: done. Else (with `quantize_now`, an overlapped sync) this rank's
        quantized change and its snapshot, then the agreement check: a rank that could not plan or compute
        its change (a tensor no longer float32, an overflow) joins the check as failed, so every rank stops
        before anything is sent. A waited sync quantizes piece by piece after the check instead."""
        if self._pending is not None:
            raise RuntimeError(f"{call}() while an overlapped average is in flight: call finish_average() first")
        try:
            if self._layout() != self._planned_layout:
                self._plan()
            if self._anchored is not None and quantize_now:
                self._quantized_delta(keep_snapshot=True)
        except Exception as error:  # noqa: BLE001 - every rank must hear of it; fail_together re-raises it
            fail_together(self.group(), error)
            raise  # unreachable: fail_together raises
        if self._anchored is None:
            self._take_anchor_by_averaging()
            return False
        self._full_precision.verify_ranks_agree()
        return True

    @torch.no_grad()
    def average(self) -> None:
        """Replaces every tensor by the quantized-wire mean over the group (see the class docstring)."""
        if not self._begin_sync("average", quantize_now=False):
            return
        group = self.group()
        with _lost_rank_errors(group):
            self._finish_exchange(group, self._start_exchange(group, quantize_pieces=True), write_tensors=True)

    @torch.no_grad()
    def start_average(self) -> None:
        """Starts an overlapped quantized average: the check, the snapshot, the quantization and the
        all_to_all, left in flight. `advance_average()` (optional, at a later step) waits for it and starts
        the all_gather; `finish_average()` completes both and adds `new anchor - snapshot` to every
        tensor, keeping what it learned meanwhile. The first sync (no anchor yet) waits and averages in
        float32 instead."""
        if not self._begin_sync("start_average", quantize_now=True):
            return
        group = self.group()
        with _lost_rank_errors(group):
            self._pending = self._start_exchange(group, quantize_pieces=False)

    @torch.no_grad()
    def advance_average(self) -> None:
        """Moves an overlapped average to its second half (the all_gather), so that it too is on the wire
        while training goes on. A collective: every rank must call it at the same step."""
        if self._pending is not None and self._pending.phase == 1:
            group = self.group()
            with _lost_rank_errors(group):
                self._start_gather(group, self._pending)

    @torch.no_grad()
    def finish_average(
        self, outer_step: Optional[Callable[[List[torch.Tensor]], None]] = None, fragment_update_alpha: Optional[float] = None
    ) -> None:
        """Completes the overlapped average and merges it: each tensor `t` becomes
        `t + (new anchor - snapshot)`. With `outer_step` (Streaming DiLoCo), the new anchor is first
        handed to it as views shaped like the tensors, holding the mean of the snapshots; whatever it
        writes there (the outer optimizer's result) becomes the anchor and is what is merged. The mean
        is the same bits on every rank, so a deterministic outer step keeps the anchors identical. Sharded
        tensors' views are handed over as DTensors shaped like the parameters."""
        exchange = self._pending
        refuse_overlapped_misuse(exchange is not None, "finish_average")
        assert exchange is not None
        self._pending = None
        group = self.group()
        with _lost_rank_errors(group):
            self._finish_exchange(group, exchange, write_tensors=False)
        if outer_step is not None:
            outer_step(self._anchor_views())
        state = self._state()
        if fragment_update_alpha is None:
            ops.merge_into(state.anchor, self._snapshot(), self.offsets, 1.0, self._tensors)
        else:
            streaming_merge(self._tensors, self._views_of(state.anchor), fragment_update_alpha)

    def _views_of(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Each tensor's stretch of a buffer in the flat layout, viewed in the shape of its local part."""
        return [flat[o : o + t.numel()].view(t.shape) for o, t in zip(self.offsets, self._tensors)]

    def _anchor_views(self) -> List[torch.Tensor]:
        return shaped_like_parameters(self._views_of(self._state().anchor), self.params)

    @property
    def average_pending(self) -> bool:
        return self._pending is not None

    def drain_pending_average(self) -> None:
        if self._pending is not None:
            exchange, self._pending = self._pending, None
            exchange.wait()

    def verify_ranks_agree(self, equal_values: Optional[Sequence[torch.Tensor]] = None) -> None:
        self._full_precision.verify_ranks_agree(equal_values)


# A waited sync's pieces in flight per buffer: while one piece is quantized (or averaged), the one before
# it travels.
_SLOTS = 2


class _CodeSpace:
    """One of the exchange's code buffers, in the codes' storage units: whole (an overlapped sync has every
    piece on the wire at once), or two piece-sized slots that the pieces of a waited sync take in turn.
    Each is allocated at its first use and reused."""

    def __init__(self, length: int, piece_length: int, dtype: torch.dtype, device):
        self.length, self.piece_length, self.dtype, self.device = length, min(piece_length, length), dtype, device
        self._whole: Optional[torch.Tensor] = None
        self._slots: List[torch.Tensor] = []

    def whole(self) -> torch.Tensor:
        if self._whole is None:
            self._whole = torch.empty(self.length, dtype=self.dtype, device=self.device)
        return self._whole

    def for_piece(self, index: int, codes: slice, whole: bool) -> torch.Tensor:
        """Where piece `index` (whose codes are `codes` of the whole) goes."""
        if whole:
            return self.whole()[codes]
        if not self._slots:
            self._slots = [torch.empty(self.piece_length, dtype=self.dtype, device=self.device) for _ in range(_SLOTS)]
        return self._slots[index % _SLOTS][: codes.stop - codes.start]


@dataclasses.dataclass
class _WireBuffers:
    """What a sync sends and receives, allocated with the anchor and reused (a fresh 100 MB tensor per sync
    costs more in page faults than the pass that fills it): this rank's codes (`sent`) and scales, the
    chunks the all_to_all brings, this rank's chunk of the mean (`mean`), and every chunk's mean after the
    all_gather. The last share the memory of the received chunks: a piece's all_gather starts only once its
    received chunks were averaged into this rank's chunk of the mean, and writes nothing else. The received
    codes are whole-length: no piece may be applied before every rank's change is known not to overflow,
    i.e. before every piece was quantized. A waited sync's sent codes and chunks of the mean take two
    pieces' room each (`_CodeSpace`); the scales are a block's 4 bytes per `block_size` codes."""

    sent: _CodeSpace
    scales: torch.Tensor
    received_codes: torch.Tensor
    received_scales: torch.Tensor
    mean: _CodeSpace
    mean_scales: torch.Tensor
    gathered_codes: torch.Tensor
    gathered_scales: torch.Tensor

    @classmethod
    def for_length(
        cls,
        length: int,
        world_size: int,
        block_size: int,
        code_dtype: torch.dtype,
        device,
        piece_length: Optional[int] = None,
    ) -> "_WireBuffers":
        per_storage = ops.codes_per_storage(code_dtype)
        piece_length = length if piece_length is None else piece_length

        def scales(n: int) -> torch.Tensor:
            return torch.empty(n // block_size, device=device)

        received_codes = torch.empty(length // per_storage, dtype=code_dtype, device=device)
        received_scales = scales(length)
        return cls(
            sent=_CodeSpace(length // per_storage, piece_length // per_storage, code_dtype, device),
            scales=scales(length),
            received_codes=received_codes,
            received_scales=received_scales,
            mean=_CodeSpace(length // world_size // per_storage, piece_length // world_size // per_storage, code_dtype, device),
            mean_scales=scales(length // world_size),
            gathered_codes=received_codes,
            gathered_scales=received_scales,
        )


@dataclasses.dataclass
class _Anchored:
    """The anchor (the tensors' values after the last sync, flat, padded to whole blocks of every rank) and
    what each sync reuses around it: the snapshot of an overlapped sync (allocated at the first), the
    residual (error feedback), the wire's buffers and the pieces the exchange travels in."""

    anchor: torch.Tensor
    snapshot: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    wire: _WireBuffers
    pieces: List[Tuple[int, int]]


def _as_bytes(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.uint8)


@dataclasses.dataclass
class _Exchange:
    """A quantized average on the wire: phase 1 (the all_to_alls of every rank's codes) or 2 (the all_gathers
    of the averaged chunks), with the collectives' work handles, one list per piece."""

    phase: int
    works: List[list]
    # gloo on CPU: the wait blocks this thread, so it waits in slices that let Ctrl-C through.
    host_blocking: bool
    # An overlapped sync's: every piece in flight at once, in the whole-length buffers.
    whole: bool = True
    # A waited sync's: this rank's overflow error, if any, and the all_reduce telling whether any rank had one.
    overflow: Optional[ValueError] = None
    overflow_flag: Optional[Tuple[torch.Tensor, Any]] = None

    def wait_for_slot(self, earlier: List[list], index: int) -> None:
        """Before piece `index` of a waited sync takes its slot (`_CodeSpace`): the collectives of the piece
        that held it last, in `earlier`, are done with it."""
        if not self.whole and index >= _SLOTS:
            self.wait_for(earlier[index - _SLOTS])

    def wait_for(self, works: list) -> None:
        for work in works:
            _C.wait_interruptibly(work, self.host_blocking)

    def wait(self) -> None:
        for works in self.works:
            self.wait_for(works)
        self.works = []
