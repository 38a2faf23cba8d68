"""Overlapped sync (sync_delay) on real gloo ranks: the merge formula, exactly, and a training run with
averages in flight. The cadence and the argument checks are tested in-process in test_cadence.py."""

import pytest
import torch

from localsgd_ext import Int8Averager, ops
from multiprocess import run_ranks


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


def int8_bound(deltas_per_rank, block_size):
    """|result - exact mean| <= mean_r(step_r) / 2 + step_mean / 2, step = max|block| / 127, on the
    flattened, block-padded deltas; step_mean bounded through the exact mean plus the first error."""
    flats = []
    for deltas in deltas_per_rank:
        flat = torch.cat([d.reshape(-1) for d in deltas])
        flats.append(torch.nn.functional.pad(flat, (0, -flat.numel() % block_size)))
    steps = [f.view(-1, block_size).abs().amax(1) / 127 for f in flats]
    first = sum(steps) / len(steps) / 2
    exact = sum(flats) / len(flats)
    mean_step = (exact.view(-1, block_size).abs().amax(1) + first) / 127
    bound = (first + mean_step / 2).repeat_interleave(block_size)
    return exact, bound


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("error_feedback", [False, True])
def test_int8_wire_stays_within_its_bound_and_leaves_ranks_identical(world_size, error_feedback):
    results = run_ranks(world_size, "workers_streaming:int8_average", error_feedback, False, timeout=90)
    exact, bound = int8_bound([r["deltas"] for r in results], 256)
    anchor = torch.cat([a.reshape(-1) for a in results[0]["anchor"]])
    result = torch.cat([t.reshape(-1) for t in results[0]["result"]])
    n = result.numel()
    error = (result - (anchor + exact[:n])).abs()
    assert torch.all(error <= bound[:n] * (1 + 1e-5) + 1e-6), float((error - bound[:n]).max())
    assert error.max() > 0, "int8 cannot be exact here: the test would not see a wrong bound"
    for r in results[1:]:
        for a, b in zip(r["result"], results[0]["result"]):
            assert torch.equal(a, b), "every rank adds the same mean delta to the same anchor"
    padded = -(-n // (world_size * 256)) * world_size * 256
    assert results[0]["wire_bytes"] == 2 * (world_size - 1) * (padded // world_size) * (1 + 4 / 256)
    if error_feedback:
        for r in results:
            assert r["residual"] is not None and r["residual"].abs().max() > 0


@pytest.mark.parametrize("halve_in_outer_step", [False, True])
def test_int8_wire_overlapped_merges_the_mean_into_local_progress(halve_in_outer_step):
    """p = snapshot + later progress becomes p + (new anchor - snapshot) = new anchor + later, where the new
    anchor is the mean of the snapshots, or what the outer step made of it (here: half of it)."""
    results = run_ranks(2, "workers_streaming:int8_average", False, True, halve_in_outer_step, timeout=90)
    exact, bound = int8_bound([r["deltas"] for r in results], 256)
    anchor = torch.cat([a.reshape(-1) for a in results[0]["anchor"]])
    n = anchor.numel()
    factor = 0.5 if halve_in_outer_step else 1.0
    for r in results:
        later = torch.cat([t.reshape(-1) for t in r["later"]])
        result = torch.cat([t.reshape(-1) for t in r["result"]])
        error = (result - later - factor * (anchor + exact[:n])).abs()
        assert torch.all(error <= factor * bound[:n] * (1 + 1e-5) + 1e-5)
    assert torch.equal(results[0]["new_anchor"], results[1]["new_anchor"]), "the anchors stay identical"


def test_error_feedback_keeps_what_quantization_left_out():
    """sent + residual = accumulated delta, sync after sync (in-process: the quantizing side alone)."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.zeros(1000)]
    averager = Int8Averager(tensors, block_size=128, error_feedback=True)
    averager._anchor, averager._snapshot, averager._delta, averager._residual = (torch.zeros(1024) for _ in range(4))
    accumulated, sent = torch.zeros(1024, dtype=torch.float64), torch.zeros(1024, dtype=torch.float64)
    for _ in range(5):
        # Magnitudes spread over decades, so that quantization leaves real residuals.
        tensors[0].copy_(torch.randn(1000, generator=generator) * torch.rand(1000, generator=generator) ** 4)
        accumulated[:1000] += tensors[0].double()
        codes, scales = averager._quantized_delta()
        sent += ops.dequantize_blocks(codes[None], scales[None], 128).double()
        assert torch.allclose(sent + averager._residual.double(), accumulated, rtol=0, atol=1e-5)
    assert averager._residual.abs().max() > 0


@pytest.mark.parametrize(
    "options",
    [
        dict(wire="int8"),
        dict(wire="int8", error_feedback=True, sync_delay=2),
        dict(num_fragments=2, sync_delay=1),
        dict(num_fragments=2, outer_optimizer="diloco"),
        dict(wire="int8", error_feedback=True, outer_optimizer="diloco"),
        dict(wire="int8", outer_optimizer="diloco", sync_delay=1, num_fragments=2),  # Streaming DiLoCo
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()),
)
def test_training_converges_with_each_streaming_option(options):
    options = dict(options)
    sync_delay = options.pop("sync_delay", 0)
    results = run_ranks(2, "workers_streaming:streaming_training", sync_delay, options, timeout=120)
    for r in results:
        assert sum(r["losses"][-10:]) < 0.1 * sum(r["losses"][:10]), "the loss must fall by 10x"
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b), "the exit sync leaves every rank bit-identical"
