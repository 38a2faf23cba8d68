"""Every option alone and every pair of options, on 4 real gloo ranks in one launch, compared step by step
with the pure-Python reference of the documented semantics (combination_reference.py): each rank's
parameters and buffers after every step() and after the exit, sync_count and level_sync_counts, ranks
bit-identical after the exit. The pairs that are refused must be refused with the reason docs/options.md's
refusal table gives. Sharded replicas, the twelfth option, in a launch of their own: 2 replicas of a model
sharded over 2 ranks each (FSDP2 on a (replicate, shard) mesh), with every other option but hierarchy
(whose groups need more than 2 replicas), compared on the full tensors with the reference at 2 "ranks"."""

import os

import pytest
import torch
from combination_reference import AXES, REFUSED, WORLD_SIZE, Reference, initial, options_of, pairs, steps_of
from multiprocess import REPO_ROOT, run_ranks

CASES = [(axis,) for axis in AXES] + pairs()
SHARDED_CASES = [("sharded",)] + [("sharded", axis) for axis in AXES if axis != "hierarchy"]
REPLICAS = 2

# Largest distance from the exact mean allowed per tensor element, per wire, over the whole run: each
# sync errs by at most half a quantization step of the sender's and of the mean's block (int8: step =
# max|change| / 127, int4: / 7, the changes here below 2), by 1/16 of each value (fp8 e4m3) or by 2^-9 of each value
# (bf16, values below 8), and the reference runs up to 6 world syncs.
WIRE_TOLERANCE = {"int8": 6 * 2 / 127, "int4": 6 * 2 / 7, "fp8": 6 * 2 / 16, "bf16": 6 * 8 / 512}
OUTER_TOLERANCE = 1e-5  # the outer step's lr 0.7 and momentum 0.9 are not exact in float32


@pytest.fixture(scope="module")
def results():
    return run_ranks(WORLD_SIZE, "workers_combinations:every_case", [list(case) for case in CASES], timeout=600)


@pytest.fixture(scope="module")
def sharded_results():
    return run_ranks(WORLD_SIZE, "workers_combinations:every_sharded_case", [list(c) for c in SHARDED_CASES], timeout=600)


def _assert_close(got, expected, tolerance, where):
    for i, (a, b) in enumerate(zip(got, expected)):
        if tolerance == 0:
            assert torch.equal(a, b), (where, i, (a - b).abs().max().item())
        else:
            assert torch.allclose(a, b, rtol=0, atol=tolerance), (where, i, (a - b).abs().max().item(), tolerance)


@pytest.mark.parametrize("case", CASES, ids="+".join)
def test_each_option_and_each_pair_does_what_the_reference_says(results, case):
    _check_against_the_reference(case, [results[rank]["+".join(case)] for rank in range(WORLD_SIZE)], WORLD_SIZE)


@pytest.mark.parametrize("case", SHARDED_CASES, ids="+".join)
def test_sharded_replicas_with_each_option_do_what_the_reference_says(sharded_results, case):
    # Ranks 0-1 are replica 0's two shards, ranks 2-3 replica 1's: each shard pair records its replica's
    # full tensors, which must be the same on both.
    got = [sharded_results[rank]["+".join(case)] for rank in range(WORLD_SIZE)]
    for shard_pair in ((0, 1), (2, 3)):
        a, b = (got[rank] for rank in shard_pair)
        if "refused" not in a:
            _assert_close(a["final"]["params"], b["final"]["params"], 0, (case, "a replica's shards agree"))
    others = tuple(axis for axis in case if axis != "sharded")
    # FSDP2 syncs no gradient across replicas: its warm-up averages the parameters every step.
    _check_against_the_reference(others, [got[0], got[2]], REPLICAS, warmup_by_averaging=True)


def _check_against_the_reference(case, got, world, warmup_by_averaging=False, float_tolerance=0.0):
    """`got`: each (simulated) rank's recorded run of `case`, compared with the reference's. `float_tolerance`:
    for a world that is not a power of two, whose means are not dyadic, so that later sums round by their order."""
    name = "+".join(case) or "sharded"
    options = options_of(case)
    refusal = REFUSED.get(frozenset(case))
    if refusal is not None:
        exception, message = refusal
        for rank_result in got:
            assert rank_result.get("refused"), (name, "must be refused")
            assert rank_result["refused"][0] == exception.__name__ and message in rank_result["refused"][1], rank_result
        return
    assert all("refused" not in r for r in got), [r.get("refused") for r in got]

    first = got[0]["steps"][0]
    params = [initial(i, p.shape) for i, p in enumerate(first["params"])]
    float_buffers = [initial(1000 + j, b.shape) for j, b in enumerate(first["float_buffers"])]
    reference = Reference(
        options, params, float_buffers, len(first["int_buffers"]), world=world, warmup_by_averaging=warmup_by_averaging
    )
    tolerance = WIRE_TOLERANCE.get(options.get("wire"), float_tolerance)
    if options.get("outer_optimizer"):
        tolerance = max(tolerance, OUTER_TOLERANCE)

    steps = steps_of(case)
    for step in range(1, steps + 1):
        reference.step(step)
        for rank in range(world):
            state = got[rank]["steps"][step - 1]
            _assert_close(state["params"], reference.params[rank], tolerance, (name, "step", step, "rank", rank))
            _assert_close(state["float_buffers"], reference.float_buffers[rank], 0, (name, "buffers", step, rank))
            assert state["int_buffers"] == reference.int_buffers[rank], (name, step, rank)
    reference.exit(steps)
    for rank in range(world):
        final = got[rank]["final"]
        _assert_close(final["params"], reference.params[rank], tolerance, (name, "exit", "rank", rank))
        _assert_close(final["float_buffers"], reference.float_buffers[rank], 0, (name, "exit buffers", rank))
        assert got[rank]["sync_count"] == reference.sync_count, (name, rank)
        assert got[rank]["level_sync_counts"] == reference.level_sync_counts, (name, rank)
        # After the exit every rank holds the same bits.
        _assert_close(final["params"], got[0]["final"]["params"], 0, (name, "ranks identical after exit", rank))


def test_the_refusal_table_lists_none_of_these_pairs():
    with open(os.path.join(REPO_ROOT, "docs", "options.md")) as f:
        table = f.read().split("## What is refused, and why", 1)[1]
    assert not REFUSED
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`zero_copy`" in line.split("|")[1]]
    # zero-copy's only limits are FSDP2's (and, for now, torchft's manager=, which no pair here uses).
    assert all("FSDP2" in row or "shards" in row or "`manager=`" in row for row in rows), rows
