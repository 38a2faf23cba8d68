"""Hierarchical averaging on 4 real gloo ranks: which ranks average together at which steps, with the
exact means; and the argument checks."""

import pytest
import torch
from multiprocess import run_ranks

from localsgd_ext.hierarchy import Hierarchy
from localsgd_ext.schedule import SyncSchedule


def test_each_level_averages_its_own_group_at_its_own_steps():
    # Pairs (ranks 0-1, 2-3) every 2 steps; the world every 4; the exit averages the world.
    steps = 7
    results = run_ranks(4, "workers_hierarchy:hierarchical_syncs", 4, {2: 2}, steps, timeout=120)
    for step in range(1, steps + 1):
        if step % 4 == 0:
            groups = [[0, 1, 2, 3]]
        elif step % 2 == 0:
            groups = [[0, 1], [2, 3]]
        else:
            groups = [[0], [1], [2], [3]]
        for group in groups:
            for i in range(len(results[0]["final"])):
                values = [results[r]["after"][step - 1][i] for r in group]
                total = sum(results[r]["before"][step - 1][i] for r in group)
                for value in values:
                    assert torch.equal(value, values[0]), (step, group, i, "a group leaves bit-identical")
                    assert torch.allclose(value, total / len(group), rtol=0, atol=1e-6), (step, group, i)
                if len(group) < 4:
                    assert not torch.equal(
                        results[group[0]]["after"][step - 1][i], results[(group[-1] + 1) % 4]["after"][step - 1][i]
                    )
    for r in results:
        assert r["level_sync_counts"] == {2: 2} and r["sync_count"] == 1 + 1  # step 4, then the exit
        for a, b in zip(r["final"], results[0]["final"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options, world_steps, merge_steps",
    [
        (dict(wire="int8"), {4}, set()),
        (dict(sync_delay=1), {4}, {5}),
        (dict(outer_optimizer="diloco"), {4}, set()),
        (dict(num_fragments=2), {2, 4, 6}, set()),
        (dict(wire="int8", sync_delay=1, outer_optimizer="diloco", num_fragments=2), {2, 4, 6}, {3, 5, 7}),
    ],
    ids=lambda value: ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_levels_compose_with_the_worlds_options(options, world_steps, merge_steps):
    # Pairs (ranks 0-1, 2-3) average plainly, in float32, at every step that is not the world's; the world's
    # syncs carry the options. A level step is exactly its pair's mean (the merge of a delayed world
    # average, where one lands on a level step, comes first and is checked by the option's own tests).
    steps = 7
    results = run_ranks(4, "workers_hierarchy:hierarchical_syncs", 4, {2: 1}, steps, options, timeout=150)
    level_steps = [step for step in range(1, steps + 1) if step not in world_steps]
    for step in level_steps:
        for pair in ([0, 1], [2, 3]):
            for i in range(len(results[0]["final"])):
                a, b = (results[r]["after"][step - 1][i] for r in pair)
                assert torch.equal(a, b), (step, pair, i, "a pair leaves bit-identical")
                if step not in merge_steps:
                    before = [results[r]["before"][step - 1][i] for r in pair]
                    assert torch.equal(a, (before[0] + before[1]) / 2), (step, pair, i)
            assert not torch.equal(results[0]["after"][step - 1][0], results[2]["after"][step - 1][0]), "pairs differ"
    for r in results:
        assert r["level_sync_counts"] == {2: len(level_steps)}
        for a, b in zip(r["final"], results[0]["final"]):
            assert torch.equal(a, b), "the exit leaves every rank identical"


def test_a_group_size_that_does_not_divide_the_world_is_refused_on_every_rank():
    messages = run_ranks(4, "workers_hierarchy:hierarchy_that_does_not_fit", timeout=60)
    assert all(m == "hierarchy group size 3 must divide the world size and be below it, got a world of 4 ranks" for m in messages)


@pytest.mark.parametrize(
    "levels, exception, message",
    [
        ({}, TypeError, "hierarchy must be a non-empty mapping"),
        ({1: 2}, ValueError, "hierarchy group size must be an int >= 2, got 1"),
        ({2: 0}, ValueError, r"hierarchy\[2\] \(the period\) must be an int >= 1, got 0"),
        ({2: 8}, ValueError, r"hierarchy\[2\] \(the period\) must be below local_sgd_steps .* got 8 with local_sgd_steps=8"),
    ],
)
def test_bad_levels_are_refused_by_name(levels, exception, message):
    with pytest.raises(exception, match=message):
        Hierarchy(levels, local_sgd_steps=8)


def test_the_largest_due_level_wins():
    hierarchy = Hierarchy({2: 2, 4: 4}, local_sgd_steps=16)
    schedule = SyncSchedule(16, levels=hierarchy.levels)
    due = [[action.group_size for action in schedule.actions(step)] for step in range(1, 9)]
    assert due == [[], [2], [], [4], [], [2], [], [4]]


def test_a_rank_refused_while_planning_stops_every_rank_at_once():
    results = run_ranks(4, "workers_hierarchy:hierarchy_refused_on_one_rank", timeout=120)
    assert results[3]["error"].startswith("ValueError") and "share memory" in results[3]["error"], results[3]
    for r in results[:3]:
        assert r["error"].startswith("RanksDisagreeError") and "rank 3 could not take part" in r["error"], r
    assert all(r["seconds"] < 10 for r in results), "must fail at once, not at the group timeout"
