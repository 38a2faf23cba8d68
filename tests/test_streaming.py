"""Overlapped sync (sync_delay) on real gloo ranks: the merge formula, exactly, and a training run with
averages in flight. The cadence and the argument checks are tested in-process in test_cadence.py."""

import math

import pytest
import torch
from multiprocess import run_ranks

from localsgd_ext import QuantizedAverager, ops
from localsgd_ext.quantized_wire import _Anchored, _WireBuffers


@pytest.mark.parametrize("world_size", [2, 3])
def test_merge_adds_the_averaged_correction_to_local_progress(world_size):
    results = run_ranks(world_size, "workers_streaming:delayed_merge", timeout=90)
    for rank, r in enumerate(results):
        assert r["pending"] and not r["pending_after"]
        for i, (progressed, snap, merged) in enumerate(zip(r["progressed"], r["snapshots"], r["merged"])):
            math = torch.float32 if progressed.dtype == torch.bfloat16 else progressed.dtype
            total = results[0]["snapshots"][i]
            for other in results[1:]:
                total = total + other["snapshots"][i]  # in the wire dtype, as gloo sums
            expected = (progressed.to(math) + (total.to(math) / world_size - snap.to(math))).to(progressed.dtype)
            if world_size == 2:  # two addends: gloo's sum is the same single rounding
                assert torch.equal(merged, expected), (rank, i)
            else:
                assert torch.allclose(merged.float(), expected.float(), rtol=1e-2 if i else 1e-5, atol=1e-2 if i else 1e-5)


def fp16_wire_scale(values, world_size):
    """csrc/agreement.cpp's narrow_wire_scale, written again: the power of two that brings the group's
    largest |value| times the group size to at most 2**15."""
    amax = max(float(t.abs().max()) for t in values)
    return 2.0 ** (math.frexp(32768.0 / (amax * world_size))[1] - 1)


@pytest.mark.parametrize("comm_dtype, magnitude", [("fp32", 1.0), ("bfloat16", 1.0), ("float16", 1e5), ("float16", 1e-6)])
def test_the_float_wires_overlapped_sync_hands_the_mean_to_an_outer_step_and_merges_its_result(comm_dtype, magnitude):
    results = run_ranks(2, "workers_streaming:delayed_merge_with_outer_step", comm_dtype, magnitude, timeout=90)
    # fp16: the agreed power of two, 2**-5 here for values to 4e5 (which would overflow fp16) and 2**32 for
    # values near 1e-6 (which would lose their low bits in fp16's subnormals).
    scale = fp16_wire_scale([t for r in results for t in r["snapshots"]], 2) if comm_dtype == "float16" else 1.0
    assert scale == {1.0: 1.0, 1e5: 2.0**-5, 1e-6: 2.0**32}[magnitude]
    for r in results:
        assert not r["pending_after"]
        for i, (progressed, snap, mean, merged) in enumerate(zip(r["progressed"], r["snapshots"], r["means"], r["merged"])):

            def wire(t):  # the wire's rounding, scaled by a power of two on the way
                return t if comm_dtype == "fp32" else (t * scale).to(getattr(torch, comm_dtype)).float() / scale

            total = wire(results[0]["snapshots"][i]) + wire(results[1]["snapshots"][i])
            assert torch.equal(mean, wire(total) / 2), i  # the same bits on both ranks
            assert torch.equal(mean, results[0]["means"][i])
            expected = progressed + (wire(mean * 0.5) - wire(snap))  # the outer step's result, then the merge
            assert torch.equal(merged, expected), i


@pytest.mark.parametrize("wire, overlapped", [("int8", False), ("fp8", True)])
def test_the_quantized_wire_gives_the_same_bits_in_one_piece_or_many(wire, overlapped):
    for whole, *in_pieces in run_ranks(2, "workers_streaming:quantized_pieces_agree", wire, overlapped, timeout=90):
        # 5120 padded elements: in pieces of 1024, and of 2048, 2048 and 1024.
        assert [whole["pieces"]] + [r["pieces"] for r in in_pieces] == [1, 5, 3]
        for pieces in in_pieces:
            for a, b in zip(whole["tensors"], pieces["tensors"]):
                assert torch.equal(a, b)
            assert torch.equal(whole["residual"], pieces["residual"])


def test_merge_op_matches_its_formula_and_passes_opcheck():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(100, generator=generator), torch.randn(9, 7, generator=generator).t()]
    total, snap = torch.randn(170, generator=generator), torch.randn(170, generator=generator)
    before = [t.clone() for t in tensors]
    ops.merge_into(total, snap, [0, 104], 3.0, tensors)
    for t, b, offset in zip(tensors, before, [0, 104]):
        view = lambda buffer: buffer[offset : offset + b.numel()].view(b.shape)  # noqa: E731
        assert torch.equal(t, b + (view(total) / 3.0 - view(snap)))
    torch.library.opcheck(torch.ops.localsgd_ext.merge_into.default, (total, snap, [0, 104], 3.0, tensors))
    with pytest.raises(TypeError, match="merge_into: sum and snapshot must have one dtype"):
        ops.merge_into(total, snap.bfloat16(), [0, 104], 3.0, tensors)
    with pytest.raises(ValueError, match="merge_into: divisor must be a finite positive number, got 0"):
        ops.merge_into(total, snap, [0, 104], 0.0, tensors)
    with pytest.raises(ValueError, match="merge_into: scale must be 1 unless every tensor is float32 cast to a"):
        ops.merge_into(total, snap, [0, 104], 3.0, tensors, scale=0.5)


def test_merge_op_divides_an_fp16_wires_scale_out_of_both_buffers():
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(100, generator=generator) * 1e5, torch.randn(9, 7, generator=generator).t() * 1e5]
    scale = 2.0**-5
    total = (torch.randn(170, generator=generator) * 1e5 * scale).half()
    snap = (torch.randn(170, generator=generator) * 1e5 * scale).half()
    before = [t.clone() for t in tensors]
    ops.merge_into(total, snap, [0, 104], 3.0, tensors, scale=scale)
    for t, b, offset in zip(tensors, before, [0, 104]):
        view = lambda buffer: buffer[offset : offset + b.numel()].view(b.shape).float()  # noqa: E731
        assert torch.equal(t, b + (view(total) / (3.0 * scale) - view(snap) / scale))
    torch.library.opcheck(torch.ops.localsgd_ext.merge_into.default, (total, snap, [0, 104], 3.0, tensors, scale))


def test_training_with_averages_in_flight_converges_and_ends_identical():
    results = run_ranks(2, "workers_streaming:streaming_training", 2, timeout=120)
    for r in results:
        assert sum(r["losses"][-10:]) < 0.1 * sum(r["losses"][:10]), "the loss must fall by 10x"
        assert r["sync_count"] == 15 + 1  # 15 merged (started at 4, 8, ..., 60: the last merged at exit) + exit
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b), "the exit sync waits: every rank ends bit-identical"


@pytest.mark.parametrize("world_size, local_sgd_steps, num_fragments", [(2, 4, 1), (2, 4, 2), (3, 6, 3)])
def test_fragments_average_their_own_parameters_at_their_own_steps(world_size, local_sgd_steps, num_fragments):
    steps = 9
    results = run_ranks(world_size, "workers_streaming:fragment_syncs", local_sgd_steps, num_fragments, steps, timeout=120)
    starts = results[0]["fragment_starts"] + [len(results[0]["final"])]
    assert len(starts) == num_fragments + 1
    stride = local_sgd_steps // num_fragments
    for step in range(1, steps + 1):
        due = [(step // stride - 1) % num_fragments] if step % stride == 0 else []
        for fragment in range(num_fragments):
            for i in range(starts[fragment], starts[fragment + 1]):
                mine = [r["after"][step - 1][i] for r in results]
                if fragment in due:
                    total = results[0]["before"][step - 1][i]
                    for other in results[1:]:
                        total = total + other["before"][step - 1][i]
                    for value in mine:
                        assert torch.equal(value, mine[0]), (step, i, "ranks must leave a sync bit-identical")
                        assert torch.allclose(value, total / world_size, rtol=0, atol=1e-6), (step, i)
                        if world_size == 2:
                            assert torch.equal(value, total / 2), (step, i)
                else:
                    for r in results:
                        assert torch.equal(r["after"][step - 1][i], r["before"][step - 1][i]), (step, i, "not due")
    for a, b in zip(results[0]["final"], results[-1]["final"]):
        assert torch.equal(a, b), "the exit sync averages every fragment"


def quantization_error_bound(values, block_size, wire):
    """Per element, the most one quantization of `values` (flat, block-padded) can err by: half an int8
    step of the block (max|block| / 127 / 2); for fp8, half a unit in the last of 3 mantissa bits
    (|value| / 16), or half the subnormal step (scale / 1024, scale = max|block| / 448)."""
    blocks = values.view(-1, block_size)
    largest = blocks.abs().amax(1, keepdim=True)
    if wire == "int8":
        return (largest / 127 / 2).expand_as(blocks).reshape(-1)
    return torch.maximum(blocks.abs() / 16, largest / 448 / 1024).reshape(-1)


def quantized_mean_bound(deltas_per_rank, block_size, wire):
    """The exact mean of the ranks' deltas, and how far the wire's mean may be from it: the senders'
    errors averaged, plus the error of quantizing the chunk mean again, bounded through |exact| + first
    (both bounds grow with the values they are given)."""
    flats = []
    for deltas in deltas_per_rank:
        flat = torch.cat([d.reshape(-1) for d in deltas])
        flats.append(torch.nn.functional.pad(flat, (0, -flat.numel() % block_size)))
    first = sum(quantization_error_bound(f, block_size, wire) for f in flats) / len(flats)
    exact = sum(flats) / len(flats)
    return exact, first + quantization_error_bound(exact.abs() + first, block_size, wire)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("wire, error_feedback", [("int8", False), ("int8", True), ("fp8", False), ("fp8", True)])
def test_quantized_wire_stays_within_its_bound_and_leaves_ranks_identical(world_size, wire, error_feedback):
    results = run_ranks(world_size, "workers_streaming:quantized_average", wire, error_feedback, False, timeout=90)
    exact, bound = quantized_mean_bound([r["deltas"] for r in results], 256, wire)
    anchor = torch.cat([a.reshape(-1) for a in results[0]["anchor"]])
    result = torch.cat([t.reshape(-1) for t in results[0]["result"]])
    n = result.numel()
    error = (result - (anchor + exact[:n])).abs()
    assert torch.all(error <= bound[:n] * (1 + 1e-5) + 1e-6), float((error - bound[:n]).max())
    assert error.max() > 0, "quantization cannot be exact here: the test would not see a wrong bound"
    for r in results[1:]:
        for a, b in zip(r["result"], results[0]["result"]):
            assert torch.equal(a, b), "every rank adds the same mean delta to the same anchor"
    padded = -(-n // (world_size * 256)) * world_size * 256
    assert results[0]["wire_bytes"] == 2 * (world_size - 1) * (padded // world_size) * (1 + 4 / 256)
    if error_feedback:
        for r in results:
            assert r["residual"] is not None and r["residual"].abs().max() > 0


@pytest.mark.parametrize("wire, halve_in_outer_step", [("int8", False), ("int8", True), ("fp8", True)])
def test_quantized_wire_overlapped_merges_the_mean_into_local_progress(wire, halve_in_outer_step):
    """p = snapshot + later progress becomes p + (new anchor - snapshot) = new anchor + later, where the new
    anchor is the mean of the snapshots, or what the outer step made of it (here: half of it)."""
    results = run_ranks(2, "workers_streaming:quantized_average", wire, False, True, halve_in_outer_step, timeout=90)
    exact, bound = quantized_mean_bound([r["deltas"] for r in results], 256, wire)
    anchor = torch.cat([a.reshape(-1) for a in results[0]["anchor"]])
    n = anchor.numel()
    factor = 0.5 if halve_in_outer_step else 1.0
    for r in results:
        later = torch.cat([t.reshape(-1) for t in r["later"]])
        result = torch.cat([t.reshape(-1) for t in r["result"]])
        error = (result - later - factor * (anchor + exact[:n])).abs()
        assert torch.all(error <= factor * bound[:n] * (1 + 1e-5) + 1e-5)
    assert torch.equal(results[0]["new_anchor"], results[1]["new_anchor"]), "the anchors stay identical"


@pytest.mark.parametrize("wire", ["int8", "fp8"])
def test_error_feedback_keeps_what_quantization_left_out(wire):
    """sent + residual = accumulated delta, sync after sync (in-process: the quantizing side alone)."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.zeros(1000)]
    averager = QuantizedAverager(tensors, wire=wire, block_size=128, error_feedback=True)
    anchor, snapshot, residual = (torch.zeros(1024) for _ in range(3))
    wire = _WireBuffers.for_length(1024, 1, 128, averager._code_dtype, "cpu")
    averager._anchored = _Anchored(anchor=anchor, snapshot=snapshot, residual=residual, wire=wire, pieces=[(0, 1024)])
    accumulated, sent = torch.zeros(1024, dtype=torch.float64), torch.zeros(1024, dtype=torch.float64)
    for _ in range(5):
        # Magnitudes spread over decades, so that quantization leaves real residuals.
        tensors[0].copy_(torch.randn(1000, generator=generator) * torch.rand(1000, generator=generator) ** 4)
        accumulated[:1000] += tensors[0].double()
        codes, scales = averager._quantized_delta(keep_snapshot=False)
        sent += ops.dequantize_blocks(codes[None], scales[None], 128).double()
        assert torch.allclose(sent + residual.double(), accumulated, rtol=0, atol=1e-5)
    assert residual.abs().max() > 0


EVERY_4TH = list(range(4, 61, 4))


@pytest.mark.parametrize(
    "options, completed, final_count, identical",
    [
        # Waited syncs every 4th step (the quantized wire's first in float32), then the exit's.
        (dict(wire="int8"), EVERY_4TH, 16, "model"),
        # Syncs start at 4, 8, ... (the anchor was taken on enter) and merge 2 steps later; the exit merges
        # the one started at step 60, then syncs.
        (dict(wire="int8", error_feedback=True, sync_delay=2), list(range(6, 59, 4)), 16, None),
        # A fragment every 2 steps, each merged the step after; the exit merges step 60's and syncs both.
        (dict(num_fragments=2, sync_delay=1), list(range(3, 60, 2)), 32, None),
        # A fragment every 2 steps, waited; the exit skips the fragment whose outer step ran at step 60.
        (dict(num_fragments=2, outer_optimizer="diloco"), list(range(2, 61, 2)), 31, "fragment"),
        # Waited outer steps every 4th step; the exit has nothing left to sync.
        (dict(wire="int8", error_feedback=True, outer_optimizer="diloco"), EVERY_4TH, 15, "model"),
        # Streaming DiLoCo: a fragment every 2 steps, merged a step after.
        (dict(wire="int8", outer_optimizer="diloco", sync_delay=1, num_fragments=2), list(range(3, 60, 2)), 32, None),
        (dict(wire="fp8", error_feedback=True, sync_delay=2), list(range(6, 59, 4)), 16, None),
        # Streaming DiLoCo on the float wire: every sync overlapped, merged 2 steps after it started.
        (dict(sync_delay=2, outer_optimizer="diloco"), list(range(6, 59, 4)), 16, None),
        # The same on the fp16 wire, its scale agreed as each sync starts.
        (dict(sync_delay=2, outer_optimizer="diloco", wire="fp16"), list(range(6, 59, 4)), 16, None),
    ],
    ids=lambda value: ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_training_with_each_streaming_option_syncs_when_documented_and_converges(options, completed, final_count, identical):
    options = dict(options)
    sync_delay = options.pop("sync_delay", 0)
    results = run_ranks(2, "workers_streaming:streaming_training", sync_delay, options, timeout=120)
    for r in results:
        grew = [step for step in range(1, 61) if r["counts"][step - 1] > (r["counts"][step - 2] if step > 1 else 0)]
        assert grew == completed, "the steps that completed a sync"
        assert [step for step in range(1, 61) if r["synced"][step - 1]] == completed, "last_step_synced"
        assert r["sync_count"] == final_count, "the exit's syncs counted"
        assert sum(r["losses"][-10:]) < 0.1 * sum(r["losses"][:10]), "the loss must fall by 10x"
    for step in completed if identical else ():
        weight, bias = zip(*(r["steps"][step - 1] for r in results))
        if identical == "model":
            assert torch.equal(*weight) and torch.equal(*bias), (step, "a waited sync leaves the ranks identical")
        else:  # fragment 0 (the weight) syncs at steps 2, 6, ...; fragment 1 (the bias) at 4, 8, ...
            synced, other = (weight, bias) if step % 4 == 2 else (bias, weight)
            assert torch.equal(*synced) and not torch.equal(*other), (step, "only the fragment synced is identical")
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b), "the exit sync leaves every rank bit-identical"


@pytest.mark.parametrize("options", [{}, {"sync_delay": 1, "outer_optimizer": "diloco"}], ids=["waited", "streaming diloco"])
def test_the_quantized_wire_takes_a_model_with_other_dtypes(options):
    # Its codec reads float32: the float32 layer travels quantized, the bfloat16 one on the float wire.
    results = run_ranks(2, "workers_streaming:mixed_dtypes_on_the_quantized_wire", options, timeout=120)
    for r in results:
        assert r["parts"] == ["QuantizedAverager", "ParameterAverager"]
        assert r["sync_count"] == 3, "steps 2 and 4, then the exit"
        for a, b in zip(r["final"], results[0]["final"]):
            assert torch.equal(a, b), "the exit leaves every rank identical"
        assert [p.dtype for p in r["final"]] == [torch.float32] * 2 + [torch.bfloat16] * 2
    if options:
        return
    for step in (2, 4):  # waited syncs: every parameter is its mean across the ranks
        for i in range(4):
            a, b = (r["after"][step - 1][i] for r in results)
            assert torch.equal(a, b), (step, i)
            mean = (results[0]["before"][step - 1][i].float() + results[1]["before"][step - 1][i].float()) / 2
            if i < 2:  # int8: within one quantization step of the changes since the last sync
                change = max((r["before"][step - 1][i] - r["after"][step - 1][i]).abs().max() for r in results)
                assert (a - mean).abs().max() <= change / 64 + 1e-6, (step, i)
            else:  # bfloat16 on the float wire: the mean, rounded to bfloat16
                torch.testing.assert_close(a.float(), mean, rtol=2**-7, atol=1e-3)
