"""Reliability III: the newer options (sync_delay, fragments, the quantized wires, hierarchy, sharded
models, DiLoCo's exit) and the compiled ops under bad input, faults and disagreement, on real gloo ranks.
Each test names the finding of the Reliability III issue it guards (docs/reliability.md lists them)."""

import re

import pytest
import torch
from multiprocess import run_ranks

from localsgd_ext import ParameterAverager, ops
from localsgd_ext.hierarchy import Hierarchy

STALL_GROUP_TIMEOUT = 10  # seconds: short, so that a stalled rank fails its partners quickly


@pytest.fixture(scope="module")
def mistakes():
    """The cases that leave the group healthy, run one after another on the same 2 ranks."""
    return run_ranks(2, "workers_reliability3:local_mistakes", timeout=240)


def test_overlapped_misuse_is_a_local_error_naming_the_public_methods(mistakes):  # 16
    for r in mistakes:
        misuse = r["overlapped misuse"]
        assert misuse["finish without start"] == (
            "RuntimeError: finish_average() without an overlapped average in flight: call start_average() first"
        )
        assert misuse["quantized finish without start"] == misuse["finish without start"]
        assert misuse["start twice"].startswith("RuntimeError: start_average() while an overlapped average is in flight")
        assert "another process" not in misuse["start twice"]
        assert torch.equal(misuse["float mean after misuse"], torch.full((10,), 0.5)), "the first average still completes"


def test_load_state_dict_inside_the_with_block_is_refused(mistakes):  # 16
    for r in mistakes:
        case = r["load_state_dict inside with"]
        assert case["error"].startswith("RuntimeError: LocalSGD.load_state_dict() inside its `with` block")
        assert case["num_steps_kept"]


def test_quantized_wire_averages_a_channels_last_parameter_that_requires_grad(mistakes):  # 16
    a, b = (r["channels_last int8"] for r in mistakes)
    assert a["error"] is None and b["error"] is None
    assert torch.equal(a["after"], b["after"]) and a["after"].is_contiguous(memory_format=torch.channels_last)
    # int8 bound: half a step of each sender's block (1/127 and 2/127 of max change), averaged, plus half the mean's.
    assert (a["after"] - (a["before"] + b["before"]) / 2).abs().max() <= 1.5 / 127 + 1e-6


def test_a_parameter_no_longer_float32_on_the_quantized_wire_is_named(mistakes):  # 16
    for r in mistakes:
        assert r["double after anchor"].startswith(
            "TypeError: the int8 wire averages float32 tensors; fc.bias (params[1]) is torch.float64"
        )


def test_wire_on_one_rank_only_names_the_wire(mistakes):  # 17
    for r in mistakes:
        assert r["wire on one rank"] == (
            "RanksDisagreeError: LocalSGD: the ranks' settings differ: wire is 'int8' on rank 0, 'fp32' on rank 1. Every "
            "rank must be configured alike, or they would send different messages. Nothing was created or averaged."
        )


def test_a_change_that_overflows_float32_is_refused_before_anything_is_averaged(mistakes):  # 5
    a, b = (r["overflowing change"] for r in mistakes)
    assert a["error"].startswith(
        "ValueError: the int8 wire cannot send the change of w since the last sync: it overflows float32"
    )
    assert b["error"].startswith("RanksDisagreeError") and "rank 0 could not take part" in b["error"]
    assert a["untouched"] and b["untouched"]


def test_changes_whose_sum_overflows_average_to_their_finite_mean(mistakes):  # 6
    for r in mistakes:
        result = r["overflowing sum"]
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result, torch.full((5,), 2.25e38), rtol=1 / 127, atol=0)


def test_a_resized_parameter_is_replanned_on_the_quantized_wire(mistakes):  # 7
    a, b = (r["resized parameter"] for r in mistakes)
    # The sync after the resize averages in float32 (a new anchor): exactly the mean, nothing shifted.
    assert torch.equal(a["after_resize"][0], torch.full((6,), 1.5)) and torch.equal(a["after_resize"][1], torch.full((3,), 5.0))
    for i in range(2):
        assert torch.equal(a["after"][i], b["after"][i])
        mean = (a["before"][i] + b["before"][i]) / 2
        assert (a["after"][i] - mean).abs().max() <= 0.05, i  # within int8 steps of changes up to 10, not 3.6 off


def test_a_model_without_parameters_is_valid_and_averages_nothing(mistakes):  # 19
    for r in mistakes:
        assert r["empty"] == {"quantized": None, "float": None, "local_sgd": None}


def test_a_parameter_viewing_anothers_bytes_under_another_dtype_is_refused(mistakes):  # 12
    for r in mistakes:
        assert r["dtype punned"].startswith(
            "ValueError: tensors[0] ('weight') (Float) and tensors[1] ('weight_as_bf16') (BFloat16) share memory under two dtypes"
        )


def test_a_parameter_viewing_anothers_bytes_under_another_dtype_is_refused_in_copy_mode():  # 12
    weight = torch.nn.Parameter(torch.ones(8))
    with pytest.raises(ValueError, match="share memory under two dtypes"):
        ParameterAverager([weight, torch.nn.Parameter(weight.data[:4].view(torch.bfloat16))])
    # One dtype sharing memory is averaged correctly in copy mode (both views get the same mean): allowed.
    ParameterAverager([weight, torch.nn.Parameter(weight.data[2:6])])


def test_diloco_exit_right_after_a_sync_moves_nothing(mistakes):  # 13
    for r in mistakes:
        synced = r["diloco exit after a sync"]
        assert synced["synced_last"] and synced["sync_count"] == 2, "no outer step with a zero pseudo-gradient"
        for before, after in zip(synced["before_exit"], synced["after_exit"]):
            assert torch.equal(before, after)
        progressed = r["diloco exit after progress"]
        assert progressed["sync_count"] == 3
        assert not all(torch.equal(x, y) for x, y in zip(progressed["before_exit"], progressed["after_exit"]))
    for key in ("diloco exit after a sync", "diloco exit after progress"):
        for x, y in zip(mistakes[0][key]["after_exit"], mistakes[1][key]["after_exit"]):
            assert torch.equal(x, y)


def test_last_step_synced_is_true_at_each_quantized_merge(mistakes):  # 14
    a, b = (r["last_step_synced int8"] for r in mistakes)
    # local_sgd_steps=2, sync_delay=1: the anchor is taken on enter, so step 2 already starts an overlapped
    # int8 sync (merged at step 3), as step 4 does (merged at step 5).
    assert a["flags"] == b["flags"] == [False, False, True, False, True]


def test_parameters_replaced_while_a_delayed_average_is_in_flight_are_refused(mistakes):  # 8
    for r in mistakes:
        assert r["replaced while in flight"]["error"].startswith(
            "LocalSGD: the model's parameters were replaced (first module.0.weight; e.g. by load_state_dict(assign=True)"
        )


def test_hierarchy_on_one_rank_and_a_stalled_level_partner_fail_within_the_timeout():  # 1, 2
    results = run_ranks(
        4,
        "workers_reliability3:hierarchy_disagreement_then_stall",
        may_fail=(3,),
        timeout=120,
        env={"LOCALSGD_TEST_GROUP_TIMEOUT": str(STALL_GROUP_TIMEOUT)},
    )
    for rank in (0, 1, 2):
        r = results[rank]
        assert r["disagreement"].startswith(
            "RanksDisagreeError: LocalSGD: the ranks' settings differ: hierarchy is {2: 1} on rank 0, None on rank 1"
        )
        assert r["disagreement_seconds"] < STALL_GROUP_TIMEOUT, "nobody waited inside new_group"
    partner = results[2]
    assert partner["stall_error"] and "another process of the group did not take part" in partner["stall_error"]
    assert partner["stall_seconds"] <= STALL_GROUP_TIMEOUT + 5, "the level group has the world's timeout"


def test_ctrl_c_during_a_quantized_all_to_all_interrupts_at_once():  # 18
    results = run_ranks(2, "workers_reliability3:interrupted_quantized_sync", may_fail=(1,), timeout=90)
    assert results[0]["interrupted"] and results[0]["seconds"] < 2.0, results[0]


@pytest.mark.parametrize(
    "levels, message",
    [
        ({2: 1, "4": 1}, r"hierarchy group size must be an int >= 2, got '4' \(str\)"),
        ({2.5: 1}, r"hierarchy group size must be an int >= 2, got 2.5 \(float\)"),
    ],
)
def test_hierarchy_keys_are_checked_one_by_one_before_sorting(levels, message):  # 20
    with pytest.raises(TypeError, match=message):
        Hierarchy(levels, local_sgd_steps=8)


def _freed(tensor):
    tensor.untyped_storage().resize_(0)
    return tensor


@pytest.mark.parametrize(
    "op, call",
    [
        ("merge_into", lambda: ops.merge_into(torch.zeros(4), torch.zeros(4), [0], 1.0, [_freed(torch.ones(4))])),
        ("merge_into", lambda: ops.merge_into(_freed(torch.zeros(4)), torch.zeros(4), [0], 1.0, [torch.ones(4)])),
        ("pack_into", lambda: ops.pack_into([_freed(torch.ones(4))], [0], torch.zeros(4))),
        ("unpack_from", lambda: ops.unpack_from(torch.zeros(4), [0], 1.0, [_freed(torch.ones(4))])),
        ("unpack_from", lambda: ops.unpack_from(_freed(torch.zeros(4)), [0], 1.0, [torch.ones(4)])),
        ("dequantize_blocks", lambda: ops.dequantize_blocks(_freed(torch.zeros(1, 4, dtype=torch.int8)), torch.ones(1, 1), 4)),
        ("quantize_blocks", lambda: ops.quantize_blocks(_freed(torch.zeros(4)), 4)),
    ],
)
def test_every_compiled_op_refuses_freed_storage_before_touching_memory(op, call):  # 3
    with pytest.raises(
        ValueError, match=rf"{op}: (tensors\[0\]|buffer|codes|x) needs \d+ bytes of storage but its storage holds 0"
    ):
        call()


def test_float8_nan_codes_dequantize_to_nan():  # 9
    codes = torch.tensor([[0x7F, 0xFF, 0x7E, 0x01]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    values = ops.dequantize_blocks(codes, torch.ones(1, 1), 4)
    assert torch.isnan(values[:2]).all() and values[2] == 448 and values[3] == 2**-9


@pytest.mark.parametrize("codes_device, scales_device", [("meta", "cpu"), ("cpu", "meta")])
def test_dequantize_refuses_codes_and_scales_on_different_devices_also_on_meta(codes_device, scales_device):  # 10
    codes = torch.zeros(1, 8, dtype=torch.int8, device=codes_device)
    with pytest.raises(ValueError, match=f"codes are on {codes_device} but scales on {scales_device}"):
        ops.dequantize_blocks(codes, torch.ones(1, 2, device=scales_device), 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda d: ops.dequantize_blocks(torch.zeros(1, 4, dtype=torch.int8), torch.ones(1, 1), 4, d),
        lambda d: ops.merge_into(torch.ones(4), torch.zeros(4), [0], d, [torch.full((4,), 3.0)]),
        lambda d: ops.unpack_from(torch.ones(4), [0], d, [torch.zeros(4)]),
    ],
)
@pytest.mark.parametrize("divisor", [1e-300, 1e-40, 1e39])
def test_a_divisor_float32_cannot_hold_is_refused(call, divisor):  # 11
    with pytest.raises(ValueError, match=re.escape(f"divisor must be a finite positive number, got {divisor:g}")):
        call(divisor)


def test_a_divisor_float32_cannot_hold_is_refused_by_the_fake_kernels_too():  # 11
    with pytest.raises(ValueError, match="divisor must be a finite positive number, got 1e-300"):
        ops.dequantize_blocks(torch.zeros(1, 4, dtype=torch.int8, device="meta"), torch.ones(1, 1, device="meta"), 4, 1e-300)
