"""Collectives that go wrong: mismatched ranks, NaN, an exception in the `with` block, a dead or stalled
rank. Every case must end in a clear error on every rank, never a hang or silently wrong parameters."""

import re

import pytest
import torch
from multiprocess import run_ranks

from localsgd_ext import _C, ParameterAverager

LOST_RANK_GROUP_TIMEOUT = 10  # seconds: short, so that a stalled rank fails the others quickly


@pytest.mark.parametrize(
    "mismatch, expected",
    [
        ("shape", r"parameter index 1: rank 0 has layer1.weight \(5,\) float32, rank 1 has layer1.weight \(6,\) float32"),
        ("dtype", r"parameter index 2: rank 0 has layer2.weight \(2, 2\) float32, rank 1 has layer2.weight \(2, 2\) bfloat16"),
        ("count", r"parameter index 3: rank 0 has no such parameter, rank 2 has layer3.weight \(7,\) float32"),
    ],
)
def test_mismatched_ranks_all_raise_naming_the_first_difference(mismatch, expected):
    results = run_ranks(3, "workers_reliability:mismatched_layouts", mismatch, timeout=60)
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank} did not raise"
        assert "do not hold the same parameters" in r["error"]
        assert re.search(expected, r["error"]), r["error"]
        assert r["untouched"], f"rank {rank}: nothing may be averaged"
    assert len({r["error"] for r in results}) == 1, "every rank must say the same"


def test_a_rank_repointing_a_parameter_alone_is_caught_at_the_next_sync():
    for rank, r in enumerate(run_ranks(3, "workers_reliability:repointed_on_one_rank", timeout=60)):
        assert r["error"] and "rank 1 has params[0] (2, 8) float32" in r["error"], (rank, r["error"])


def test_nonfinite_values_are_refused_on_every_rank_with_check_finite():
    for r in run_ranks(2, "workers_reliability:nonfinite_values", True, timeout=60):
        assert r["error"] and "non-finite values (NaN or Inf)" in r["error"] and "rank 1 at b" in r["error"]
        assert r["untouched"]


def test_nonfinite_values_are_averaged_as_is_by_default():
    for r in run_ranks(2, "workers_reliability:nonfinite_values", False, timeout=60):
        assert r["error"] is None
        assert torch.isnan(r["after"][1][2]) and torch.equal(r["after"][0], torch.full((3,), 0.5))


def test_exception_inside_with_propagates_without_averaging():
    results = run_ranks(2, "workers_reliability:exception_inside_with", timeout=60)
    for r in results:
        assert r["raised"] == "'a bug in the training loop'"
        assert r["sync_count"] == 0, "no average after an exception"
        assert r["grad_sync_back_on"], "no_sync() must be left"
    assert not torch.equal(results[0]["weight"], results[1]["weight"]), "each rank keeps its own parameters"


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_survivors_raise_a_clear_error_within_the_group_timeout(how):
    results = run_ranks(
        3,
        "workers_reliability:lost_rank",
        how,
        2,
        may_fail=(2,),
        timeout=90,
        env={"LOCALSGD_TEST_GROUP_TIMEOUT": str(LOST_RANK_GROUP_TIMEOUT)},
    )
    for rank in (0, 1):
        r = results[rank]
        assert r["error"] is not None, f"rank {rank} did not notice the lost rank"
        assert "another process of the group did not take part" in r["error"], r["error"]
        assert f"rank {rank} of 3" in r["error"]
        assert r["seconds"] <= LOST_RANK_GROUP_TIMEOUT + 5, f"rank {rank} took {r['seconds']:.1f} s"


def test_a_tensor_subclass_handled_in_python_is_refused_not_read_without_the_gil():
    # Such a tensor (DTensor, here torch's own TwoTensor test subclass) has no storage to pack, and its
    # operations need the GIL that the engine releases: reading it there crashed the process.
    from torch.testing._internal.two_tensor import TwoTensor

    subclass = TwoTensor(torch.zeros(4), torch.ones(4))
    message = r"tensors\[0\] is a tensor subclass handled in Python \(such as DTensor\)"
    with pytest.raises(TypeError, match=message):
        _C.content_fingerprints([subclass])
    with pytest.raises(TypeError, match=message):
        ParameterAverager([torch.nn.Parameter(subclass)])
