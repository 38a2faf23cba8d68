"""The quantized wires' compiled operators (quantize_blocks, dequantize_blocks; int8 and float8 e4m3
codes): against references written with torch ops, the error bounds, opcheck, and the argument errors,
on every device present."""

import pytest
import torch

from localsgd_ext import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# int8, float8 e4m3, and int4 two per byte (uint8).
CODE_DTYPES = [torch.int8, torch.float8_e4m3fn, torch.uint8]


def reference_quantize(x, block_size):
    blocks = x.view(-1, block_size)
    scales = blocks.abs().amax(dim=1) / 127.0
    codes = torch.where(scales[:, None] > 0, torch.round(blocks / scales[:, None]), torch.zeros_like(blocks))
    return codes.clamp(-127, 127).to(torch.int8).view(-1), scales


def reference_dequantize(codes, scales, block_size, divisor):
    total = torch.zeros(codes.shape[1], dtype=torch.float32, device=codes.device)
    for row, row_scales in zip(codes, scales):
        # Each row's scale divided first, so that a sum of finite rows cannot overflow.
        total = total + row.float() * (row_scales / divisor).repeat_interleave(block_size)
    return total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 5, 256, 1024])
def test_quantize_matches_the_reference_and_stays_within_half_a_step(device, block_size):
    generator = torch.Generator().manual_seed(block_size)
    x = torch.randn(block_size * 9, generator=generator) * torch.logspace(-6, 3, 9).repeat_interleave(block_size)
    x[:block_size] = 0  # an all-zero block
    x = x.to(device)
    codes, scales = ops.quantize_blocks(x, block_size)
    expected_codes, expected_scales = reference_quantize(x, block_size)
    assert torch.equal(scales, expected_scales) and torch.equal(codes, expected_codes)
    error = (ops.dequantize_blocks(codes[None], scales[None], block_size) - x).abs()
    step = scales.repeat_interleave(block_size)
    assert torch.all(error <= step / 2 * (1 + 1e-6)), "each element within half a step of its block"
    assert torch.all(codes[:block_size] == 0) and scales[0] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [3, 256, 1024])
def test_fp8_codes_match_torch_and_stay_within_their_bound(device, block_size):
    generator = torch.Generator().manual_seed(block_size)
    # Decades of magnitudes within each block, so that many values land among e4m3's subnormals.
    x = (
        torch.randn(block_size * 8, generator=generator)
        * torch.logspace(-5, 2, block_size * 8)[torch.randperm(block_size * 8, generator=generator)]
    )
    x[:block_size] = 0
    x = x.to(device)
    codes, scales = ops.quantize_blocks(x, block_size, torch.float8_e4m3fn)
    assert codes.dtype == torch.float8_e4m3fn
    blocks = x.view(-1, block_size)
    expected_scales = blocks.abs().amax(1) / 448
    assert torch.equal(scales, expected_scales)
    safe = torch.where(expected_scales > 0, expected_scales, torch.ones_like(expected_scales))[:, None]
    expected_codes = torch.where(expected_scales[:, None] > 0, (blocks / safe).clamp(-448, 448), torch.zeros_like(blocks))
    assert torch.equal(codes.view(torch.uint8), expected_codes.to(torch.float8_e4m3fn).view(-1).view(torch.uint8))
    values = ops.dequantize_blocks(codes[None], scales[None], block_size)
    assert torch.equal(values, (codes.float().view(-1, block_size) * scales[:, None]).view(-1))
    bound = torch.maximum(x.abs() / 16, (scales / 1024).repeat_interleave(block_size))
    assert torch.all((values - x).abs() <= bound * (1 + 1e-6))


def unpack_int4(codes):
    """The int4 codes two per byte, element 2i in the low nibble, as int8 in -8..7."""
    low = ((codes & 0x0F).to(torch.int16) ^ 8) - 8
    high = ((codes >> 4).to(torch.int16) ^ 8) - 8
    return torch.stack([low, high], 1).reshape(-1).to(torch.int8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [2, 64, 1024])
def test_int4_codes_match_the_reference_and_stay_within_half_a_step(device, block_size):
    generator = torch.Generator().manual_seed(block_size)
    x = torch.randn(block_size * 9, generator=generator) * torch.logspace(-6, 3, 9).repeat_interleave(block_size)
    x[:block_size] = 0
    x = x.to(device)
    codes, scales = ops.quantize_blocks(x, block_size, torch.uint8)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() // 2, "two codes per byte"
    blocks = x.view(-1, block_size)
    expected_scales = blocks.abs().amax(1) / 7
    safe = torch.where(expected_scales > 0, expected_scales, torch.ones_like(expected_scales))[:, None]
    expected = torch.where(expected_scales[:, None] > 0, torch.round(blocks / safe), torch.zeros_like(blocks))
    assert torch.equal(scales, expected_scales)
    assert torch.equal(unpack_int4(codes.cpu()), expected.clamp(-7, 7).to(torch.int8).view(-1).cpu())
    values = ops.dequantize_blocks(codes[None], scales[None], block_size)
    assert torch.all((values - x).abs() <= scales.repeat_interleave(block_size) / 2 * (1 + 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_round_to_even_and_non_finite_blocks_dequantize_to_nan(device):
    x = torch.tensor([127.0, 2.5, 3.5, -2.5, 1.0, float("nan"), 0.0, 1.0, float("inf"), 1.0, 2.0, 3.0], device=device)
    codes, scales = ops.quantize_blocks(x, 4)
    assert scales[0] == 1 and codes[:4].tolist() == [127, 2, 4, -2]
    assert codes[4:].tolist() == [0] * 8 and torch.isnan(scales[1]) and torch.isinf(scales[2])
    values = ops.dequantize_blocks(codes[None], scales[None], 4)
    assert torch.isnan(values[4:]).all() and torch.equal(values[:4], torch.tensor([127.0, 2, 4, -2], device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, divisor", [(1, 1.0), (2, 2.0), (3, 3.0)])
def test_dequantize_sums_rows_in_order_each_scaled_by_the_divisor(device, rows, divisor):
    generator = torch.Generator().manual_seed(rows)
    codes = torch.randint(-127, 128, (rows, 3 * 64), generator=generator, dtype=torch.int8).to(device)
    scales = torch.rand(rows, 3, generator=generator).to(device)
    assert torch.equal(ops.dequantize_blocks(codes, scales, 64, divisor), reference_dequantize(codes, scales, 64, divisor))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(4 * 32, device=device)
    torch.library.opcheck(torch.ops.localsgd_ext.quantize_blocks.default, (x, 32))
    codes, scales = ops.quantize_blocks(x, 32)
    torch.library.opcheck(torch.ops.localsgd_ext.dequantize_blocks.default, (codes[None], scales[None], 32, 2.0))
    torch.library.opcheck(torch.ops.localsgd_ext.quantize_blocks.default, (x, 32, torch.float8_e4m3fn))
    codes, scales = ops.quantize_blocks(x, 32, torch.float8_e4m3fn)
    # opcheck's schema test compares float8 inputs with an arithmetic torch does not implement for them
    # ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'); the other three run.
    torch.library.opcheck(
        torch.ops.localsgd_ext.dequantize_blocks.default,
        (codes[None], scales[None], 32, 1.0),
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize(
    "call, exception, message",
    [
        (
            lambda: ops.quantize_blocks(torch.randn(10), 4),
            ValueError,
            "x's length must be a multiple of block_size .* got 10 elements and block_size 4",
        ),
        (lambda: ops.quantize_blocks(torch.randn(8).double(), 4), TypeError, "x must be float32, got Double"),
        (lambda: ops.quantize_blocks(torch.randn(4, 4), 4), ValueError, "x must be a 1-D contiguous tensor"),
        (lambda: ops.quantize_blocks(torch.randn(8), 0), ValueError, "block_size must be between 1 and 1048576, got 0"),
        (
            lambda: ops.quantize_blocks(torch.randn(8), 4, torch.float16),
            TypeError,
            r"code_dtype must be torch.int8, torch.float8_e4m3fn or torch.uint8 \(int4, two per byte\), got Half",
        ),
        (
            lambda: ops.dequantize_blocks(torch.zeros(1, 8, dtype=torch.int8), torch.ones(1, 3), 4),
            ValueError,
            r"scales must be contiguous with sizes \[1, 2\]",
        ),
        (
            lambda: ops.dequantize_blocks(torch.zeros(1, 8), torch.ones(1, 2), 4),
            TypeError,
            "codes must be int8, float8_e4m3fn or uint8 \\(int4\\), got Float",
        ),
        (
            lambda: ops.dequantize_blocks(torch.zeros(1, 8, dtype=torch.int8), torch.ones(1, 2), 4, 0.0),
            ValueError,
            "divisor must be a finite positive number, got 0",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("code_dtype", CODE_DTYPES)
def test_cuda_and_cpu_kernels_give_the_same_bits(code_dtype):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1024 * 33, generator=generator) * torch.logspace(-4, 2, 1024 * 33)
    x[100] = float("nan")
    cpu_codes, cpu_scales = ops.quantize_blocks(x, 1024, code_dtype)
    gpu_codes, gpu_scales = ops.quantize_blocks(x.cuda(), 1024, code_dtype)
    assert torch.equal(cpu_codes.view(torch.uint8), gpu_codes.cpu().view(torch.uint8))
    assert torch.equal(cpu_scales.nan_to_num(-1.0), gpu_scales.cpu().nan_to_num(-1.0))
    rows_codes = torch.stack([cpu_codes, cpu_codes.flip(0)])
    rows_scales = torch.stack([cpu_scales, cpu_scales.flip(0)])
    cpu_mean = ops.dequantize_blocks(rows_codes, rows_scales, 1024, 2.0)
    gpu_mean = ops.dequantize_blocks(rows_codes.cuda(), rows_scales.cuda(), 1024, 2.0)
    assert torch.equal(cpu_mean.nan_to_num(-1.0), gpu_mean.cpu().nan_to_num(-1.0))


# quantize_change / requantize_mean / apply_quantized_mean: the quantized wire's send side, the
# reduction's middle and the receive side, one pass each.


def _change_inputs(block_size, blocks, device, seed):
    generator = torch.Generator().manual_seed(seed)
    n = block_size * blocks
    snapshot = (torch.randn(n, generator=generator) * torch.logspace(-3, 3, n)).to(device)
    anchor = torch.randn(n, generator=generator).to(device)
    residual = (torch.randn(n, generator=generator) * 0.01).to(device)
    snapshot[:block_size] = anchor[:block_size]  # a block that did not change
    return snapshot, anchor, residual


def _codes_out(n, block_size, code_dtype, device):
    per_storage = ops.codes_per_storage(code_dtype)
    return torch.empty(n // per_storage, dtype=code_dtype, device=device), torch.empty(n // block_size, device=device)


def _quantize_change(snapshot, anchor, residual, block_size, code_dtype):
    codes, scales = _codes_out(snapshot.numel(), block_size, code_dtype, snapshot.device)
    ops.quantize_change(snapshot, anchor, residual, block_size, codes, scales)
    return codes, scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "code_dtype, block_size",
    [(d, b) for d in CODE_DTYPES for b in (1, 7, 256, 1024) if b % ops.codes_per_storage(d) == 0],
)
def test_quantize_change_is_quantize_blocks_of_the_change_and_leaves_its_residual(device, code_dtype, block_size):
    snapshot, anchor, residual = _change_inputs(block_size, 5, device, block_size)
    change = snapshot - anchor + residual
    codes, scales = ops.quantize_blocks(change, block_size, code_dtype)
    left_out = change - ops.dequantize_blocks(codes[None], scales[None], block_size)
    got_codes, got_scales = _quantize_change(snapshot, anchor, residual, block_size, code_dtype)
    assert torch.equal(got_codes.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(got_scales, scales)
    assert torch.equal(residual, left_out), "error feedback keeps exactly what the codes left out"
    plain_codes, plain_scales = _quantize_change(snapshot, anchor, None, block_size, code_dtype)
    codes, scales = ops.quantize_blocks(snapshot - anchor, block_size, code_dtype)
    assert torch.equal(plain_codes.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(plain_scales, scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code_dtype", CODE_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_requantize_mean_is_quantize_blocks_of_the_dequantized_mean(device, code_dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 6 * 64, generator=generator) * torch.logspace(-3, 3, 6 * 64)).to(device)
    x[:, :64] = 0  # an all-zero block
    sent = [ops.quantize_blocks(row, 64, code_dtype) for row in x]
    codes, scales = torch.stack([c for c, _ in sent]), torch.stack([s for _, s in sent])
    expected_codes, expected_scales = ops.quantize_blocks(ops.dequantize_blocks(codes, scales, 64, rows), 64, code_dtype)
    mean_codes, mean_scales = _codes_out(6 * 64, 64, code_dtype, device)
    ops.requantize_mean(codes, scales, 64, mean_codes, mean_scales)
    assert torch.equal(mean_codes.view(torch.uint8), expected_codes.view(torch.uint8))
    assert torch.equal(mean_scales, expected_scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code_dtype", CODE_DTYPES)
def test_apply_quantized_mean_moves_the_anchor_by_the_dequantized_codes(device, code_dtype):
    snapshot, anchor, _ = _change_inputs(64, 4, device, 3)
    codes, scales = ops.quantize_blocks(snapshot, 64, code_dtype)
    expected = anchor + ops.dequantize_blocks(codes[None], scales[None], 64)
    ops.apply_quantized_mean(codes, scales, 64, anchor)
    assert torch.equal(anchor, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_wire_ops_pass_opcheck(device):
    snapshot, anchor, residual = _change_inputs(32, 4, device, 5)
    codes, scales = _codes_out(snapshot.numel(), 32, torch.int8, device)
    torch.library.opcheck(torch.ops.localsgd_ext.quantize_change.default, (snapshot, anchor, residual, 32, codes, scales))
    torch.library.opcheck(torch.ops.localsgd_ext.quantize_change.default, (snapshot, anchor, None, 32, codes, scales))
    mean_codes, mean_scales = _codes_out(64, 32, torch.int8, device)
    torch.library.opcheck(
        torch.ops.localsgd_ext.requantize_mean.default, (codes.view(2, 64), scales.view(2, 2), 32, mean_codes, mean_scales)
    )
    torch.library.opcheck(torch.ops.localsgd_ext.apply_quantized_mean.default, (codes, scales, 32, anchor))


def _int8(n):
    return torch.zeros(n, dtype=torch.int8)


@pytest.mark.parametrize(
    "call, exception, message",
    [
        (
            lambda: ops.quantize_change(torch.zeros(8), torch.zeros(6), None, 2, _int8(8), torch.zeros(4)),
            ValueError,
            r"anchor must have the length of the others \(8\), got 6",
        ),
        (
            lambda: ops.quantize_change(torch.zeros(8), torch.zeros(8), torch.zeros(8).double(), 2, _int8(8), torch.zeros(4)),
            TypeError,
            "residual must be float32, got Double",
        ),
        (
            lambda: ops.quantize_change(torch.zeros(10), torch.zeros(10), None, 4, _int8(10), torch.zeros(2)),
            ValueError,
            "the length must be a multiple of block_size",
        ),
        (
            lambda: ops.quantize_change(torch.zeros(8), torch.zeros(8, device="meta"), None, 4, _int8(8), torch.zeros(2)),
            ValueError,
            "anchor is on meta but the others on cpu",
        ),
        (
            lambda: ops.quantize_change(
                torch.zeros(8), torch.zeros(8), None, 4, torch.zeros(8, dtype=torch.float16), torch.zeros(2)
            ),
            TypeError,
            "codes must be int8, float8_e4m3fn or uint8",
        ),
        (
            lambda: ops.quantize_change(torch.zeros(8), torch.zeros(8), None, 4, _int8(8), torch.zeros(3)),
            ValueError,
            r"scales must be 1-D and contiguous with 2 entries",
        ),
        (
            lambda: ops.requantize_mean(_int8(8).view(2, 4), torch.ones(2, 1), 4, _int8(8), torch.zeros(1)),
            ValueError,
            "mean_codes must be 1-D and contiguous with 4 elements",
        ),
        (
            lambda: ops.requantize_mean(
                _int8(8).view(2, 4), torch.ones(2, 1), 4, torch.zeros(4, dtype=torch.float8_e4m3fn), torch.zeros(1)
            ),
            TypeError,
            "mean_codes must have the codes' dtype",
        ),
        (
            lambda: ops.apply_quantized_mean(_int8(8), torch.ones(3), 4, torch.zeros(8)),
            ValueError,
            "scales must be 1-D and contiguous with 2 entries",
        ),
        (
            lambda: ops.apply_quantized_mean(torch.zeros(8), torch.ones(2), 4, torch.zeros(8)),
            TypeError,
            "codes must be int8, float8_e4m3fn or uint8",
        ),
        (
            lambda: ops.apply_quantized_mean(_int8(8), torch.ones(2), 4, torch.zeros(4)),
            ValueError,
            r"anchor must be 1-D and contiguous with the codes' 8 elements, got sizes \[4\]",
        ),
    ],
)
def test_the_fused_wire_ops_refuse_bad_arguments(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("code_dtype", CODE_DTYPES)
def test_cuda_and_cpu_fused_wire_ops_give_the_same_bits(code_dtype):
    snapshot, anchor, residual = _change_inputs(1024, 34, "cpu", 9)
    snapshot[5000] = float("nan")
    gpu_residual = residual.cuda()
    cpu_codes, cpu_scales = _quantize_change(snapshot, anchor, residual, 1024, code_dtype)
    gpu_codes, gpu_scales = _quantize_change(snapshot.cuda(), anchor.cuda(), gpu_residual, 1024, code_dtype)
    assert torch.equal(cpu_codes.view(torch.uint8), gpu_codes.cpu().view(torch.uint8))
    assert torch.equal(cpu_scales.nan_to_num(-1.0), gpu_scales.cpu().nan_to_num(-1.0))
    assert torch.equal(residual.nan_to_num(-1.0), gpu_residual.cpu().nan_to_num(-1.0))
    rows_codes, rows_scales = cpu_codes.view(2, -1), cpu_scales.view(2, -1)
    cpu_mean = _codes_out(rows_codes.shape[1], 1024, code_dtype, "cpu")
    gpu_mean = _codes_out(rows_codes.shape[1], 1024, code_dtype, "cuda")
    ops.requantize_mean(rows_codes, rows_scales, 1024, *cpu_mean)
    ops.requantize_mean(rows_codes.cuda(), rows_scales.cuda(), 1024, *gpu_mean)
    assert torch.equal(cpu_mean[0].view(torch.uint8), gpu_mean[0].cpu().view(torch.uint8))
    assert torch.equal(cpu_mean[1].nan_to_num(-1.0), gpu_mean[1].cpu().nan_to_num(-1.0))
    gpu_anchor = anchor.cuda()
    ops.apply_quantized_mean(cpu_codes, cpu_scales, 1024, anchor)
    ops.apply_quantized_mean(cpu_codes.cuda(), cpu_scales.cuda(), 1024, gpu_anchor)
    assert torch.equal(anchor.nan_to_num(-1.0), gpu_anchor.cpu().nan_to_num(-1.0))


def _window_layout(device):
    """Tensors of odd sizes, one empty and one non-contiguous (a transposed view), with a gap: elements
    300..310 belong to no tensor. Windows then straddle tensors, the gap and the padding."""
    generator = torch.Generator().manual_seed(11)
    tensors = [torch.randn(n, generator=generator).to(device) for n in [37, 200, 0, 63, 150, 1]]
    tensors.append(torch.randn(9, 7, generator=generator).to(device).t())  # 63 elements, not contiguous
    offsets = [0, 37, 237, 237, 310, 460, 461]
    return tensors, offsets, 524


def _packed(tensors, offsets, length, device):
    flat = torch.zeros(length, device=device)
    ops.pack_into([t.contiguous() for t in tensors], offsets, flat)
    return flat


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code_dtype", CODE_DTYPES)
@pytest.mark.parametrize("contiguous_only", [True, False])
def test_the_window_ops_give_the_bits_of_pack_quantize_apply_unpack(device, code_dtype, contiguous_only):
    block_size = 16
    tensors, offsets, used = _window_layout(device)
    if contiguous_only:
        tensors[-1] = tensors[-1].contiguous()
    length = -(-used // (4 * block_size)) * 4 * block_size  # padded to whole blocks of 4 "ranks"
    anchor = _packed(tensors, offsets, length, device) + 0.5
    generator = torch.Generator().manual_seed(3)
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=generator).to(device))
    packed = _packed(tensors, offsets, length, device)
    residual = torch.randn(length, generator=generator).to(device) * 1e-3
    for start, end in [(0, length), (0, 4 * block_size), (4 * block_size, length), (2 * block_size, 17 * block_size)]:
        window = slice(start, end)
        expected_residual = residual[window].clone()
        expected = _quantize_change(packed[window], anchor[window], expected_residual, block_size, code_dtype)
        got_residual, snapshot = residual[window].clone(), torch.full((end - start,), float("nan"), device=device)
        codes, scales = _codes_out(end - start, block_size, code_dtype, device)
        ops.quantize_tensors_change(tensors, offsets, start, anchor[window], got_residual, block_size, codes, scales, snapshot)
        assert torch.equal(codes.view(torch.uint8), expected[0].view(torch.uint8)) and torch.equal(scales, expected[1])
        assert torch.equal(got_residual, expected_residual)
        assert torch.equal(snapshot, packed[window]), "the snapshot holds the window's elements, zero in gaps"
        plain = _codes_out(end - start, block_size, code_dtype, device)
        ops.quantize_tensors_change(tensors, offsets, start, anchor[window], None, block_size, *plain)
        expected_plain = _quantize_change(packed[window], anchor[window], None, block_size, code_dtype)
        assert torch.equal(plain[0].view(torch.uint8), expected_plain[0].view(torch.uint8))

        # The receive side: the window's anchor moves, the tensors' elements in the window take its values, the
        # rest of every tensor is untouched.
        expected_anchor = anchor[window].clone()
        ops.apply_quantized_mean(codes, scales, block_size, expected_anchor)
        expected_tensors = [t.clone() for t in tensors]
        full = _packed(tensors, offsets, length, device)
        full[window] = expected_anchor
        ops.unpack_from(full, offsets, 1.0, expected_tensors)
        got_anchor, got_tensors = anchor[window].clone(), [t.clone() for t in tensors]
        if not contiguous_only:
            got_tensors[-1] = got_tensors[-1].t().contiguous().t()  # keeps the strides of a transposed view
        ops.apply_quantized_mean_to(codes, scales, block_size, got_anchor, offsets, start, got_tensors)
        assert torch.equal(got_anchor, expected_anchor)
        for got, want in zip(got_tensors, expected_tensors):
            assert torch.equal(got, want)


@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("error_feedback", [False, True])
def test_quantizing_the_tensors_in_place_gives_the_bits_of_the_packed_change(code_dtype, error_feedback):
    """Without a snapshot, the CPU kernel reads each block where it lies when one tensor holds it, and makes
    a block's codes (and residual) in the loop that scans the next: the same codes, scales and residual as
    quantize_change of the packed window, over blocks held by one tensor, blocks that straddle tensors or a
    gap, unchanged blocks (scale 0), a NaN, a change that overflows float32, the last block of a task (64
    blocks of 1024) and windows that start mid-layout."""
    block_size = 1024
    generator = torch.Generator().manual_seed(5)
    tensors = [torch.randn(n, generator=generator) for n in [5 * 1024 + 3, 90_000, 1, 70 * 1024, 2000]]
    offsets = [0, 5 * 1024 + 3, 5 * 1024 + 3 + 90_000 + 11, 5 * 1024 + 3 + 90_000 + 12, 180_000]
    length = -(-(offsets[-1] + tensors[-1].numel()) // block_size) * block_size
    tensors[1][50_000] = 3e38
    packed = _packed(tensors, offsets, length, "cpu")
    anchor = packed + torch.randn(length, generator=generator) * 0.01
    anchor[2 * block_size : 4 * block_size] = packed[2 * block_size : 4 * block_size]  # unchanged blocks
    anchor[8 * block_size + 5] = float("nan")
    anchor[offsets[1] + 50_000] = -3e38  # a change of 6e38: an infinite scale
    anchor[63 * block_size : 66 * block_size] = packed[63 * block_size : 66 * block_size]  # at a task's edge
    residual = None
    if error_feedback:
        residual = torch.randn(length, generator=generator) * 1e-3
        residual[2 * block_size : 4 * block_size] = residual[63 * block_size : 66 * block_size] = 0
    for start, end in [(0, length), (block_size, 70 * block_size), (3 * block_size, 4 * block_size)]:
        window = slice(start, end)
        expected_residual = None if residual is None else residual[window].clone()
        expected = _quantize_change(packed[window], anchor[window], expected_residual, block_size, code_dtype)
        got_residual = None if residual is None else residual[window].clone()
        codes, scales = _codes_out(end - start, block_size, code_dtype, "cpu")
        ops.quantize_tensors_change(tensors, offsets, start, anchor[window], got_residual, block_size, codes, scales)
        assert torch.equal(codes.view(torch.uint8), expected[0].view(torch.uint8)), (start, end)
        assert torch.equal(scales.view(torch.int32), expected[1].view(torch.int32)), (start, end)
        if residual is not None:
            assert torch.equal(got_residual.view(torch.int32), expected_residual.view(torch.int32)), (start, end)
        if start == 0:  # the cases named above are there
            assert (scales == 0).any() and scales.isnan().any() and scales.isinf().any()


def test_a_window_past_the_streaming_size_writes_the_same_bits():
    """From 8 MiB of window, apply_quantized_mean_to writes the tensors with streaming stores
    (streaming_stores.h): odd sizes and offsets (unaligned starts), a gap, the same bits as apply + unpack."""
    block_size = 1024
    generator = torch.Generator().manual_seed(4)
    tensors = [torch.randn(n, generator=generator) for n in [37, 1_200_001, 0, 63, 1_100_003]]
    offsets = [0, 37, 1_200_038, 1_200_038, 1_200_111]
    length = -(-(offsets[-1] + tensors[-1].numel()) // (4 * block_size)) * 4 * block_size
    assert length * 4 >= 8 * 2**20
    anchor = _packed(tensors, offsets, length, "cpu") + 0.25
    codes, scales = _codes_out(length, block_size, torch.int8, "cpu")
    ops.quantize_tensors_change(tensors, offsets, 0, anchor, None, block_size, codes, scales, None)
    expected_anchor, expected_tensors = anchor.clone(), [t.clone() for t in tensors]
    ops.apply_quantized_mean(codes, scales, block_size, expected_anchor)
    ops.unpack_from(expected_anchor, offsets, 1.0, expected_tensors)
    ops.apply_quantized_mean_to(codes, scales, block_size, anchor, offsets, 0, tensors)
    assert torch.equal(anchor, expected_anchor)
    for got, want in zip(tensors, expected_tensors):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_the_window_ops_pass_opcheck(device):
    tensors, offsets, used = _window_layout(device)
    tensors[-1] = tensors[-1].contiguous()
    length = -(-used // 32) * 32
    anchor, residual = torch.zeros(length, device=device), torch.zeros(length, device=device)
    codes, scales = _codes_out(length, 32, torch.int8, device)
    op = torch.ops.localsgd_ext
    torch.library.opcheck(
        op.quantize_tensors_change.default, (tensors, offsets, 0, anchor, residual, 32, codes, scales, anchor.clone())
    )
    torch.library.opcheck(
        op.quantize_tensors_change.default, (tensors, offsets, 64, anchor[64:], None, 32, codes[64:], scales[2:], None)
    )
    torch.library.opcheck(op.apply_quantized_mean_to.default, (codes, scales, 32, anchor, offsets, 0, tensors))


def _quantize_with_shared_memory(case):
    """quantize_tensors_change with an output in memory that an input or another output also uses."""
    tensors, anchor, residual, codes, scales = [torch.zeros(3), torch.zeros(2)], torch.zeros(8), None, _int8(8), torch.zeros(2)
    if case == "residual is the anchor":
        residual = anchor
    elif case == "codes in a tensor":
        codes = tensors[1].view(torch.int8)
    else:
        flat = torch.zeros(10)
        residual, scales = flat[2:], flat[1:3]
    ops.quantize_tensors_change(tensors, [0, 3], 0, anchor, residual, 4, codes, scales)


@pytest.mark.parametrize(
    "call, exception, message",
    [
        (
            lambda: ops.quantize_tensors_change([torch.zeros(3)], [0], -1, torch.zeros(8), None, 4, _int8(8), torch.zeros(2)),
            ValueError,
            "quantize_tensors_change: start must be at least 0, got -1",
        ),
        (
            lambda: ops.quantize_tensors_change(
                [torch.zeros(3).double()], [0], 0, torch.zeros(8), None, 4, _int8(8), torch.zeros(2)
            ),
            TypeError,
            r"quantize_tensors_change: tensors\[0\] must be float32, got Double",
        ),
        (
            lambda: ops.quantize_tensors_change(
                [torch.zeros(3), torch.zeros(3)], [0, 2], 0, torch.zeros(8), None, 4, _int8(8), torch.zeros(2)
            ),
            ValueError,
            r"tensors\[0\] and tensors\[1\] overlap",
        ),
        (
            lambda: ops.quantize_tensors_change(
                [torch.zeros(3)], [0], 0, torch.zeros(8), None, 4, _int8(8), torch.zeros(2), torch.zeros(4)
            ),
            ValueError,
            r"snapshot must have the length of the others \(8\), got 4",
        ),
        (
            lambda: _quantize_with_shared_memory("residual is the anchor"),
            ValueError,
            "quantize_tensors_change: residual must not share memory with anchor, got overlapping tensors",
        ),
        (
            lambda: _quantize_with_shared_memory("codes in a tensor"),
            ValueError,
            r"quantize_tensors_change: codes must not share memory with tensors\[1\], got overlapping tensors",
        ),
        (
            lambda: _quantize_with_shared_memory("scales in the residual"),
            ValueError,
            "quantize_tensors_change: residual must not share memory with scales, got overlapping tensors",
        ),
        (
            lambda: ops.apply_quantized_mean_to(_int8(8), torch.ones(2), 4, torch.zeros(8), [0, 1], 0, [torch.zeros(1)]),
            ValueError,
            "apply_quantized_mean_to: tensors and offsets must have the same length, got 1 tensors and 2 offsets",
        ),
    ],
)
def test_the_window_ops_refuse_bad_arguments(call, exception, message):
    with pytest.raises(exception, match=message):
        call()
