"""Streaming DiLoCo's merge (merge="streaming", fragment_update_alpha) on real gloo ranks, compared step by
step with the pure-Python reference of the paper's update (combination_reference.py): fragments P in {1, 2},
delay tau in {0, 1}, alpha in {0, 0.5, 1}, with and without the outer optimizer, on the float wire (bit for
bit at 2 ranks, within float32 rounding at 3) and the int8 wire (within its bound), at 3 ranks; the float
wire again at 2 ranks; and with every other option of the combination test at 4 ranks. Each rank's
parameters after every step() and after the exit, and sync_count, must be the reference's."""

import itertools

import pytest
import torch
from combination_reference import AXES, WORLD_SIZE
from multiprocess import run_ranks
from test_combinations import _check_against_the_reference

from localsgd_ext import LocalSGD
from localsgd_ext.config import LocalSGDConfig


def _cases(wires):
    cases = []
    for fragments, delay, alpha, outer, wire in itertools.product((1, 2), (0, 1), ("0", "0.5", "1"), (False, True), wires):
        case = ("streaming", f"alpha={alpha}")
        case += ("num_fragments",) * (fragments == 2) + ("sync_delay",) * delay + ("outer_optimizer",) * outer
        cases.append(case + ((wire,) if wire else ()))
    return cases + [("streaming", "alpha=0.5", "sync_delay", "warmup_steps")]


# The exit right at a streaming merge with alpha 0 and the outer optimizer (start at 7, merge at 8): nothing
# changed since, so the exit sync is a no-op (no outer step, no count).
EXIT_AT_A_MERGE = ("streaming", "alpha=0", "sync_delay", "outer_optimizer", "steps=8")
# The streaming merge (alpha 0.5, delay 1) with each other axis of the combination test, at its 4 ranks.
CASES_4 = [("streaming", "alpha=0.5", "sync_delay", axis) for axis in AXES if axis not in ("sync_delay", "error_feedback")] + [
    ("streaming", "alpha=0.5", "sync_delay", "int4", "error_feedback")
]
CASES_3 = _cases((None, "int8"))
CASES_2 = _cases((None,)) + [EXIT_AT_A_MERGE]


@pytest.fixture(scope="module")
def results_3():
    return run_ranks(3, "workers_combinations:every_case", [list(case) for case in CASES_3], timeout=600)


@pytest.fixture(scope="module")
def results_2():
    return run_ranks(2, "workers_combinations:every_case", [list(case) for case in CASES_2], timeout=600)


@pytest.fixture(scope="module")
def results_4():
    return run_ranks(WORLD_SIZE, "workers_combinations:every_case", [list(case) for case in CASES_4], timeout=600)


@pytest.mark.parametrize("case", CASES_4, ids="+".join)
def test_the_streaming_merge_composes_with_every_other_option(results_4, case):
    _check_against_the_reference(case, [results_4[rank]["+".join(case)] for rank in range(WORLD_SIZE)], WORLD_SIZE)


@pytest.mark.parametrize("case", CASES_3, ids="+".join)
def test_the_streaming_merge_does_what_the_paper_says_at_3_ranks(results_3, case):
    # Means over 3 ranks are not dyadic: later sums round by their order, a few float32 ulps of values below 4.
    _check_against_the_reference(case, [results_3[rank]["+".join(case)] for rank in range(3)], 3, float_tolerance=4e-6)


@pytest.mark.parametrize("case", CASES_2, ids="+".join)
def test_the_streaming_merge_does_what_the_paper_says_at_2_ranks(results_2, case):
    _check_against_the_reference(case, [results_2[rank]["+".join(case)] for rank in range(2)], 2)


def test_the_exit_right_after_a_streaming_merge_is_a_no_op(results_2):
    for rank in range(2):
        run = results_2[rank]["+".join(EXIT_AT_A_MERGE)]
        assert run["sync_count"] == 2, "the merges at steps 4 and 8; no exit sync"
        for final, after_step_8 in zip(run["final"]["params"], run["steps"][-1]["params"]):
            assert torch.equal(final, after_step_8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(merge="Streaming"), r"merge must be one of \('eager', 'streaming'\), got 'Streaming'"),
        (dict(merge=None), r"merge must be one of \('eager', 'streaming'\), got None"),
        (dict(merge="streaming", fragment_update_alpha=1.5), "fragment_update_alpha must be a number between 0 and 1, got 1.5"),
        (dict(merge="streaming", fragment_update_alpha=-0.1), "fragment_update_alpha must be a number between 0 and 1, got -0.1"),
        (dict(merge="streaming", fragment_update_alpha=True), "fragment_update_alpha must be a number between 0 and 1, got True"),
        (
            dict(merge="streaming", fragment_update_alpha="0.5"),
            "fragment_update_alpha must be a number between 0 and 1, got '0.5'",
        ),
        (dict(fragment_update_alpha=0.5), "it needs merge=\"streaming\", got fragment_update_alpha=0.5 with merge='eager'"),
    ],
)
def test_bad_merge_options_are_refused_with_the_value_received(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalSGDConfig(4, **kwargs)


def test_the_merge_options_are_keywords_of_local_sgd():
    import inspect

    parameters = inspect.signature(LocalSGD.__init__).parameters
    assert parameters["merge"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["merge"].default == "eager"
    assert parameters["fragment_update_alpha"].default == 0.0
