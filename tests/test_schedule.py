"""The sync schedule as a table: which actions each step runs, over warm-up x fragments x delay x levels,
written out by hand from the documented cadence (docs/options.md), not computed by the schedule."""

import pytest

from localsgd_ext.schedule import Advance, EndWarmUp, LevelAverage, Merge, Sync, SyncSchedule


def table(schedule, steps):
    return {step: actions for step in range(1, steps + 1) if (actions := schedule.actions(step))}


@pytest.mark.parametrize(
    "kwargs, steps, expected",
    [
        # Accelerate's cadence.
        (dict(local_sgd_steps=4), 9, {4: (Sync((0,)),), 8: (Sync((0,)),)}),
        # Warm-up under DDP (post-local SGD): nothing but its end, then every K counted from there.
        (dict(local_sgd_steps=4, warmup_steps=3), 12, {3: (EndWarmUp(),), 7: (Sync((0,)),), 11: (Sync((0,)),)}),
        (
            dict(local_sgd_steps=8, num_fragments=2, sync_delay=2, warmup_steps=1, levels={2: 2}),
            9,
            {
                1: (EndWarmUp(),),
                3: (LevelAverage(2),),
                5: (Sync((0,), delayed=True),),
                7: (Merge(0), LevelAverage(2)),
                9: (Sync((1,), delayed=True),),
            },
        ),
        # Warm-up by averaging (no DDP to sync gradients): every step syncs everything; then every K
        # counted from the end of warm-up.
        (
            dict(local_sgd_steps=4, warmup_steps=3, warmup_by_averaging=True),
            12,
            {1: (Sync((0,)),), 2: (Sync((0,)),), 3: (Sync((0,)),), 7: (Sync((0,)),), 11: (Sync((0,)),)},
        ),
        # Fragments: one every K/P steps, in turn; warm-up syncs both.
        (
            dict(local_sgd_steps=4, num_fragments=2, warmup_steps=1, warmup_by_averaging=True),
            9,
            {1: (Sync((0, 1)),), 3: (Sync((0,)),), 5: (Sync((1,)),), 7: (Sync((0,)),), 9: (Sync((1,)),)},
        ),
        # Delay: started at the sync step, merged sync_delay steps later; warm-up syncs wait.
        (
            dict(local_sgd_steps=4, sync_delay=1, warmup_steps=2, warmup_by_averaging=True),
            11,
            {
                1: (Sync((0,)),),
                2: (Sync((0,)),),
                6: (Sync((0,), delayed=True),),
                7: (Merge(0),),
                10: (Sync((0,), delayed=True),),
                11: (Merge(0),),
            },
        ),
        (
            dict(local_sgd_steps=6, num_fragments=3, sync_delay=1),
            7,
            {
                2: (Sync((0,), delayed=True),),
                3: (Merge(0),),
                4: (Sync((1,), delayed=True),),
                5: (Merge(1),),
                6: (Sync((2,), delayed=True),),
                7: (Merge(2),),
            },
        ),
        # The quantized wire's second half goes out midway: at (sync_delay + 1) // 2 steps in.
        (
            dict(local_sgd_steps=8, sync_delay=3, advance_midway=True),
            11,
            {8: (Sync((0,), delayed=True),), 10: (Advance(0),), 11: (Merge(0),)},
        ),
        (dict(local_sgd_steps=8, sync_delay=1, advance_midway=True), 9, {8: (Sync((0,), delayed=True),), 9: (Merge(0),)}),
        # The streaming merge (torchft, the Streaming DiLoCo paper): started sync_delay steps before the
        # fragment's boundary, merged at it.
        (
            dict(local_sgd_steps=6, num_fragments=3, sync_delay=1, streaming=True),
            7,
            {
                1: (Sync((0,), delayed=True),),
                2: (Merge(0),),
                3: (Sync((1,), delayed=True),),
                4: (Merge(1),),
                5: (Sync((2,), delayed=True),),
                6: (Merge(2),),
                7: (Sync((0,), delayed=True),),
            },
        ),
        (
            dict(local_sgd_steps=4, sync_delay=1, warmup_steps=2, streaming=True),
            11,
            {2: (EndWarmUp(),), 5: (Sync((0,), delayed=True),), 6: (Merge(0),), 9: (Sync((0,), delayed=True),), 10: (Merge(0),)},
        ),
        (
            dict(local_sgd_steps=8, sync_delay=3, advance_midway=True, streaming=True),
            11,
            {5: (Sync((0,), delayed=True),), 7: (Advance(0),), 8: (Merge(0),)},
        ),
        # Its boundary is the world's step: no level average there.
        (
            dict(local_sgd_steps=8, sync_delay=2, levels={2: 2}, streaming=True),
            10,
            {
                2: (LevelAverage(2),),
                4: (LevelAverage(2),),
                6: (Sync((0,), delayed=True),),
                8: (Merge(0),),
                10: (LevelAverage(2),),
            },
        ),
        # Levels: the largest due one; none at the world's steps; periods counted from the end of warm-up.
        (
            dict(local_sgd_steps=8, levels={2: 2, 4: 4}),
            9,
            {2: (LevelAverage(2),), 4: (LevelAverage(4),), 6: (LevelAverage(2),), 8: (Sync((0,)),)},
        ),
        (
            dict(local_sgd_steps=4, warmup_steps=1, levels={2: 2}, warmup_by_averaging=True),
            6,
            {1: (Sync((0,)),), 3: (LevelAverage(2),), 5: (Sync((0,)),)},
        ),
        # Every axis at once: a merge and a level average at the same step, in that order.
        (
            dict(local_sgd_steps=8, num_fragments=2, sync_delay=2, warmup_steps=1, levels={2: 2}, warmup_by_averaging=True),
            11,
            {
                1: (Sync((0, 1)),),
                3: (LevelAverage(2),),
                5: (Sync((0,), delayed=True),),
                7: (Merge(0), LevelAverage(2)),
                9: (Sync((1,), delayed=True),),
                11: (Merge(1), LevelAverage(2)),
            },
        ),
    ],
)
def test_actions_per_step(kwargs, steps, expected):
    assert table(SyncSchedule(**kwargs), steps) == expected


@pytest.mark.parametrize(
    "kwargs, step, expected",
    [
        (dict(local_sgd_steps=4), 9, (Sync((0,), final=True),)),
        (dict(local_sgd_steps=4, num_fragments=2), 3, (Sync((0, 1), final=True),)),
        (dict(local_sgd_steps=4, sync_delay=3), 9, (Merge(0), Sync((0,), final=True))),  # started at 8, in flight
        (dict(local_sgd_steps=4, sync_delay=3), 8, (Merge(0), Sync((0,), final=True))),  # started at this very step
        (dict(local_sgd_steps=4, sync_delay=2), 10, (Sync((0,), final=True),)),  # merged at 10: nothing in flight
        (dict(local_sgd_steps=4, sync_delay=1, warmup_steps=2), 2, (Sync((0,), final=True),)),  # warm-up waited
        (dict(local_sgd_steps=4, sync_delay=1, streaming=True), 3, (Merge(0), Sync((0,), final=True))),  # due at 4
        (dict(local_sgd_steps=4, sync_delay=1, streaming=True), 4, (Sync((0,), final=True),)),  # merged at 4
    ],
)
def test_exit_merges_what_is_in_flight_then_syncs_everything(kwargs, step, expected):
    assert SyncSchedule(**kwargs).exit_actions(step) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(local_sgd_steps=6, num_fragments=4),
            "local_sgd_steps must be a multiple of num_fragments .* got local_sgd_steps=6, num_fragments=4",
        ),
        (
            dict(local_sgd_steps=4, sync_delay=4),
            "sync_delay must be below local_sgd_steps .* got sync_delay=4 with local_sgd_steps=4",
        ),
        (dict(local_sgd_steps=4, num_fragments=2, sync_delay=2), "sync_delay must be below local_sgd_steps / num_fragments"),
    ],
)
def test_a_cadence_that_cannot_be_kept_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyncSchedule(**kwargs)


@pytest.mark.parametrize("streaming", [False, True])
def test_at_most_one_sync_is_in_flight_and_each_merges_once(streaming):
    schedule = SyncSchedule(
        local_sgd_steps=12, num_fragments=3, sync_delay=3, warmup_steps=2, levels={2: 2}, advance_midway=True, streaming=streaming
    )
    in_flight = None
    for step in range(1, 200):
        for action in schedule.actions(step):
            if isinstance(action, Merge):
                assert action.fragment == in_flight
                in_flight = None
            elif isinstance(action, Advance):
                assert action.fragment == in_flight
            elif isinstance(action, Sync) and action.delayed:
                assert in_flight is None
                (in_flight,) = action.fragments
        assert schedule.in_flight_after(step) == in_flight
