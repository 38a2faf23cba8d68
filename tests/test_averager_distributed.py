"""ParameterAverager across real gloo processes: correct means, identical ranks, storage kept."""

import pytest
import torch
from multiprocess import run_ranks

TOLERANCE = {  # for 3 ranks, where gloo's summation order may differ from a sequential sum
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def _expected_mean(per_rank_tensors):
    stacked = torch.stack([t.double() for t in per_rank_tensors])
    return stacked.mean(0)


def check_means(world_size, results, syncs):
    """Every rank's tensors after each sync are the mean of what the ranks held before it."""
    for reduce_op in ("avg", "sum"):
        ours = [r[reduce_op] for r in results]
        for sync in range(syncs):
            for i in range(len(ours[0]["after"][sync])):
                inputs = [rank["before"][sync][i] for rank in ours]
                outputs = [rank["after"][sync][i] for rank in ours]
                # Bit-identical on every rank, same shape and dtype as before.
                for out in outputs[1:]:
                    assert torch.equal(out, outputs[0]), f"{reduce_op} sync {sync} tensor {i} differs across ranks"
                assert outputs[0].dtype == inputs[0].dtype and outputs[0].shape == inputs[0].shape
                if world_size == 1:
                    # The mean of one is the tensor itself, through the same pack, collective, unpack.
                    assert torch.equal(outputs[0], inputs[0]), f"{reduce_op} tensor {i}"
                elif world_size == 2:
                    # Two summands add the same way in any order: exactly torch's (a + b) / 2.
                    assert torch.equal(outputs[0], (inputs[0] + inputs[1]) / 2), f"{reduce_op} tensor {i}"
                else:
                    torch.testing.assert_close(
                        outputs[0].double(),
                        _expected_mean(inputs),
                        rtol=TOLERANCE[inputs[0].dtype],
                        atol=TOLERANCE[inputs[0].dtype],
                    )
        for rank in ours:
            assert rank["same_storage"], "averaging must update the tensors in place"
    # AVG by the backend and SUM + fused division agree bit for bit.
    for rank in results:
        for a, b in zip(rank["avg"]["after"][-1], rank["sum"]["after"][-1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("bucket_cap_mb", [1, 25])
def test_average_matches_mean_and_ranks_agree(world_size, bucket_cap_mb):
    syncs = 3
    check_means(world_size, run_ranks(world_size, "workers_averager:average_mixed", bucket_cap_mb, syncs), syncs)


@pytest.mark.parametrize("bucket_cap_mb", [1, 25])
def test_plan_covers_every_tensor_once_and_staging_is_bounded(bucket_cap_mb):
    results = run_ranks(2, "workers_averager:average_mixed", bucket_cap_mb, 1)
    plan = results[0]["avg"]["buckets"]
    assert plan == results[1]["avg"]["buckets"], "every rank must build the same plan"
    indices = sorted(i for bucket in plan for i in bucket["tensor_indices"])
    assert indices == list(range(10))
    cap_bytes = bucket_cap_mb * 2**20
    largest_tensor_bytes = 600 * 500 * 4
    # Two staging buffers (one in flight, one being packed), each at most one bucket.
    assert results[0]["avg"]["staging_bytes"] <= 2 * max(cap_bytes, largest_tensor_bytes)


def test_repointed_parameters_are_replanned_not_skipped():
    results = run_ranks(2, "workers_averager:average_after_repointing")
    for rank in results:
        assert torch.equal(rank["first"][0], torch.full((4, 4), 0.5))
        assert torch.equal(rank["first"][1], torch.full((3,), 5.0))
        assert torch.equal(rank["second"][0], torch.full((2, 5), 1.5))
        assert torch.equal(rank["second"][1], torch.full((3,), 1.0, dtype=torch.float64))
        assert rank["dtypes"] == [torch.float32, torch.float64]


def test_parameters_requiring_grad_are_averaged_in_place():
    for rank in run_ranks(2, "workers_averager:average_leaf_parameters_requiring_grad"):
        assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in rank["values"])
        assert rank["versions_moved"] == [True, True]
        assert rank["requires_grad"] == [True, True]


def test_repointing_to_integer_data_is_refused_by_name():
    for rank in run_ranks(2, "workers_averager:average_after_repointing_to_integers"):
        assert rank["error"] is not None, "averaging integer data must be refused"
        assert "tensors[1] must have a floating-point dtype to be averaged, got Long" in rank["error"]
        assert torch.equal(rank["untouched"][0], torch.full((4,), 0.5))


def test_a_group_torch_distributed_did_not_create_is_averaged_over():
    # torchft's reconfigurable groups are built from a store, outside torch.distributed's group map, and a
    # replica may have no default group at all: the engine, both wires and the agreement check's report
    # must work from the group object alone.
    results = run_ranks(2, "workers_averager:average_over_a_group_torch_did_not_create")
    for r in results:
        assert not r["default_group"]
        assert torch.equal(r["floats"][0], torch.full((300,), 0.5)) and torch.equal(r["floats"][1], torch.ones(7))
        exact = torch.linspace(-1, 1, 5000) + 0.015
        # Within the int8 wire's bound: half a step of each sender's block and of the mean's (changes <= 0.02).
        assert torch.all((r["quantized"][0] - exact).abs() <= 0.02 / 127 + 1e-6)
        assert r["mismatch"].startswith("RanksDisagreeError") and "rank 1" in r["mismatch"], r["mismatch"]
    assert torch.equal(results[0]["quantized"][0], results[1]["quantized"][0]), "bit-identical on both ranks"
