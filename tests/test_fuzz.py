"""Property-based fuzzing of every compiled entry point: random tensor lists (dtypes, sizes including 0,
strides, storage offsets, cpu and meta devices, empty lists) and random offsets, divisors and options.
The only allowed outcomes are a correct result or a clean Python exception; a crash kills the test run.
Derandomized, so CI sees the same examples every time."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiprocess import run_ranks

from localsgd_ext import _C, ops

CLEAN_ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError, OverflowError, IndexError)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, dtype=None, device=None):
    """A tensor that may be a transposed, sliced or offset view, on cpu or meta."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    device = device or draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    offset = draw(st.integers(0, 3))
    numel = 1
    for size in shape:
        numel *= size
    base = torch.arange(numel + offset, dtype=torch.float64).to(dtype).to(device)
    t = base[offset:].view(shape) if shape else base[offset : offset + 1].view(())
    view = draw(st.sampled_from(["plain", "transposed", "sliced"]))
    if view == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif view == "sliced" and t.dim() >= 1:
        t = t[::2]
    return t


@st.composite
def pack_cases(draw):
    """Tensors, offsets (usually a valid layout, sometimes arbitrary) and a buffer (usually matching)."""
    dtype = draw(st.sampled_from(DTYPES))
    same = draw(st.booleans())
    items = draw(st.lists(tensors(dtype=dtype if same else None, device="cpu" if same else None), max_size=6))
    offsets, cursor = [], 0
    for t in items:
        cursor += draw(st.integers(0, 2))
        offsets.append(cursor)
        cursor += t.numel()
    if draw(st.integers(0, 4)) == 0:
        offsets = draw(st.lists(st.integers(-5, 40), min_size=len(items), max_size=len(items) + 1))
    buffer_dtype = dtype if draw(st.integers(0, 4)) else draw(st.sampled_from(DTYPES))
    buffer_len = cursor + draw(st.integers(-2, 3))
    buffer = torch.zeros(max(0, buffer_len), dtype=buffer_dtype)
    if draw(st.integers(0, 6)) == 0:
        buffer = buffer.to("meta")
    if draw(st.integers(0, 6)) == 0:
        buffer = torch.zeros(max(1, buffer_len), 2, dtype=buffer_dtype)[:, 0]  # not contiguous
    return items, offsets, buffer


PACKERS = {"dispatched": ops.pack_into, "generic": _C._pack_into_generic}
UNPACKERS = {"dispatched": ops.unpack_from, "generic": _C._unpack_from_generic}


@pytest.mark.parametrize("kernel", list(PACKERS))
@FUZZ
@given(case=pack_cases())
def test_pack_into_is_correct_or_refuses_cleanly(kernel, case):
    items, offsets, buffer = case
    try:
        PACKERS[kernel](items, offsets, buffer)
    except CLEAN_ERRORS:
        return
    if buffer.is_meta:
        return
    for t, offset in zip(items, offsets):
        assert torch.equal(buffer[offset : offset + t.numel()], t.reshape(-1))


@pytest.mark.parametrize("kernel", list(UNPACKERS))
@FUZZ
@given(case=pack_cases(), divisor=st.sampled_from([1.0, 2.0, 3.0, 0.0, -1.0, float("nan"), float("inf"), 1e-300]))
def test_unpack_from_is_correct_or_refuses_cleanly(kernel, case, divisor):
    items, offsets, buffer = case
    if not buffer.is_meta:
        buffer.copy_(torch.arange(buffer.numel(), dtype=torch.float64).to(buffer.dtype))
    targets = [t.clone() if t.is_meta else torch.empty_like(t) for t in items]
    try:
        UNPACKERS[kernel](buffer, offsets, divisor, targets)
    except CLEAN_ERRORS:
        return
    if buffer.is_meta:
        return
    for t, offset in zip(targets, offsets):
        slot = buffer[offset : offset + t.numel()].view(t.shape)
        expected = slot if divisor == 1.0 else slot / divisor
        assert torch.equal(t, expected.to(t.dtype)) or (
            t.is_floating_point() and torch.allclose(t, expected.to(t.dtype), equal_nan=True)
        )


@FUZZ
@given(case=pack_cases(), divisor=st.sampled_from([1.0, 2.0, 3.0, 0.0, -1.0, float("nan"), float("inf")]))
def test_merge_into_is_correct_or_refuses_cleanly(case, divisor):
    items, offsets, buffer = case
    snapshot = buffer.clone()
    if not buffer.is_meta:
        buffer.copy_(torch.arange(buffer.numel(), dtype=torch.float64).to(buffer.dtype))
        snapshot.copy_(torch.arange(buffer.numel(), dtype=torch.float64).flip(0).to(buffer.dtype))
    targets = [t.clone() for t in items]
    try:
        ops.merge_into(buffer, snapshot, offsets, divisor, targets)
    except CLEAN_ERRORS:
        return
    if buffer.is_meta:
        return
    for t, before, offset in zip(targets, items, offsets):

        def slot(b):
            return b[offset : offset + t.numel()].view(t.shape).to(torch.float64)

        expected = before.to(torch.float64) + (slot(buffer) / divisor - slot(snapshot))
        assert torch.allclose(t.to(torch.float64), expected.to(t.dtype).to(torch.float64), rtol=1e-2, atol=1e-2, equal_nan=True)


@FUZZ
@given(
    inputs=st.lists(
        st.tuples(st.integers(-3, 5), st.integers(-10, 10**6), st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16])), max_size=12
    ),
    cap=st.integers(-5, 2**22),
    alignment=st.sampled_from([-16, 0, 1, 3, 8, 16, 64, 2**40]),
)
def test_plan_buckets_is_valid_or_refuses_cleanly(inputs, cap, alignment):
    try:
        plan = _C.plan_buckets(inputs, cap, alignment)
    except CLEAN_ERRORS:
        return
    seen = sorted(i for bucket in plan for i in bucket["tensor_indices"])
    assert seen == list(range(len(inputs)))
    for bucket in plan:
        for index, offset in zip(bucket["tensor_indices"], bucket["offsets"]):
            numel, element_size = inputs[index][1], inputs[index][2]
            assert offset + numel <= bucket["numel"]
            assert numel == 0 or (offset * element_size) % alignment == 0


@FUZZ
@given(items=st.lists(tensors(), max_size=5), cap=st.integers(-2, 1 << 20), in_flight=st.integers(-1, 3))
def test_engine_constructor_builds_or_refuses_cleanly(items, cap, in_flight):
    try:
        engine = _C.BucketedAverager(items, cap, in_flight)
    except CLEAN_ERRORS:
        return
    assert sorted(i for b in engine.buckets() for i in b["tensor_indices"]) == list(range(len(items)))
    assert engine.layout_fingerprint() >= 0
    assert engine.first_nonfinite() == -1


def test_engine_average_fuzzed_on_a_real_group():
    """average() with random tensor lists on a real one-process gloo group (in a rank process)."""
    (result,) = run_ranks(1, "workers_fuzz:fuzz_engine_average", timeout=240)
    assert result["examples"] >= 50


@FUZZ
@given(
    length=st.integers(0, 300),
    block_size=st.sampled_from([-1, 0, 1, 3, 16, 64, 1 << 21]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    code_dtype=st.sampled_from([None, torch.int8, torch.float8_e4m3fn, torch.uint8]),
    strided=st.booleans(),
    scale=st.sampled_from([1.0, 1e-30, 1e30, float("inf"), float("nan")]),
)
def test_quantize_and_dequantize_are_correct_or_refuse_cleanly(length, block_size, dtype, code_dtype, strided, scale):
    x = (torch.randn(2 * length if strided else length) * scale).to(dtype)
    if strided:
        x = x[::2]
    try:
        codes, scales = ops.quantize_blocks(x, block_size, code_dtype)
    except (ValueError, TypeError):
        return
    blocks = x.view(-1, block_size)
    largest = blocks.abs().amax(1) if length else torch.zeros(0)
    assert torch.equal(scales.nan_to_num(-1.0), (largest / (127 if code_dtype in (None, torch.int8) else 448)).nan_to_num(-1.0))
    values = ops.dequantize_blocks(codes[None], scales[None], block_size)
    finite = torch.isfinite(scales).repeat_interleave(block_size)
    assert torch.isnan(values[~finite]).all()
    error = (values - x)[finite].abs()
    bound = (
        (scales / 2).repeat_interleave(block_size)[finite]
        if code_dtype in (None, torch.int8)
        else torch.maximum(x[finite].abs() / 16, (scales / 1024).repeat_interleave(block_size)[finite])
    )
    assert torch.all(error <= bound * (1 + 1e-6) + 1e-45)
