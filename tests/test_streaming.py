"""Overlapped sync (sync_delay) on real gloo ranks: the merge formula, exactly, and a training run with
averages in flight. The cadence and the argument checks are tested in-process in test_cadence.py."""

import pytest
import torch

from localsgd_ext import ops
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
