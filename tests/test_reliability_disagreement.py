"""Reliability II: ranks that disagree on anything that decides the wire, buffers that cannot be
averaged as they are, narrow wires at their limits, local failures, nesting and Ctrl-C. Each case was
a crash, a hang or a silently wrong result; each must now be a clear error on every rank (or a correct
result), with nothing averaged wrongly. Real gloo ranks throughout."""

import re

import pytest
import torch
from multiprocess import run_ranks
from workers_disagreement import SETTING_CASES

SHORT_GROUP_TIMEOUT = {"LOCALSGD_TEST_GROUP_TIMEOUT": "20"}


def test_ranks_configured_differently_all_raise_naming_the_setting():
    results = run_ranks(2, "workers_disagreement:settings_disagree", timeout=180)
    for option, *_ in SETTING_CASES + [("engine bucket_cap_mb",)]:
        key = option.replace("engine ", "")
        for rank, r in enumerate(results):
            outcome = r[option]
            assert outcome["type"] == "RanksDisagreeError", (option, rank, outcome)
            assert f"the ranks' settings differ: {key} is" in outcome["error"], (option, outcome["error"])
            assert outcome["untouched"], (option, rank)
        assert results[0][option]["error"] == results[1][option]["error"], option
    assert "bucket_cap_mb is 25.0 on rank 0, 5e-05 on rank 1" in results[0]["bucket_cap_mb"]["error"]
    assert "local_sgd_steps is 4 on rank 0, 8 on rank 1" in results[0]["local_sgd_steps"]["error"]


@pytest.mark.parametrize("rank0_bigger", [True, False])
def test_integer_buffers_of_different_shapes_are_refused_not_mixed(rank0_bigger):
    results = run_ranks(2, "workers_disagreement:integer_buffers_of_different_shapes", rank0_bigger, timeout=90)
    sizes = (5, 3) if rank0_bigger else (3, 5)
    for rank, r in enumerate(results):
        assert r["error"] and "do not hold the same buffers" in r["error"], r["error"]
        assert re.search(
            rf"rank 0 has module.counts \({sizes[0]},\) int64, rank 1 has module.counts \({sizes[1]},\) int64", r["error"]
        )
        assert torch.equal(r["counts"], torch.arange(10, 10 + sizes[rank])), "buffers must stay untouched"


def test_complex_buffers_are_averaged_as_complex_values_not_destroyed():
    results = run_ranks(2, "workers_disagreement:complex_buffers", timeout=90)
    for r in results:
        assert torch.equal(r["freqs_after"], r["freqs_before"]), "an identical complex table must survive bit for bit"
        assert torch.equal(r["phase"], torch.full((3,), complex(1.5, -3.0), dtype=torch.complex64))


@pytest.mark.parametrize("check_finite", [False, True])
def test_fp16_wire_neither_overflows_nor_flushes_and_keeps_in_range_bits(check_finite):
    results = run_ranks(2, "workers_disagreement:fp16_wire", check_finite, timeout=90)
    inputs = [r["inputs"] for r in results]
    for r in results:
        large = r["large"]
        assert torch.isfinite(large).all(), "40000 and 41000 must average to about 40500, not inf"
        assert (large - 40500).abs().max() <= 2 * 2**-11 * 41000
        tiny = r["tiny"]
        assert (tiny - 1.5e-8).abs().max() <= 2**-10 * 1.5e-8, "1e-8 and 2e-8 must not flush to zero"
        # Where fp16 holds the values unscaled, scaling changes no bit: the sum of the fp16 values, in
        # fp16, divided in float32.
        expected = (inputs[0]["ordinary"].half() + inputs[1]["ordinary"].half()).float() / 2
        assert torch.equal(r["ordinary"], expected)
    assert torch.equal(results[0]["large"], results[1]["large"]) and torch.equal(results[0]["tiny"], results[1]["tiny"])


def test_parameters_registered_in_different_order_are_refused_by_name():
    for r in run_ranks(2, "workers_disagreement:names_in_different_order", timeout=90):
        assert r["type"] == "RanksDisagreeError"
        assert "parameter index 0: rank 0 has module.alpha (3,) float32, rank 1 has module.beta (3,) float32" in r["error"]
        assert r["untouched"]


def test_diloco_refuses_ranks_that_start_from_different_parameters():
    for r in run_ranks(2, "workers_disagreement:diloco_unequal_start", timeout=90):
        assert r["error"] and "start from different values, first at module.2.bias" in r["error"], r["error"]


def test_nested_with_on_one_local_sgd_is_refused_and_grad_sync_stays_off():
    for r in run_ranks(2, "workers_disagreement:nested_with", timeout=90):
        assert r["error"] and "already inside its `with` block" in r["error"]
        assert r["grad_sync_inside"] is False, "the refused inner block must not switch gradient sync back on"
        assert r["grad_sync_after"] is True
        assert r["sync_count"] == 1, "only the outer exit syncs"


@pytest.mark.parametrize(
    "kind, local_type, message",
    [
        ("freed storage", "ValueError", r"tensors\[0\] \('module.0.weight'\) needs 512 bytes of storage but its storage holds 0"),
        ("expanded data", "ValueError", r"tensors\[0\] \('module.0.weight'\) has elements that share memory"),
        ("expanded parameter", "ValueError", r"has elements that share memory"),
        ("allocation failure", "RuntimeError", r"can't allocate memory"),
    ],
)
def test_a_local_failure_is_reported_as_local_on_its_rank_and_named_on_the_others(kind, local_type, message):
    results = run_ranks(2, "workers_disagreement:local_failure", kind, timeout=90, env=SHORT_GROUP_TIMEOUT)
    failed, other = results[1], results[0]
    assert failed["type"] == local_type, failed
    assert re.search(message, failed["error"]), failed["error"]
    assert other["type"] == "RanksDisagreeError", other
    assert "rank 1 could not take part in averaging" in other["error"] and re.search(message, other["error"])
    assert "did not take part" not in failed["error"], "a local error must not read as a lost rank"
    for r in results:
        assert r["untouched"], "nothing may be averaged on any rank"
        assert r["seconds"] < 10, f"must fail at once, not at the group timeout ({r['seconds']:.1f} s)"


def test_ctrl_c_interrupts_a_blocked_sync_promptly():
    results = run_ranks(
        2, "workers_disagreement:interrupted_sync", timeout=90, may_fail=(1,), env={"LOCALSGD_TEST_GROUP_TIMEOUT": "60"}
    )
    r = results[0]
    assert r["interrupted"], "SIGINT must raise KeyboardInterrupt inside the sync"
    assert r["seconds"] < 3, f"took {r['seconds']:.1f} s; the group timeout was 60 s"
    assert r["reuse_error"] and "cannot be used again" in r["reuse_error"]
