"""Python entry points for the compiled operators, with fake (meta) kernels for torch.compile/opcheck."""

from typing import Optional, Sequence, Tuple

import torch

# Loading the compiled library registers the localsgd_ext::* operators with the dispatcher.
from . import _C  # noqa: F401

__all__ = [
    "apply_quantized_mean",
    "apply_quantized_mean_to",
    "dequantize_blocks",
    "merge_into",
    "pack_into",
    "quantize_blocks",
    "quantize_change",
    "quantize_tensors_change",
    "requantize_mean",
    "unpack_from",
]


def pack_into(tensors: Sequence[torch.Tensor], offsets: Sequence[int], buffer: torch.Tensor, scale: float = 1.0) -> None:
    """Copies each tensor into `buffer` at its element offset, in one compiled pass.

    Args:
        tensors (`Sequence[torch.Tensor]`):
            Tensors of `buffer`'s dtype and device, any shape and strides; or float32 tensors with a
            bfloat16/float16 buffer, cast rounding to nearest even.
        offsets (`Sequence[int]`):
            Element offset of each tensor in `buffer`; `offsets[i] + tensors[i].numel()` must fit.
        buffer (`torch.Tensor`):
            1-D contiguous destination.
        scale (`float`, defaults to 1):
            Positive, in float32's normal range. Multiplies float32 values (in float32) before their cast to a
            bfloat16/float16 buffer, as `(tensor * scale).to(dtype)` does; must be 1 for plain copies.
            The engine passes a power of two that keeps an fp16 wire in range.
    """
    torch.ops.localsgd_ext.pack_into.default(list(tensors), list(offsets), buffer, float(scale))


def unpack_from(buffer: torch.Tensor, offsets: Sequence[int], divisor: float, tensors: Sequence[torch.Tensor]) -> None:
    """Copies `buffer` back into each tensor from its element offset, divided by `divisor`.

    The division is fused into the copy and rounds as torch's `tensor / divisor` does (in float for
    fp16/bf16), so SUM followed by this unpack matches an all_reduce SUM then `/ world_size` bit for bit.

    Args:
        buffer (`torch.Tensor`):
            1-D contiguous source.
        offsets (`Sequence[int]`):
            Element offset of each tensor in `buffer`.
        divisor (`float`):
            Positive, in float32's normal range; 1 makes a plain copy.
        tensors (`Sequence[torch.Tensor]`):
            Destinations, updated in place, of `buffer`'s dtype and device; or float32 tensors with a
            bfloat16/float16 buffer, widened and then divided in float32.
    """
    torch.ops.localsgd_ext.unpack_from.default(buffer, list(offsets), float(divisor), list(tensors))


def merge_into(
    sum: torch.Tensor,
    snapshot: torch.Tensor,
    offsets: Sequence[int],
    divisor: float,
    tensors: Sequence[torch.Tensor],
    scale: float = 1.0,
) -> None:
    """An overlapped sync's merge, in one compiled pass: each tensor `t` becomes
    `t + (sum / divisor - snapshot)`, with `sum` and `snapshot` read from its offset, computed in the
    tensor's dtype (float32 for fp16/bf16 tensors, each operand widened first) and rounded once.
    Buffers packed with `pack_into(..., scale)` (an fp16 wire) hold every value times `scale`, which is
    divided out: `t + (sum / (divisor * scale) - snapshot / scale)`.

    Args:
        sum (`torch.Tensor`):
            1-D contiguous: the all-reduced snapshot.
        snapshot (`torch.Tensor`):
            1-D contiguous, `sum`'s dtype: the buffer as packed before its all_reduce.
        offsets (`Sequence[int]`):
            Element offset of each tensor in both buffers.
        divisor (`float`):
            Positive, in float32's normal range (the group size after a SUM, 1 after an AVG).
        tensors (`Sequence[torch.Tensor]`):
            Updated in place; of the buffers' dtype and device, or float32 with bfloat16/float16 buffers.
        scale (`float`, defaults to 1):
            What the buffers' values were multiplied by when packed; 1 unless every tensor is float32
            with bfloat16/float16 buffers.
    """
    torch.ops.localsgd_ext.merge_into.default(sum, snapshot, list(offsets), float(divisor), list(tensors), float(scale))


def quantize_blocks(
    x: torch.Tensor, block_size: int, code_dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The quantized wires' quantizer, in one compiled pass: `x` is cut into blocks of `block_size`
    elements, each with its own float32 scale.

    - int8 codes (the default): scale `max|x| / 127`, codes `round-half-even(x / scale)` in -127..127;
      error `|x - code * scale| <= scale / 2` per element.
    - float8_e4m3fn codes: scale `max|x| / 448`, codes `x / scale` rounded to e4m3 (ties to even, as
      `.to(torch.float8_e4m3fn)`); error at most `|x| / 16`, or `scale / 1024` below `2**-6 * scale`.

    An all-zero block has scale 0 and codes 0; a block holding NaN or Inf gets a non-finite scale and
    codes 0, and dequantizes to NaN.

    Args:
        x (`torch.Tensor`):
            1-D contiguous float32, its length a multiple of `block_size` (pad with zeros).
        block_size (`int`):
            Elements per scale, 1 to 2**20.
        code_dtype (`torch.dtype`, *optional*):
            `torch.int8` (default) or `torch.float8_e4m3fn`.

    Returns:
        `(codes, scales)`: codes of `x`'s length, and float32 of length `len(x) / block_size`.
    """
    return torch.ops.localsgd_ext.quantize_blocks.default(x, int(block_size), code_dtype)


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, block_size: int, divisor: float = 1.0) -> torch.Tensor:
    """The quantized wires' dequantizer, in one compiled pass: row `r` of `codes` times its blocks' scales
    divided by `divisor` (in float32), summed over the rows in order (row 0 first) in float32. Dividing each
    row first keeps the mean of rows of finite values finite (their sum might not be). One row
    dequantizes; the W rows that W ranks sent, with `divisor=W`, average. A float8 NaN code (0x7f, 0xff)
    dequantizes to NaN.

    Args:
        codes (`torch.Tensor`):
            2-D contiguous int8 or float8_e4m3fn, `(rows, length)`, `length` a multiple of `block_size`.
        scales (`torch.Tensor`):
            2-D contiguous float32, `(rows, length / block_size)`, on `codes`' device.
        block_size (`int`):
            Elements per scale, as given to `quantize_blocks`.
        divisor (`float`, defaults to 1):
            Positive, in float32's normal range.

    Returns:
        float32 of length `length`.
    """
    return torch.ops.localsgd_ext.dequantize_blocks.default(codes, scales, int(block_size), float(divisor))


def quantize_change(
    snapshot: torch.Tensor,
    anchor: torch.Tensor,
    residual: Optional[torch.Tensor],
    block_size: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """The quantized wire's send side, in one compiled pass: the codes and scales of
    `snapshot - anchor (+ residual)`, exactly as `quantize_blocks` makes them for that change, written into
    `codes` and `scales`; with a `residual` (error feedback), what each code leaves out
    (`change - code * scale`) is written back into it. The change is never stored.

    Args:
        snapshot (`torch.Tensor`):
            1-D contiguous float32, a multiple of `block_size` long: the parameters, packed.
        anchor (`torch.Tensor`):
            Like `snapshot`: what the change is measured from.
        residual (`torch.Tensor`, *optional*):
            Like `snapshot`, updated in place; None without error feedback.
        block_size (`int`):
            Elements per scale, 1 to 2**20.
        codes (`torch.Tensor`):
            1-D contiguous int8 or float8_e4m3fn of `snapshot`'s length (its dtype picks the code); written.
        scales (`torch.Tensor`):
            1-D contiguous float32, one per block; written.
    """
    torch.ops.localsgd_ext.quantize_change.default(snapshot, anchor, residual, int(block_size), codes, scales)


def requantize_mean(
    codes: torch.Tensor, scales: torch.Tensor, block_size: int, mean_codes: torch.Tensor, mean_scales: torch.Tensor
) -> None:
    """The quantized reduction's middle, in one compiled pass: the mean of the rows of `codes`/`scales` (the
    bits `dequantize_blocks(codes, scales, block_size, rows)` gives), quantized again into
    `mean_codes`/`mean_scales` (the bits `quantize_blocks` gives), without storing the mean.

    Args:
        codes (`torch.Tensor`):
            2-D contiguous int8 or float8_e4m3fn, `(rows, length)`: the chunk each rank sent.
        scales (`torch.Tensor`):
            2-D contiguous float32, `(rows, length / block_size)`.
        block_size (`int`):
            Elements per scale.
        mean_codes (`torch.Tensor`):
            1-D contiguous, of `length` and the codes' dtype; written.
        mean_scales (`torch.Tensor`):
            1-D contiguous float32, `length / block_size`; written.
    """
    torch.ops.localsgd_ext.requantize_mean.default(codes, scales, int(block_size), mean_codes, mean_scales)


def apply_quantized_mean(codes: torch.Tensor, scales: torch.Tensor, block_size: int, anchor: torch.Tensor) -> None:
    """The quantized wire's receive side, in one compiled pass: `anchor[k] += code[k] * scales[k // block_size]`
    (the product rounded, then the sum), the same bits on every rank for the same codes.

    Args:
        codes (`torch.Tensor`):
            1-D contiguous int8 or float8_e4m3fn, a multiple of `block_size` long.
        scales (`torch.Tensor`):
            1-D contiguous float32, one per block.
        block_size (`int`):
            Elements per scale.
        anchor (`torch.Tensor`):
            1-D contiguous float32 of the codes' length, on their device; updated in place.
    """
    torch.ops.localsgd_ext.apply_quantized_mean.default(codes, scales, int(block_size), anchor)


def quantize_tensors_change(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int],
    start: int,
    anchor: torch.Tensor,
    residual: Optional[torch.Tensor],
    block_size: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
    snapshot: Optional[torch.Tensor] = None,
) -> None:
    """`quantize_change` reading the tensors themselves, with no packed copy of them: `anchor` (and `codes`,
    `scales`, `residual`, `snapshot`) cover the elements `start .. start + anchor.numel()` of the flat layout in
    which `tensors[i]` sits at `offsets[i]` (a window: a piece of the layout, or all of it). The same bits as
    `pack_into` of those elements (zero where no tensor lies) followed by `quantize_change`; on CPU each
    task reads its blocks where they lie (gathering those that straddle tensors in cache), elsewhere the
    window is gathered first. The outputs (`codes`, `scales`, `residual`, `snapshot`) must share memory
    neither with the anchor or the tensors nor with each other (a ValueError names the pair).

    Args:
        tensors (`Sequence[torch.Tensor]`):
            float32 tensors on the anchor's device, in slots that do not overlap; those outside the window are
            not read.
        offsets (`Sequence[int]`):
            Each tensor's first element in the flat layout.
        start (`int`):
            The flat layout's element at `anchor[0]`.
        anchor, residual, block_size, codes, scales:
            As for `quantize_change`, over the window.
        snapshot (`torch.Tensor`, *optional*):
            Like `anchor`: receives the window's elements (what an overlapped sync merges against).
    """
    torch.ops.localsgd_ext.quantize_tensors_change.default(
        tensors, offsets, int(start), anchor, residual, int(block_size), codes, scales, snapshot
    )


def apply_quantized_mean_to(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    anchor: torch.Tensor,
    offsets: Sequence[int],
    start: int,
    tensors: Sequence[torch.Tensor],
) -> None:
    """`apply_quantized_mean` writing through to the tensors: the window's anchor (the flat layout's elements
    `start .. start + anchor.numel()`, see `quantize_tensors_change`) moves by the codes, and every tensor
    element in the window becomes the moved anchor's, the same bits as `apply_quantized_mean` then
    `unpack_from`.

    Args:
        codes, scales, block_size, anchor:
            As for `apply_quantized_mean`, over the window.
        offsets (`Sequence[int]`):
            Each tensor's first element in the flat layout.
        start (`int`):
            The flat layout's element at `anchor[0]`.
        tensors (`Sequence[torch.Tensor]`):
            float32 tensors on the anchor's device, written where they lie in the window.
    """
    torch.ops.localsgd_ext.apply_quantized_mean_to.default(codes, scales, int(block_size), anchor, offsets, int(start), tensors)


def _check_arguments(op, tensors, offsets, buffer):
    """The checks of csrc/pack_common.h, for the fake kernels. They matter beyond tracing: a call that
    mixes meta and real tensors dispatches to the fake kernel, which must refuse it rather than do
    nothing to the real ones."""
    if len(tensors) != len(offsets):
        raise ValueError(
            f"{op}: tensors and offsets must have the same length, got {len(tensors)} tensors and {len(offsets)} offsets."
        )
    if buffer.layout != torch.strided:
        raise ValueError(f"{op}: buffer must be a strided (dense) tensor, got layout {buffer.layout}.")
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(
            f"{op}: buffer must be 1-D and contiguous, got sizes {list(buffer.shape)} and strides {list(buffer.stride())}."
        )
    for i, (t, offset) in enumerate(zip(tensors, offsets)):
        if t.layout != torch.strided:
            raise ValueError(f"{op}: tensors[{i}] must be strided (dense), got layout {t.layout}.")
        wire_cast = t.dtype == torch.float32 and buffer.dtype in (torch.bfloat16, torch.float16)
        if t.dtype != buffer.dtype and not wire_cast:
            raise TypeError(
                f"{op}: tensors[{i}] has dtype {t.dtype} but buffer has dtype {buffer.dtype}; a bucket holds one dtype "
                "(or float32 tensors in a BFloat16 or Half buffer)."
            )
        if t.device != buffer.device:
            raise ValueError(f"{op}: tensors[{i}] is on {t.device} but buffer is on {buffer.device}.")
        if not 0 <= offset <= buffer.numel() - t.numel():
            raise ValueError(
                f"{op}: tensors[{i}] with {t.numel()} elements at offset {offset} does not fit in a buffer of "
                f"{buffer.numel()} elements."
            )


# float32's normal range: the kernels compute with a scale or divisor in float32, where a smaller or larger
# value would become 0, a subnormal or inf (csrc/pack_common.h's check_float32_factor).
_FLOAT32 = torch.finfo(torch.float32)


def _check_float32_factor(op, name, value):
    if not _FLOAT32.tiny <= value <= _FLOAT32.max:
        raise ValueError(
            f"{op}: {name} must be a finite positive number, got {value}: the kernels compute with it in float32, "
            "whose normal range is 1.2e-38 to 3.4e38."
        )


def _check_scale(tensors, buffer, scale, op="pack_into"):
    _check_float32_factor(op, "scale", scale)
    for i, t in enumerate(tensors):
        if scale != 1.0 and not (t.dtype == torch.float32 and buffer.dtype in (torch.bfloat16, torch.float16)):
            raise ValueError(
                f"{op}: scale must be 1 unless every tensor is float32 cast to a bfloat16/float16 buffer; "
                f"tensors[{i}] has dtype {t.dtype} and buffer {buffer.dtype}, got scale {scale}."
            )


def _check_disjoint_slots(op, tensors, offsets):
    """csrc/pack_common.h's check_disjoint_slots: pack_into refuses slots that overlap."""
    slots = sorted((offset, i) for i, (t, offset) in enumerate(zip(tensors, offsets)) if t.numel() > 0)
    furthest = None
    for start, index in slots:
        if furthest is not None:
            other_start, other = furthest
            other_end = other_start + tensors[other].numel()
            if other_end > start:
                raise ValueError(
                    f"{op}: tensors[{min(index, other)}] and tensors[{max(index, other)}] overlap in the buffer (elements "
                    f"{other_start} to {other_end} and from {start}); each tensor needs a slot of its own."
                )
            if start + tensors[index].numel() <= other_end:
                continue
        furthest = (start, index)


@torch.library.register_fake("localsgd_ext::pack_into")
def _pack_into_fake(tensors, offsets, buffer, scale=1.0):
    _check_arguments("pack_into", tensors, offsets, buffer)
    _check_disjoint_slots("pack_into", tensors, offsets)
    _check_scale(tensors, buffer, scale)
    return None


@torch.library.register_fake("localsgd_ext::merge_into")
def _merge_into_fake(sum, snapshot, offsets, divisor, tensors, scale=1.0):
    _check_arguments("merge_into", tensors, offsets, sum)
    _check_arguments("merge_into", tensors, offsets, snapshot)
    if sum.dtype != snapshot.dtype:
        raise TypeError(f"merge_into: sum and snapshot must have one dtype, got {sum.dtype} and {snapshot.dtype}.")
    _check_float32_factor("merge_into", "divisor", divisor)
    _check_scale(tensors, sum, scale, "merge_into")
    _check_float32_factor("merge_into", "divisor * scale", divisor * scale)
    return None


@torch.library.register_fake("localsgd_ext::unpack_from")
def _unpack_from_fake(buffer, offsets, divisor, tensors):
    _check_arguments("unpack_from", tensors, offsets, buffer)
    _check_float32_factor("unpack_from", "divisor", divisor)
    return None


def _check_block_size(op, block_size):
    if not 1 <= block_size <= 1 << 20:
        raise ValueError(f"{op}: block_size must be between 1 and 1048576, got {block_size}.")


# int8 codes, float8 e4m3 codes, and uint8 bytes holding two int4 codes each.
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.uint8)


def codes_per_storage(code_dtype: torch.dtype) -> int:
    """Codes per element of a codes tensor: 2 for int4 (uint8), else 1."""
    return 2 if code_dtype == torch.uint8 else 1


def _check_block_fits_codes(op, block_size, code_dtype):
    if block_size % codes_per_storage(code_dtype):
        raise ValueError(f"{op}: int4 codes (uint8, two per byte) need an even block_size, got {block_size}.")


@torch.library.register_fake("localsgd_ext::quantize_blocks")
def _quantize_blocks_fake(x, block_size, code_dtype=None):
    code_dtype = torch.int8 if code_dtype is None else code_dtype
    if code_dtype not in CODE_DTYPES:
        raise TypeError(
            "quantize_blocks: code_dtype must be torch.int8, torch.float8_e4m3fn or torch.uint8 (int4, two per byte), "
            f"got {code_dtype}."
        )
    _check_block_size("quantize_blocks", block_size)
    _check_block_fits_codes("quantize_blocks", block_size, code_dtype)
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_blocks: x must be float32, got {x.dtype}.")
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"quantize_blocks: x must be a 1-D contiguous tensor, got sizes {list(x.shape)}.")
    if x.numel() % block_size:
        raise ValueError(
            f"quantize_blocks: x's length must be a multiple of block_size (pad it), got {x.numel()} elements and "
            f"block_size {block_size}."
        )
    return x.new_empty(x.numel() // codes_per_storage(code_dtype), dtype=code_dtype), x.new_empty(x.numel() // block_size)


@torch.library.register_fake("localsgd_ext::dequantize_blocks")
def _dequantize_blocks_fake(codes, scales, block_size, divisor=1.0):
    _check_block_size("dequantize_blocks", block_size)
    if codes.dtype not in CODE_DTYPES or scales.dtype != torch.float32:
        raise TypeError(
            "dequantize_blocks: codes must be int8, float8_e4m3fn or uint8 (int4) and scales float32, got "
            f"{codes.dtype} and {scales.dtype}."
        )
    _check_block_fits_codes("dequantize_blocks", block_size, codes.dtype)
    length = codes.shape[1] * codes_per_storage(codes.dtype) if codes.dim() == 2 else 0
    if codes.dim() != 2 or length % block_size or tuple(scales.shape) != (codes.shape[0], length // block_size):
        raise ValueError(
            f"dequantize_blocks: codes must be (rows, a multiple of block_size) and scales (rows, length / block_size), "
            f"got {list(codes.shape)}, {list(scales.shape)} and block_size {block_size}."
        )
    if codes.device != scales.device:
        raise ValueError(f"dequantize_blocks: codes are on {codes.device} but scales on {scales.device}.")
    _check_float32_factor("dequantize_blocks", "divisor", divisor)
    return scales.new_empty(length)


def _check_flat_float32(op, name, t, like):
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32, got {t.dtype}.")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a 1-D contiguous tensor, got sizes {list(t.shape)}.")
    if t.numel() != like.numel():
        raise ValueError(f"{op}: {name} must have the length of the others ({like.numel()}), got {t.numel()}.")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the others on {like.device}.")


def _check_codes_out(op, codes, scales, length, block_size, device, codes_name="codes", scales_name="scales"):
    if codes.dtype not in CODE_DTYPES:
        raise TypeError(f"{op}: {codes_name} must be int8, float8_e4m3fn or uint8 (int4), got {codes.dtype}.")
    _check_block_fits_codes(op, block_size, codes.dtype)
    storage = length // codes_per_storage(codes.dtype)
    if codes.dim() != 1 or not codes.is_contiguous() or codes.numel() != storage:
        raise ValueError(f"{op}: {codes_name} must be 1-D and contiguous with {storage} elements, got sizes {list(codes.shape)}.")
    if scales.dtype != torch.float32:
        raise TypeError(f"{op}: {scales_name} must be float32, got {scales.dtype}.")
    if scales.dim() != 1 or not scales.is_contiguous() or scales.numel() != length // block_size:
        raise ValueError(
            f"{op}: {scales_name} must be 1-D and contiguous with {length // block_size} entries (one per block), got "
            f"sizes {list(scales.shape)}."
        )
    if codes.device != device or scales.device != device:
        raise ValueError(f"{op}: {codes_name} and {scales_name} must be on {device}, got {codes.device} and {scales.device}.")


@torch.library.register_fake("localsgd_ext::quantize_change")
def _quantize_change_fake(snapshot, anchor, residual, block_size, codes, scales):
    _check_block_size("quantize_change", block_size)
    _check_flat_float32("quantize_change", "snapshot", snapshot, snapshot)
    if snapshot.numel() % block_size:
        raise ValueError(
            f"quantize_change: the length must be a multiple of block_size (pad it), got {snapshot.numel()} elements "
            f"and block_size {block_size}."
        )
    _check_flat_float32("quantize_change", "anchor", anchor, snapshot)
    if residual is not None:
        _check_flat_float32("quantize_change", "residual", residual, snapshot)
    _check_codes_out("quantize_change", codes, scales, snapshot.numel(), block_size, snapshot.device)
    return None


@torch.library.register_fake("localsgd_ext::requantize_mean")
def _requantize_mean_fake(codes, scales, block_size, mean_codes, mean_scales):
    _dequantize_blocks_fake(codes, scales, block_size, 1.0)
    _check_codes_out(
        "requantize_mean",
        mean_codes,
        mean_scales,
        codes.shape[1] * codes_per_storage(codes.dtype),
        block_size,
        codes.device,
        "mean_codes",
        "mean_scales",
    )
    if mean_codes.dtype != codes.dtype:
        raise TypeError(f"requantize_mean: mean_codes must have the codes' dtype ({codes.dtype}), got {mean_codes.dtype}.")
    return None


@torch.library.register_fake("localsgd_ext::apply_quantized_mean")
def _apply_quantized_mean_fake(codes, scales, block_size, anchor):
    _check_block_size("apply_quantized_mean", block_size)
    if codes.dtype not in CODE_DTYPES or scales.dtype != torch.float32:
        raise TypeError(
            "apply_quantized_mean: codes must be int8, float8_e4m3fn or uint8 (int4) and scales float32, got "
            f"{codes.dtype} and {scales.dtype}."
        )
    _check_block_fits_codes("apply_quantized_mean", block_size, codes.dtype)
    length = codes.numel() * codes_per_storage(codes.dtype)
    if codes.dim() != 1 or length % block_size or tuple(scales.shape) != (length // block_size,):
        raise ValueError(
            f"apply_quantized_mean: codes must be 1-D, for a multiple of block_size elements, and scales one per "
            f"block, got {list(codes.shape)}, {list(scales.shape)} and block_size {block_size}."
        )
    if anchor.dtype != torch.float32:
        raise TypeError(f"apply_quantized_mean: anchor must be float32, got {anchor.dtype}.")
    if anchor.dim() != 1 or not anchor.is_contiguous() or anchor.numel() != length:
        raise ValueError(
            f"apply_quantized_mean: anchor must be 1-D and contiguous with the codes' {length} elements, got sizes "
            f"{list(anchor.shape)}."
        )
    if codes.device != scales.device:
        raise ValueError(
            f"apply_quantized_mean: codes are on {codes.device}, scales on {scales.device} and anchor on "
            f"{anchor.device}; they must share a device."
        )
    return None


def _check_window_tensors(op, tensors, offsets, start, anchor):
    """check_window_tensors of csrc/quantize_checks.h."""
    if len(tensors) != len(offsets):
        raise ValueError(
            f"{op}: tensors and offsets must have the same length, got {len(tensors)} tensors and {len(offsets)} offsets."
        )
    if start < 0:
        raise ValueError(f"{op}: start must be at least 0, got {start}.")
    for i, (t, offset) in enumerate(zip(tensors, offsets)):
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: tensors[{i}] must be float32, got {t.dtype}.")
        if t.device != anchor.device:
            raise ValueError(f"{op}: tensors[{i}] is on {t.device} but anchor is on {anchor.device}.")
        if offset < 0:
            raise ValueError(f"{op}: offsets[{i}] must be at least 0, got {offset}.")
    _check_disjoint_slots(op, tensors, offsets)


@torch.library.register_fake("localsgd_ext::quantize_tensors_change")
def _quantize_tensors_change_fake(tensors, offsets, start, anchor, residual, block_size, codes, scales, snapshot):
    op = "quantize_tensors_change"
    _check_block_size(op, block_size)
    _check_flat_float32(op, "anchor", anchor, anchor)
    if anchor.numel() % block_size:
        raise ValueError(
            f"{op}: the window's length must be a multiple of block_size (pad it), got {anchor.numel()} elements and "
            f"block_size {block_size}."
        )
    for name, buffer in (("residual", residual), ("snapshot", snapshot)):
        if buffer is not None:
            _check_flat_float32(op, name, buffer, anchor)
    _check_codes_out(op, codes, scales, anchor.numel(), block_size, anchor.device)
    _check_window_tensors(op, tensors, offsets, start, anchor)
    return None


@torch.library.register_fake("localsgd_ext::apply_quantized_mean_to")
def _apply_quantized_mean_to_fake(codes, scales, block_size, anchor, offsets, start, tensors):
    _apply_quantized_mean_fake(codes, scales, block_size, anchor)
    _check_window_tensors("apply_quantized_mean_to", tensors, offsets, start, anchor)
    return None
