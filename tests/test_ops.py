"""The compiled pack_into / unpack_from operators on CPU (and CUDA when present)."""

import random

import pytest
import torch

from localsgd_ext import _C, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# "dispatched": the device's own kernel (CPU: pack_unpack_cpu.cpp). "generic": the ATen-op fallback
# that backends without a kernel use, called directly so that it is tested on CPU too.
KERNELS = {
    "dispatched": (ops.pack_into, ops.unpack_from),
    "generic": (_C._pack_into_generic, _C._unpack_from_generic),
}


def random_tensors(rng: random.Random, dtype, device, count):
    """Random shapes including empty and scalar tensors, plus transposed and sliced (offset) views."""
    tensors = []
    for _ in range(count):
        kind = rng.choice(["flat", "matrix", "scalar", "empty", "transposed", "sliced", "large"])
        if kind == "flat":
            t = torch.randn(rng.randrange(1, 5000))
        elif kind == "matrix":
            t = torch.randn(rng.randrange(1, 60), rng.randrange(1, 60))
        elif kind == "scalar":
            t = torch.randn(())
        elif kind == "empty":
            t = torch.randn(rng.randrange(0, 3), 0)
        elif kind == "large":
            t = torch.randn(300_000)  # several copy chunks: the parallel path
        else:
            t = torch.randn(rng.randrange(3, 50), rng.randrange(3, 40))
        t = t.to(dtype=dtype, device=device)
        if kind == "transposed":
            t = t.t()
        elif kind == "sliced":
            t = t[1:, ::2]
        tensors.append(t)
    return tensors


def layout_offsets(tensors, pad):
    offsets, cursor = [], 0
    for t in tensors:
        offsets.append(cursor)
        cursor += t.numel() + pad
    return offsets, cursor


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_pack_then_unpack_round_trips(kernel, device, dtype, seed):
    pack_into, unpack_from = KERNELS[kernel]
    rng = random.Random(seed)
    tensors = random_tensors(rng, dtype, device, rng.randrange(1, 25))
    offsets, total = layout_offsets(tensors, pad=rng.randrange(0, 5))
    buffer = torch.full((total,), float("nan"), dtype=dtype, device=device)
    pack_into(tensors, offsets, buffer)
    for t, off in zip(tensors, offsets):
        assert torch.equal(buffer[off : off + t.numel()], t.reshape(-1))
    # Destinations with the sources' strides: strided ones must be written through their strides.
    targets = [torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device).fill_(7.0) for t in tensors]
    unpack_from(buffer, offsets, 1.0, targets)
    for src, dst in zip(tensors, targets):
        assert dst.stride() == src.stride()
        assert torch.equal(dst, src)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divisor", [2.0, 3.0, 7.0])
def test_unpack_divides_exactly_like_torch(kernel, device, dtype, divisor):
    """The fused division rounds as torch's `tensor / divisor` (what Accelerate does after a SUM)."""
    pack_into, unpack_from = KERNELS[kernel]
    rng = random.Random(int(divisor))
    tensors = random_tensors(rng, dtype, device, 12) + [torch.randn(100_003, device=device).to(dtype) * 1e3]
    offsets, total = layout_offsets(tensors, pad=1)
    buffer = torch.zeros(total, dtype=dtype, device=device)
    pack_into(tensors, offsets, buffer)
    targets = [torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device) for t in tensors]
    unpack_from(buffer, offsets, divisor, targets)
    for src, dst in zip(tensors, targets):
        expected = src / divisor
        assert torch.equal(dst, expected), f"max diff {(dst.double() - expected.double()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("divisor", [1.0, 4.0, 3.0])
def test_buckets_past_the_streaming_size_give_the_same_bits(dtype, divisor):
    """From 8 MiB per call the CPU kernels store around the cache (streaming_stores.h): the same bits as
    torch, whatever the slots' alignment (odd offsets), the tails' lengths, and special values."""
    rng = random.Random(5)
    sizes = [rng.randrange(1, 40) for _ in range(20)] + [1_100_003, 1_300_001, 7, 5_000_001 // dtype.itemsize]
    tensors = [torch.randn(n, dtype=torch.float64).mul_(1e3).to(dtype) for n in sizes]
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-40, -0.0, 3e38], dtype=torch.float64)
    tensors[-3][: specials.numel()] = specials.to(dtype)
    offsets, total = layout_offsets(tensors, pad=3)
    assert total * tensors[0].element_size() >= 8 * 2**20
    buffer = torch.full((total + 1,), 5.0, dtype=dtype)[1:]  # a buffer starting 1 element past an allocation
    ops.pack_into(tensors, offsets, buffer)
    for t, off in zip(tensors, offsets):
        assert torch.equal(bits(buffer[off : off + t.numel()]), bits(t))
    targets = [torch.full((t.numel() + 1,), 9.0, dtype=dtype)[1:] for t in tensors]
    ops.unpack_from(buffer, offsets, divisor, targets)
    for src, dst in zip(tensors, targets):
        expected = src / divisor
        # NaN stays NaN; its payload is the one thing torch's division may rewrite (bfloat16's).
        assert torch.equal(dst.isnan(), expected.isnan())
        assert torch.equal(bits(dst)[~dst.isnan()], bits(expected)[~expected.isnan()])


@pytest.mark.parametrize("divisor", [1.0, 4.0, 3.0])
def test_a_bfloat16_wire_past_the_streaming_size_widens_to_the_same_bits(divisor):
    """float32 tensors on a bfloat16 wire: from 8 MiB of float32 per unpack the widening stores around the
    cache; the bits of `slot.float() / divisor` (NaN payloads included when nothing is divided)."""
    sizes = [13, 1_100_003, 5, 1_300_001]
    tensors = [torch.randn(n, dtype=torch.float64).mul_(1e3).float() for n in sizes]
    tensors[2][:] = torch.tensor([float("inf"), float("-inf"), 1e-40, -0.0, 3e38])
    offsets, total = layout_offsets(tensors, pad=3)
    buffer = torch.zeros(total + 1, dtype=torch.bfloat16)[1:]
    ops.pack_into(tensors, offsets, buffer)
    buffer[offsets[0]] = torch.tensor(-1, dtype=torch.int16).view(torch.bfloat16)  # a NaN with a payload
    targets = [torch.full((t.numel() + 1,), 9.0)[1:] for t in tensors]
    assert sum(t.numel() for t in targets) * 4 >= 8 * 2**20
    ops.unpack_from(buffer, offsets, divisor, targets)
    for t, off, dst in zip(tensors, offsets, targets):
        expected = buffer[off : off + t.numel()].float() / divisor
        if divisor == 1.0:
            assert torch.equal(bits(dst), bits(buffer[off : off + t.numel()].float()))
        assert torch.equal(dst.isnan(), expected.isnan())
        assert torch.equal(bits(dst)[~dst.isnan()], bits(expected)[~expected.isnan()])


def c10_round_to_bfloat16(values: torch.Tensor) -> torch.Tensor:
    """c10::BFloat16's rounding, written out on the bits: NaN -> 0x7FC0, else round to nearest even."""
    u = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
    return torch.where(values.isnan(), 0x7FC0, rounded).to(torch.int32).to(torch.int16)


@pytest.mark.parametrize("n", [101, 3_000_001])  # vectorized only; then also around the cache
@pytest.mark.parametrize("scale", [1.0, 2.0**-5])
def test_a_bfloat16_wire_narrows_with_c10s_rounding(n, scale):
    """float32 tensors packed into a bfloat16 buffer (the bf16 wire): every element rounded as
    c10::BFloat16 does, ties, NaN payloads, infinities and overflow to infinity included."""
    generator = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=generator) * 1e3
    ties = (torch.randint(-(2**15), 2**15, (64,), generator=generator, dtype=torch.int32) << 16) | 0x8000
    specials = [float("nan"), float("-nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-40, -0.0, 0.0]
    t[:64] = ties.view(torch.float32)
    t[64 : 64 + len(specials)] = torch.tensor(specials)
    t[80] = torch.tensor(-8388608 | 0x7F800001, dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    offsets = [0, 5]
    head = torch.randn(3, generator=generator)
    buffer = torch.zeros(n + 5 + 1, dtype=torch.bfloat16)[1:]  # the tensor's slot starts unaligned
    ops.pack_into([head, t], offsets, buffer, scale)
    assert torch.equal(buffer[5 : 5 + n].view(torch.int16), c10_round_to_bfloat16(t * scale))
    assert torch.equal(buffer[:3].view(torch.int16), c10_round_to_bfloat16(head * scale))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists_are_no_ops(device):
    buffer = torch.arange(4.0, device=device)
    ops.pack_into([], [], buffer)
    ops.unpack_from(buffer, [], 2.0, [])
    assert torch.equal(buffer, torch.arange(4.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = [torch.randn(3, 4, device=device), torch.randn(5, device=device), torch.randn(6, 2, device=device).t()]
    offsets, total = layout_offsets(tensors, pad=2)
    buffer = torch.zeros(total, device=device)
    torch.library.opcheck(torch.ops.localsgd_ext.pack_into.default, (tensors, offsets, buffer))
    targets = [torch.zeros_like(t) for t in tensors]
    torch.library.opcheck(torch.ops.localsgd_ext.unpack_from.default, (buffer, offsets, 3.0, targets))


BAD_CALLS = [
    # (description, call, exception, message)
    (
        "length mismatch",
        lambda: ops.pack_into([torch.zeros(2)], [0, 2], torch.zeros(4)),
        ValueError,
        "tensors and offsets must have the same length, got 1 tensors and 2 offsets",
    ),
    (
        "dtype mismatch",
        lambda: ops.pack_into([torch.zeros(2, dtype=torch.float64)], [0], torch.zeros(4)),
        TypeError,
        r"tensors\[0\] has dtype Double but buffer has dtype Float",
    ),
    (
        "does not fit",
        lambda: ops.pack_into([torch.zeros(3)], [2], torch.zeros(4)),
        ValueError,
        r"tensors\[0\] with 3 elements at offset 2 does not fit in a buffer of 4 elements",
    ),
    (
        "overlapping slots",  # found by test_fuzz.py: the slot written last won in both
        lambda: ops.pack_into([torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.ones(1)], [0, 0, 0, 0], torch.zeros(4)),
        ValueError,
        r"tensors\[0\] and tensors\[1\] overlap in the buffer \(elements 0 to 1 and from 0\); each tensor needs a slot",
    ),
    (
        "overlapping slots, out of order",
        lambda: ops.pack_into([torch.zeros(2), torch.zeros(4), torch.zeros(1)], [5, 0, 3], torch.zeros(8)),
        ValueError,
        r"tensors\[1\] and tensors\[2\] overlap in the buffer \(elements 0 to 4 and from 3\)",
    ),
    (
        "negative offset",
        lambda: ops.unpack_from(torch.zeros(4), [-1], 1.0, [torch.zeros(1)]),
        ValueError,
        "at offset -1 does not fit",
    ),
    (
        "2-D buffer",
        lambda: ops.pack_into([torch.zeros(2)], [0], torch.zeros(2, 2)),
        ValueError,
        r"buffer must be 1-D and contiguous, got sizes \[2, 2\]",
    ),
    (
        "strided buffer",
        lambda: ops.pack_into([torch.zeros(2)], [0], torch.zeros(8)[::2]),
        ValueError,
        "buffer must be 1-D and contiguous",
    ),
    (
        "sparse tensor",
        lambda: ops.pack_into([torch.zeros(2).to_sparse()], [0], torch.zeros(4)),
        ValueError,  # sparse tensors reach the generic kernel, whose checks refuse them
        r"tensors\[0\] must be strided \(dense\), got layout Sparse",
    ),
    (
        # Found by tests/test_fuzz.py: a meta tensor sends the call to the fake kernel, which used to
        # return without touching the real (CPU) tensors.
        "meta tensor with a cpu buffer",
        lambda: ops.pack_into([torch.zeros(2, device="meta")], [0], torch.zeros(4)),
        ValueError,
        r"pack_into: tensors\[0\] is on meta but buffer is on cpu",
    ),
    (
        "cpu targets with a meta tensor among them",
        lambda: ops.unpack_from(torch.zeros(4), [0, 2], 1.0, [torch.zeros(2), torch.zeros(2, device="meta")]),
        ValueError,
        r"unpack_from: tensors\[1\] is on meta but buffer is on cpu",
    ),
    (
        "zero divisor",
        lambda: ops.unpack_from(torch.zeros(4), [0], 0.0, [torch.zeros(2)]),
        ValueError,
        "divisor must be a finite positive number, got 0",
    ),
    (
        "infinite divisor",
        lambda: ops.unpack_from(torch.zeros(4), [0], float("inf"), [torch.zeros(2)]),
        ValueError,
        "divisor must be a finite positive number, got inf",
    ),
]


@pytest.mark.parametrize("description, call, exception, message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clear_errors(description, call, exception, message):
    with pytest.raises(exception, match=message):
        call()


def test_generic_kernels_check_arguments_the_same_way():
    with pytest.raises(ValueError, match="does not fit in a buffer of 4 elements"):
        _C._pack_into_generic([torch.zeros(3)], [2], torch.zeros(4))
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] overlap in the buffer"):
        _C._pack_into_generic([torch.zeros(2), torch.zeros(2)], [0, 1], torch.zeros(4))
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] overlap in the buffer"):
        ops._check_disjoint_slots("pack_into", [torch.zeros(2), torch.zeros(2)], [0, 1])  # the fake kernels' copy
    ops._check_disjoint_slots("pack_into", [torch.zeros(2), torch.zeros(0), torch.zeros(2)], [2, 1, 0])  # disjoint
    with pytest.raises(ValueError, match="divisor must be a finite positive number, got -1"):
        _C._unpack_from_generic(torch.zeros(4), [0], -1.0, [torch.zeros(2)])
