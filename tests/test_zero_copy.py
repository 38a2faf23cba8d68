"""Zero-copy mode: flattening at construction, what it refuses, and parameters re-pointed or replaced
between syncs (real gloo ranks). Its agreement with Accelerate is in test_local_sgd_vs_accelerate.py."""

import pytest
import torch
from multiprocess import run_ranks

from localsgd_ext import ParameterAverager


def _assert_means(got, expected):
    """`expected` is computed as `value + (world - 1) / 2`, the mean rounded once; the average rounds
    the sum and then the division, so they may differ by an ulp."""
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, i
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6, msg=f"tensor {i}")


def test_flattening_keeps_objects_and_values_and_holds_no_staging():
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7)), torch.randn(2, 2).t()]
    values = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    averager = ParameterAverager(params, zero_copy=True, bucket_cap_mb=1)
    assert [id(p) for p in averager.params] == ids
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    assert all(p.is_contiguous() for p in params)  # the transposed one included
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert params[0].requires_grad and params[0].grad_fn is None
    bucket = averager.buckets[0]
    assert averager.flat_bytes == bucket["numel"] * bucket["element_size"]
    assert averager.staging_bytes == 0


def test_zero_copy_refuses_tensors_sharing_memory():
    base = torch.zeros(10)
    with pytest.raises(ValueError, match=r"zero_copy cannot flatten tensors that share memory: tensors\[0\] and tensors\[1\]"):
        ParameterAverager([base[:6], base[4:]], zero_copy=True)
    # Disjoint views of one storage are fine, and are untied only from the storage, not from each other.
    ParameterAverager([base[:5], base[5:]], zero_copy=True)


@pytest.mark.parametrize("bad", [1, None, "yes"])
def test_zero_copy_must_be_a_bool(bad):
    with pytest.raises(TypeError, match=f"zero_copy must be a bool, got {bad!r}"):
        ParameterAverager([torch.zeros(2)], zero_copy=bad)


@pytest.mark.parametrize("world_size", [2, 3])
def test_repointed_tensors_are_flattened_again_and_averaged(world_size):
    for rank in run_ranks(world_size, "workers_zero_copy:repointed_tensors_are_flattened_again"):
        assert rank["staging_bytes"] == 0 and rank["flat_bytes"] > 0
        for case in ("data_assigned", "module_to", "load_state_dict"):
            _assert_means(rank[case]["got"], rank[case]["expected"])
        assert rank["data_assigned"]["one_storage"]
        assert rank["module_to"]["one_storage"]
        assert set(rank["module_to"]["dtypes"]) == {torch.float64}
        assert rank["load_state_dict"]["storage_kept"]


def test_parameters_replaced_by_load_state_dict_assign_are_averaged():
    for rank in run_ranks(2, "workers_zero_copy:replaced_parameters_are_averaged"):
        assert rank["replaced"]
        _assert_means(rank["got"], rank["expected"])
        assert rank["one_storage"]


@pytest.mark.parametrize("options", [dict(wire="bf16"), dict(wire="int8"), dict(sync_delay=1)], ids=lambda o: str(o))
def test_syncs_that_stage_keep_the_parameters_flat(options):
    # The values of these combinations are test_combinations.py's; here, the layout.
    results = run_ranks(2, "workers_zero_copy:staged_syncs_keep_the_parameters_flat", options)
    for rank in results:
        assert rank["flat_on_enter"] and rank["flat_after_sync"], rank
        assert rank["off_the_buffer"] and rank["flat_again"], "a re-pointed parameter is flattened again at the next sync"
        assert rank["sync_count"] >= 2
        for a, b in zip(rank["final"], results[0]["final"]):
            assert torch.equal(a, b), "ranks end identical"
