"""comm_dtype: float32 tensors on a bfloat16/float16 wire, cast inside the compiled pack and unpack."""

import pytest
import torch
from multiprocess import run_ranks

from localsgd_ext import ops

# Unit roundoff (half an ulp, relative) of each wire dtype.
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_pack_casts_and_unpack_widens_then_divides_in_float32(wire):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1000, generator=gen), torch.randn(7, 9, generator=gen).t(), torch.randn(3, generator=gen)]
    offsets = [0, 1008, 1080]
    buffer = torch.full((1088,), float("nan"), dtype=wire)
    ops.pack_into(tensors, offsets, buffer)
    for t, offset in zip(tensors, offsets):
        assert torch.equal(buffer[offset : offset + t.numel()], t.reshape(-1).to(wire))  # round to nearest even
    outputs = [torch.empty_like(t) for t in tensors]
    ops.unpack_from(buffer, offsets, 3.0, outputs)
    for out, offset in zip(outputs, offsets):
        expected = buffer[offset : offset + out.numel()].float().view(out.shape) / 3.0
        assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_only_float32_tensors_may_differ_from_the_buffer():
    buffer = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype Double but buffer has dtype BFloat16"):
        ops.pack_into([torch.zeros(4, dtype=torch.float64)], [0], buffer)
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype Float but buffer has dtype Double"):
        ops.pack_into([torch.zeros(4)], [0], torch.zeros(8, dtype=torch.float64))


def test_opcheck_with_a_cast():
    tensors = [torch.randn(5), torch.randn(2, 3)]
    torch.library.opcheck(torch.ops.localsgd_ext.pack_into.default, ([*tensors], [0, 8], torch.zeros(16, dtype=torch.bfloat16)))
    torch.library.opcheck(torch.ops.localsgd_ext.unpack_from.default, (torch.randn(16).bfloat16(), [0, 8], 2.0, [*tensors]))


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [2.0**-3, 2.0**14])
def test_pack_scales_in_float32_before_the_cast(wire, scale):
    gen = torch.Generator().manual_seed(1)
    # Small and large contiguous tensors (the CPU kernel converts large fp16 ones through ATen) and a strided one.
    tensors = [torch.randn(3000, generator=gen), torch.randn(7, 9, generator=gen).t(), torch.randn(40000, generator=gen)]
    offsets = [0, 3008, 3072]
    buffer = torch.zeros(43072, dtype=wire)
    ops.pack_into(tensors, offsets, buffer, scale)
    for t, offset in zip(tensors, offsets):
        assert torch.equal(buffer[offset : offset + t.numel()], (t.reshape(-1) * scale).to(wire))
    outputs = [torch.empty_like(t) for t in tensors]
    ops.unpack_from(buffer, offsets, 3.0 * scale, outputs)
    for out, offset in zip(outputs, offsets):
        assert torch.equal(out, buffer[offset : offset + out.numel()].float().view(out.shape) / (3.0 * scale))
    torch.library.opcheck(torch.ops.localsgd_ext.pack_into.default, (tensors, offsets, buffer, scale))


@pytest.mark.parametrize("packer", ["dispatched", "generic"])
def test_pack_refuses_a_scale_on_plain_copies_and_bad_scales(packer):
    from localsgd_ext import _C

    pack = ops.pack_into if packer == "dispatched" else _C._pack_into_generic
    with pytest.raises(
        ValueError,
        match=r"scale must be 1 unless every tensor is float32 cast .* tensors\[0\] has dtype Float and buffer Float, got scale 2",
    ):
        pack([torch.zeros(4)], [0], torch.zeros(4), 2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            pack([torch.zeros(4)], [0], torch.zeros(4, dtype=torch.float16), bad)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_mean_on_a_narrow_wire_is_within_the_rounding_bound(world_size, wire):
    ranks = run_ranks(world_size, "workers_beyond:comm_dtype_average", wire)
    u = UNIT_ROUNDOFF[wire]
    for r in ranks:
        assert r["dtypes"] == [torch.float32] * 3 + [torch.bfloat16]  # dtypes kept
        assert r["wire_element_sizes"] == [2]  # every bucket travels in 2-byte elements
        for i in range(3):
            values = torch.stack([other["inputs"][i].double() for other in ranks])
            exact = values.mean(0)
            # Each value rounds once into the wire dtype, and each of the world_size - 1 additions once.
            bound = world_size * u * values.abs().mean(0) * 1.01 + 1e-30
            error = (r["outputs"][i].double() - exact).abs()
            assert (error <= bound).all(), f"tensor {i}: worst error / bound {(error / bound).max()}"
        # And it did travel narrow: not the float32 mean.
        assert not torch.equal(r["outputs"][0], torch.stack([o["inputs"][0] for o in ranks]).mean(0))
    for other in ranks[1:]:
        for a, b in zip(ranks[0]["outputs"], other["outputs"]):
            assert torch.equal(a, b)  # every rank unpacks the same sum: bit-identical


def test_local_sgd_with_a_bf16_wire_trains_like_float32():
    ranks = run_ranks(2, "workers_beyond:comm_dtype_training", timeout=180)
    for r in ranks:
        assert r["bf16"]["last_loss"] < 0.1 * r["bf16"]["first_loss"]
        assert abs(r["bf16"]["last_loss"] - r["fp32"]["last_loss"]) < 0.2 * r["fp32"]["last_loss"] + 1e-3
    for a, b in zip(ranks[0]["bf16"]["params"], ranks[1]["bf16"]["params"]):
        assert torch.equal(a, b)
