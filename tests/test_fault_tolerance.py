"""Fault-tolerant averaging on torchft's Manager (localsgd_ext.fault_tolerance): real replica processes in a
quorum formed by a real lighthouse on loopback. Skipped where torchft is not installed (the `ft` extra)."""

import pytest
import torch
from multiprocess import run_ranks

torchft = pytest.importorskip("torchft", reason="torchft (pip install 'localsgd_ext[ft]') is not installed")


@pytest.fixture
def lighthouse():
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=2)
    yield server.address()
    server.shutdown()


def test_a_failed_commit_rolls_back_and_the_replica_heals_at_the_next_sync(lighthouse):
    # 3 syncs of 2 replicas; at the second, replica 1 fails after the collective.
    r0, r1 = run_ranks(2, "workers_fault_tolerance:replica_syncs", lighthouse, 3, 1, 1, timeout=180)
    # Sync 0: both commit the exact mean (the moves are multiples of 1/8).
    for r in (r0, r1):
        assert r[0]["committed"] and r[0]["step"] == 1
        for got, a, b in zip(r[0]["after"], r0[0]["before"], r1[0]["before"]):
            assert torch.equal(got, (a + b) / 2)
    # Sync 1: replica 0 commits the mean; replica 1 reported its failure, so it keeps its own values.
    assert r0[1]["committed"] and r0[1]["step"] == 2
    for got, a, b in zip(r0[1]["after"], r0[1]["before"], r1[1]["before"]):
        assert torch.equal(got, (a + b) / 2)
    assert not r1[1]["committed"] and r1[1]["step"] == 1
    for got, own in zip(r1[1]["after"], r1[1]["before"]):
        assert torch.equal(got, own), "rolled back to its values before the sync"
    # Sync 2: replica 1 is behind, so the quorum heals it from replica 0; both commit and end identical.
    for r in (r0, r1):
        assert r[2]["committed"] and r[2]["step"] == 3
    for a, b, source in zip(r0[2]["after"], r1[2]["after"], r0[2]["before"]):
        assert torch.equal(a, b)
        assert torch.equal(a, source), "the healed replica held replica 0's values, so the mean is them"


def test_a_manager_with_an_async_quorum_is_refused():
    from localsgd_ext.fault_tolerance import ManagedAverager

    class AsyncManager:
        _use_async_quorum = True

    with pytest.raises(ValueError, match="use_async_quorum=False"):
        ManagedAverager([torch.zeros(2)], AsyncManager())


def test_a_crashed_replica_restarts_heals_and_ends_identical_while_the_others_kept_training():
    from torchft._torchft import LighthouseServer

    # A replica that stops heartbeating leaves the quorum within half a second; one that heartbeats is waited
    # for up to 2 s, so that every live replica is in every quorum (else the quorums take whichever two
    # replicas ask first, and the three drift apart).
    server = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=2000, quorum_tick_ms=50, heartbeat_timeout_ms=500)
    try:
        # Down for 1 s while the others need about 4 s (13 syncs, 0.3 s apart) to reach step 16.
        results = run_ranks(3, "workers_fault_tolerance:replica_until_step", server.address(), 16, 2, 3, 1.0, timeout=240)
    finally:
        server.shutdown()
    crashed = results[2]
    assert crashed["left_at"] == 3
    assert crashed["healed_to"] > crashed["left_at"] + 1, "the two others committed syncs while it was down"
    for r in results:
        assert r["step"] >= 16
    for r in results[1:]:
        for a, b in zip(results[0]["final"], r["final"]):
            assert torch.equal(a, b), "every replica ends with the same values"


DILOCO = {"outer_optimizer": "diloco"}
INT8 = {"wire": "int8"}
INT8_EF_DILOCO = {"wire": "int8", "error_feedback": True, "outer_optimizer": "diloco"}


@pytest.mark.parametrize(
    "options",
    [{}, DILOCO, INT8, INT8_EF_DILOCO, {"zero_copy": True}, {"sync_buffers": True}],
    ids=["plain", "diloco", "int8", "int8+ef+diloco", "zero-copy", "buffers"],
)
def test_local_sgd_with_a_manager_averages_each_sync_in_the_quorum(lighthouse, options):
    r0, r1 = run_ranks(2, "workers_fault_tolerance:local_sgd_replica", lighthouse, 6, options, -1, 0.0, timeout=180)
    assert r0["enabled"] and r1["enabled"], "a replica group of one process (Accelerate's NO) is not disabled"
    outer, quantized = "outer_optimizer" in options, "wire" in options
    anchor = r0["initial"]  # the same model on both replicas
    for a, b in zip(r0["records"], r1["records"]):
        assert a["synced"] == b["synced"] == (a["step"] % 2 == 0)
        if not a["synced"]:
            continue
        # int8 sends each replica's change since the last sync (the anchor), one scale per block of the whole
        # (small) model, and the mean goes back re-quantized: within two steps of the largest change.
        change = max((t - s).abs().max().item() for x, y, s in zip(a["before"], b["before"], anchor) for t in (x, y))
        for got0, got1, x, y in zip(a["after"], b["after"], a["before"], b["before"]):
            assert torch.equal(got1, got0), "both replicas hold the same bits after every sync"
            if not outer and not quantized:
                assert torch.equal(got0, (x + y) / 2)
            if quantized and not outer:
                assert torch.allclose(got0, (x + y) / 2, rtol=0, atol=2 * change / 127)
        if quantized and not outer:
            assert not all(map(torch.equal, a["after"], [(x + y) / 2 for x, y in zip(a["before"], b["before"])])), (
                "the int8 wire's rounding shows"
            )
        if options.get("sync_buffers"):
            # BatchNorm's running mean and variance averaged in the quorum, its batch count rank 0's.
            (mean0, var0, count0), (mean1, var1, _) = a["buffers_before"], b["buffers_before"]
            for got in (a["buffers_after"], b["buffers_after"]):
                assert torch.equal(got[0], (mean0 + mean1) / 2) and torch.equal(got[1], (var0 + var1) / 2)
                assert torch.equal(got[2], count0)
        anchor = a["after"]
    for x, y in zip(r0["final"], r1["final"]):
        assert torch.equal(x, y)
    assert r0["sync_count"] == r1["sync_count"] == (3 if outer else 4), "3 syncs, and plain averaging's exit sync"
    if quantized:
        for anchor, final in zip(r0["anchor"], r0["final"]):
            assert torch.equal(anchor, final), "the wire's anchor is the last sync's result"


@pytest.mark.parametrize(
    "options",
    [DILOCO, INT8, INT8_EF_DILOCO, {"sync_delay": 1, **INT8_EF_DILOCO}, {"zero_copy": True, "sync_delay": 1, **INT8}],
    ids=["diloco", "int8", "int8+ef+diloco", "sync_delay+int8+ef+diloco", "zero-copy+sync_delay+int8"],
)
def test_local_sgd_with_a_manager_heals_a_restarted_replica(lighthouse, options):
    # Replica 1 crashes after step 4 and restarts from scratch: its first quorum heals it with replica 0's
    # model (the Manager's own state) and LocalSGD's step and sync counts, outer step and wire anchor, then
    # they sync together.
    r0, r1 = run_ranks(2, "workers_fault_tolerance:local_sgd_replica", lighthouse, 10, options, 4, 1.0, timeout=180)
    assert r1["num_steps"] == r0["num_steps"] == 10 and r1["sync_count"] == r0["sync_count"]
    for x, y in zip(r0["final"], r1["final"]):
        assert torch.equal(x, y)
    restarted = [r["step"] for r in r1["records"]]
    assert restarted[:4] == [1, 2, 3, 4] and restarted[4] == 1, "it started again from step 1"
    assert 6 in restarted, "and was healed to replica 0's step count at its first sync"
    healed_sync = next(r for r in r1["records"][4:] if r["step"] == 6)
    peer_sync = next(r for r in r0["records"] if r["step"] == 6)
    for got, peer in zip(healed_sync["after"], peer_sync["after"]):
        assert torch.equal(got, peer), "the healed replica's first sync gives the peer's result, bit for bit"
    if "wire" in options:
        for x, y in zip(r0["anchor"], r1["anchor"]):
            assert torch.equal(x, y)


def assert_rolled_back_then_healed(r0, r1, failed_step, rolled_back_to, healed_step):
    """Replica 1's sync completing at `failed_step` was not committed: it holds `rolled_back_to` there while
    replica 0 took the average; the sync at `healed_step` heals it (both hold the same values from then on),
    and both end identical with the same sync count."""
    committed0, failed1 = r0["records"][failed_step - 1], r1["records"][failed_step - 1]
    assert committed0["synced"] and not failed1["synced"], "replica 0 committed, replica 1 did not"
    for got, expected in zip(failed1["after"], rolled_back_to):
        assert torch.equal(got, expected), "rolled back"
    assert not all(map(torch.equal, committed0["after"], committed0["before"])), "replica 0 took the average"
    for a, b in zip(r0["records"][healed_step - 1]["after"], r1["records"][healed_step - 1]["after"]):
        assert torch.equal(a, b), "the next sync heals replica 1 and leaves both identical"
    for x, y in zip(r0["final"], r1["final"]):
        assert torch.equal(x, y)
    assert r1["sync_count"] == r0["sync_count"], "the healed replica took the healthy one's sync count"


@pytest.mark.parametrize(
    "options", [{}, INT8, INT8_EF_DILOCO, {"sync_buffers": True}], ids=["plain", "int8", "int8+ef+diloco", "buffers"]
)
def test_local_sgd_rolls_back_a_failed_commit_and_heals_at_the_next_sync(lighthouse, options):
    # Replica 1's sync at step 4 fails after the collective: it rolls back (its wire's anchor too), replica 0
    # commits; at step 6 replica 1 is behind, is healed from replica 0, and they sync together.
    r0, r1 = run_ranks(2, "workers_fault_tolerance:local_sgd_replica", lighthouse, 8, options, -1, 0.0, 4, timeout=180)
    # Plain averaging keeps the local steps (as torchft's LocalSGD); the outer step goes back to its anchor,
    # the result of the last committed sync at step 2 (as torchft's DiLoCo).
    rolled_back_to = r1["records"][1]["after"] if "outer_optimizer" in options else r1["records"][3]["before"]
    assert_rolled_back_then_healed(r0, r1, failed_step=4, rolled_back_to=rolled_back_to, healed_step=6)
    for got, own in zip(r1["records"][3]["buffers_after"], r1["records"][3]["buffers_before"]):
        assert torch.equal(got, own), "the buffers rolled back with the parameters"
    if "wire" in options:
        for x, y in zip(r0["anchor"], r1["anchor"]):
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    "options",
    [{"sync_delay": 1}, {"sync_delay": 1, "wire": "int8", "outer_optimizer": "diloco", "merge": "streaming"}],
    ids=["eager", "streaming+int8+diloco"],
)
def test_local_sgd_with_a_manager_overlaps_each_sync_with_a_local_step(lighthouse, options):
    # K = 2, sync_delay = 1: each sync starts in its quorum and is committed and merged a step later: the eager
    # merge starts at the boundary (even steps), the streaming one a step before it (odd steps). The exit merges
    # the last one (and with plain averaging syncs).
    r0, r1 = run_ranks(2, "workers_fault_tolerance:local_sgd_replica", lighthouse, 7, options, -1, 0.0, timeout=180)
    starts = 1 if options.get("merge") == "streaming" else 0  # the parity of the steps that start a sync
    for a, b in zip(r0["records"], r1["records"]):
        assert a["synced"] == b["synced"] == (a["step"] % 2 != starts and a["step"] > 1), a["step"]
        if a["step"] % 2 == starts:
            for x, y in zip(a["after"], a["before"]):
                assert torch.equal(x, y), "a sync that starts leaves the parameters alone"
    if "wire" not in options:
        # The eager merge: each replica adds the mean of the two snapshots (taken at the step before) minus its own.
        for step in (3, 5, 7):
            snapshots = [r["records"][step - 2]["after"] for r in (r0, r1)]
            for r, own in zip((r0, r1), snapshots):
                record = r["records"][step - 1]
                for got, before, a, b, mine in zip(record["after"], record["before"], *snapshots, own):
                    assert torch.equal(got, before + ((a + b) / 2 - mine)), step
    for x, y in zip(r0["final"], r1["final"]):
        assert torch.equal(x, y)
    assert r0["sync_count"] == r1["sync_count"] == 4


@pytest.mark.parametrize(
    "options, failure",
    [
        ({"sync_delay": 1}, "collective"),
        ({"sync_delay": 1}, "reported"),
        ({"sync_delay": 1, "wire": "int8", "error_feedback": True}, "reported"),
    ],
    ids=["failed merge", "vote no after the merge", "int8+ef, vote no after the merge"],
)
def test_local_sgd_with_a_manager_rolls_back_an_overlapped_sync_whose_commit_fails(lighthouse, options, failure):
    # Replica 1's sync merged at step 3 fails: its merge does not take the average, or it does and the replica
    # then votes no (an error reported before). Either way it keeps its values, replica 0 merges; the sync
    # started at step 4 heals replica 1 in its quorum, and the exit leaves both identical.
    r0, r1 = run_ranks(2, "workers_fault_tolerance:local_sgd_replica", lighthouse, 7, options, -1, 0.0, 3, failure, timeout=180)
    assert_rolled_back_then_healed(r0, r1, failed_step=3, rolled_back_to=r1["records"][2]["before"], healed_step=4)


@pytest.mark.parametrize("fail_at_step", [-1, 4], ids=["healthy", "one rank of a group fails"])
def test_replica_groups_of_two_ddp_processes_average_across_groups_and_commit_per_group(lighthouse, fail_at_step):
    # Ranks 0-1 are replica group 0, ranks 2-3 replica group 1: DDP within each group every step, Local SGD
    # across the groups every 2 steps, each rank averaging with the same rank of the other group.
    results = run_ranks(4, "workers_fault_tolerance:ddp_replica_group", lighthouse, 6, fail_at_step, timeout=180)
    groups = [results[0:2], results[2:4]]
    for step in range(6):
        for first, second in groups:
            for a, b in zip(first["records"][step]["after"], second["records"][step]["after"]):
                assert torch.equal(a, b), "DDP keeps the ranks of a replica group identical: its gradients are synced"
        group0, group1 = results[0]["records"][step], results[2]["records"][step]
        failed = step + 1 == fail_at_step
        assert all(
            r["records"][step]["synced"] == (step % 2 == 1 and not (failed and rank >= 2)) for rank, r in enumerate(results)
        )
        if step % 2 == 0:
            assert not all(map(torch.equal, group0["after"], group1["after"])), "the groups train apart between syncs"
        elif step + 1 == fail_at_step + 2:
            # Replica group 1 is healed in this sync's quorum from group 0: it holds group 0's values, so the
            # mean is them.
            for got0, got1, x in zip(group0["after"], group1["after"], group0["before"]):
                assert torch.equal(got0, x) and torch.equal(got1, got0), "healed from replica group 0"
        elif not failed:
            for got0, got1, x, y in zip(group0["after"], group1["after"], group0["before"], group1["before"]):
                assert torch.equal(got0, (x + y) / 2) and torch.equal(got1, got0), "the mean of the two groups"
        else:
            # Replica group 1's commit fails on both its ranks (torchft decides it per group): group 0 takes the
            # mean, group 1 keeps its values, and is healed at the next sync.
            for got1, own in zip(group1["after"], group1["before"]):
                assert torch.equal(got1, own)
            assert not all(map(torch.equal, group0["after"], group0["before"]))
    for r in results[1:]:
        for a, b in zip(results[0]["final"], r["final"]):
            assert torch.equal(a, b), "every rank of every group ends identical"
    assert len({r["sync_count"] for r in results}) == 1


def test_replica_groups_sharded_by_fsdp2_average_each_shard_with_the_same_shard_of_the_other_group(lighthouse):
    # Each group shards the model over its two ranks: rank l of group 0 and rank l of group 1 hold the same
    # shard, and average it over the quorum's group of their local rank.
    results = run_ranks(4, "workers_fault_tolerance:ddp_replica_group", lighthouse, 6, -1, "fsdp2", timeout=180)
    for local in (0, 1):
        group0, group1 = results[local], results[2 + local]
        for a, b in zip(group0["records"], group1["records"]):
            assert a["synced"] == b["synced"] == (a["step"] % 2 == 0)
            if a["synced"]:
                for got0, got1, x, y in zip(a["after"], b["after"], a["before"], b["before"]):
                    assert torch.equal(got0, (x + y) / 2) and torch.equal(got1, got0), "the mean of the two groups' shard"
            else:
                assert not all(map(torch.equal, a["after"], b["after"])), "the groups train apart between syncs"
        for x, y in zip(group0["final"], group1["final"]):
            assert torch.equal(x, y)
    for a, b in zip(results[0]["final"], results[1]["final"]):
        assert a.shape == b.shape and not torch.equal(a, b), "the two ranks of a group hold different shards"


@pytest.mark.parametrize("options", [DILOCO, INT8_EF_DILOCO], ids=["diloco", "int8+ef+diloco"])
def test_local_sgd_with_a_third_replica_joining_mid_run_heals_it_and_ends_identical(options):
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=2000, quorum_tick_ms=50, heartbeat_timeout_ms=500)
    try:
        # Replicas 0 and 1 sync every 2 steps, 0.1 s apart; replica 2 starts 1.5 s later.
        timing = {"step_seconds": 0.1, "join_after": 1.5}
        results = run_ranks(
            3, "workers_fault_tolerance:local_sgd_replica", server.address(), 30, options, -1, 0.0, -1, "collective", timing,
            timeout=240,
        )  # fmt: skip
    finally:
        server.shutdown()
    late = [record["step"] for record in results[2]["records"]]
    assert late[0] == 1 and late[1] > 2, "its first sync healed it to the others' step count"
    assert results[2]["num_steps"] == 30
    for r in results[1:]:
        assert r["sync_count"] == results[0]["sync_count"]
        for a, b in zip(results[0]["final"], r["final"]):
            assert torch.equal(a, b), "the late replica ends with the others' values"
        if "wire" in options:
            for a, b in zip(results[0]["anchor"], r["anchor"]):
                assert torch.equal(a, b), "and the same wire anchor"


def test_losing_the_lighthouse_stops_the_next_sync_with_a_clear_error_within_the_timeout():
    # Two syncs (steps 2 and 4) with the lighthouse, which then stops: the sync at step 6 cannot form a quorum.
    for r in run_ranks(2, "workers_fault_tolerance:lighthouse_lost", 4, timeout=120):
        assert r["error"] is not None and r["at_step"] == 6, r
        assert r["error"].startswith("LocalSGD: no torchft quorum could be formed for this sync"), r["error"]
        assert r["seconds"] < 30, "within the Manager's timeouts (3 s each), not hanging"


def test_a_third_replica_joins_mid_run_and_ends_identical():
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=2000, quorum_tick_ms=50, heartbeat_timeout_ms=500)
    try:
        # Replicas 0 and 1 train from the start; replica 2 starts 1.5 s later (no crash: -1).
        results = run_ranks(
            3, "workers_fault_tolerance:replica_until_step", server.address(), 16, -1, -1, 0.0, 2, 1.5, timeout=240
        )
    finally:
        server.shutdown()
    assert results[2]["joined_at"] > 1, "the two others had committed syncs before it joined"
    for r in results:
        assert r["step"] >= 16
    for r in results[1:]:
        for a, b in zip(results[0]["final"], r["final"]):
            assert torch.equal(a, b), "the late replica ends with the others' values"
