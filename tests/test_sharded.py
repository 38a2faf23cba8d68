"""Local SGD over replicas of an FSDP2-sharded model on 4 real gloo ranks, a (replicate=2, shard=2) CPU
mesh: each replica sharded over "shard", LocalSGD(process_group=mesh.get_group("replicate")). Each
rank's shard is averaged with the same shard of the other replica only, which equals averaging the full
model across replicas; the replicas train apart in between."""

import pytest
import torch
from multiprocess import run_ranks


@pytest.mark.parametrize("source", ["process_group", "accelerate_parallelism_config"])
def test_hsdp_averages_shards_across_replicas_like_the_full_model(source):
    steps = 4
    results = run_ranks(4, "workers_sharded:hsdp_local_sgd", steps, source, timeout=180)
    # Mesh (replicate, shard) = (2, 2) over ranks 0..3: replicas {0, 1} and {2, 3}; shard k is on ranks k and k + 2.
    assert [r["replica_ranks"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    replica_a, replica_b = results[0], results[2]
    for step in range(1, steps + 1):
        for i, (a_before, b_before) in enumerate(zip(replica_a["before"][step - 1], replica_b["before"][step - 1])):
            a_after, b_after = replica_a["after"][step - 1][i], replica_b["after"][step - 1][i]
            if step % 3 == 0:
                # The full model's average across replicas, bit for bit as gloo averages two values.
                assert torch.equal(a_after, b_after) and torch.equal(a_after, (a_before + b_before) / 2), (step, i)
            else:
                assert torch.equal(a_after, a_before) and torch.equal(b_after, b_before), (step, i)
                assert not torch.equal(a_before, b_before), (step, i, "replicas train apart between syncs")
    # Each rank's own shard, and only it: shard k of replica A (rank k) against shard k of replica B (rank k + 2).
    for shard in (0, 1):
        mine, other = results[shard], results[shard + 2]
        for a, b in zip(mine["local_after"][2], other["local_after"][2]):
            assert torch.equal(a, b)
        for a, b in zip(mine["local_after"][2], results[1 - shard]["local_after"][2]):
            assert a.shape == b.shape and not torch.equal(a, b), "the other shard is other data"
    for r in results[1:]:
        for a, b in zip(r["final"], results[0]["final"]):
            assert torch.equal(a, b), "the exit sync leaves every replica identical"


@pytest.mark.parametrize("wire", ["int8", "fp8"])
def test_a_quantized_wire_averages_shards_across_replicas(wire):
    results = run_ranks(4, "workers_sharded:hsdp_local_sgd", 6, "process_group", {"wire": wire}, timeout=180)
    replica_a, replica_b = results[0], results[2]
    for step in (3, 6):
        for a_before, b_before, a_after, b_after in zip(
            replica_a["before"][step - 1],
            replica_b["before"][step - 1],
            replica_a["after"][step - 1],
            replica_b["after"][step - 1],
        ):
            assert torch.equal(a_after, b_after), (step, "replicas leave each sync bit-identical")
            mean = (a_before + b_before) / 2
            # Within the quantization of each replica's change since the anchor (taken on enter; one block here).
            change = (a_before - a_after).abs().max() + (b_before - b_after).abs().max()
            assert (a_after - mean).abs().max() <= change / 8, step
    for shard in (0, 1):
        for a, b in zip(results[shard]["local_after"][5], results[shard + 2]["local_after"][5]):
            assert torch.equal(a, b)


def test_diloco_outer_step_runs_on_shards_like_on_the_full_model():
    results = run_ranks(4, "workers_sharded:hsdp_local_sgd", 3, "process_group", {"outer_optimizer": "diloco"}, timeout=180)
    replica_a, replica_b = results[0], results[2]
    for anchor, a_before, b_before, a_after, b_after in zip(
        replica_a["initial"], replica_a["before"][2], replica_b["before"][2], replica_a["after"][2], replica_b["after"][2]
    ):
        assert torch.equal(a_after, b_after)
        # The first Nesterov step (lr 0.7, momentum 0.9) on the pseudo-gradient anchor - mean.
        expected = anchor - 0.7 * 1.9 * (anchor - (a_before + b_before) / 2)
        torch.testing.assert_close(a_after, expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(a_after, (a_before + b_before) / 2), "the outer step moved past the mean"


@pytest.mark.parametrize("wire", ["int8", None])
def test_streaming_diloco_runs_on_shards(wire):
    # Reliability III, 15: sync_delay + int8 + outer optimizer failed at its first merge on DTensor shards;
    # on the float wire sync_delay + outer optimizer was refused.
    options = {"sync_delay": 1, "wire": wire, "outer_optimizer": "diloco"}
    results = run_ranks(4, "workers_sharded:hsdp_local_sgd", 7, "process_group", options, timeout=180)
    replica_a, replica_b = results[0], results[2]
    # local_sgd_steps=3: step 6 starts an average, merged at step 7 as t + (new anchor - snapshot), the
    # snapshot being the parameters of step 6 (on every wire: the int8 wire's anchor is taken on enter).
    for i in range(len(replica_a["after"][6])):
        anchor_a = replica_a["after"][6][i] - replica_a["before"][6][i] + replica_a["before"][5][i]
        anchor_b = replica_b["after"][6][i] - replica_b["before"][6][i] + replica_b["before"][5][i]
        torch.testing.assert_close(anchor_a, anchor_b, rtol=0, atol=1e-6)  # one new anchor for both replicas
        assert not torch.equal(replica_a["after"][6][i], replica_a["before"][6][i]), "the merge moved the shards"
    for r in results[1:]:
        for a, b in zip(r["final"], results[0]["final"]):
            assert torch.equal(a, b), "the exit sync leaves every replica identical"


@pytest.mark.parametrize("layout", ["shard_dim", "shard_group"])
def test_the_shards_own_group_as_replicas_is_refused_naming_the_dimension(layout):
    # Reliability III, 4: it averaged different shards together.
    messages = run_ranks(4, "workers_sharded:refusal", layout, timeout=120)
    for m in messages:
        assert m is not None and m.startswith("ValueError: process_group (ranks ") and "spans the dimension 'shard'" in m, (
            messages
        )


def test_pure_fsdp_is_refused_saying_there_are_no_replicas():
    messages = run_ranks(4, "workers_sharded:refusal", "pure", timeout=120)
    assert all(m is not None and m.startswith("ValueError") and "no replicas to average" in m for m in messages), messages


def test_fsdp2_hsdp_is_refused_saying_what_to_do_instead():
    messages = run_ranks(4, "workers_sharded:refusal", "hsdp", timeout=120)
    assert all(
        m is not None and m.startswith("NotImplementedError") and "fully_shard(model, mesh=mesh['shard'])" in m for m in messages
    ), messages


def test_layout_mismatch_on_one_shard_raises_on_every_rank():
    messages = run_ranks(4, "workers_sharded:shard_layout_mismatch", timeout=120)
    # Shard 1's replicas (ranks 1, 3) name the difference; shard 0's (ranks 0, 2) agree but stop with them.
    for rank in (1, 3):
        assert messages[rank].startswith("RanksDisagreeError") and "first difference" in messages[rank], messages
        # Named by global rank, not by rank within the replicas' group.
        assert "rank 1 has 0.weight (8, 8)" in messages[rank] and "rank 3 has 0.weight (10, 8)" in messages[rank]
    for rank in (0, 2):
        assert messages[rank].startswith("RanksDisagreeError"), messages
        assert "replicas of another shard" in messages[rank] and "rank 1:" in messages[rank], messages


def test_replica_dimensions_a_mesh_lacks_are_refused_by_name():
    (messages,) = run_ranks(1, "workers_sharded:mesh_dim_refusals", timeout=60)
    assert messages["no replicate dimension"] == (
        "ValueError: device_mesh has no replicate dimension to average over (its dimensions are named ('pp', 'shard'), "
        "none of ('dp_replicate', 'replicate')); pass mesh_dim, the name or index of the dimension across replicas"
    )
    assert (
        messages["unknown name"] == "ValueError: mesh_dim must name a dimension of device_mesh, one of ('pp', 'shard'), got 'tp'"
    )
    assert messages["index out of range"] == "ValueError: mesh_dim must be in [0, 2) for this device_mesh, got 2"
    assert messages["float"].startswith("TypeError: mesh_dim must be a dimension's name (str), its index (int) or None, got 1.0")
    assert messages["by index"] == [0]


@pytest.mark.parametrize("forward_first", [False, True], ids=["fsdp_not_initialized", "fsdp_initialized"])
def test_zero_copy_on_shards_trains_bit_for_bit_like_copy_mode(forward_first):
    """FSDP2 all-gathers from a buffer of its own; were it left on the old memory when the shards move
    into the flat buffers, the forward after a sync would use stale weights and the runs would part."""
    steps = 4  # the last one syncs
    results = run_ranks(4, "workers_sharded:zero_copy_like_copy_mode", steps, forward_first, timeout=180)
    for r in results:
        for step in range(steps):
            for copied, flat in zip(r[False][step], r[True][step]):
                assert torch.equal(copied, flat), step
        assert r["flat_bytes"] > 0 and r["aliased"]
        # A shard moved from under the engine: FSDP2 follows it only once the next sync has moved every
        # shard into new flat buffers (a second plan) and pointed FSDP2 at them again.
        assert not r["aliased_after_move"] and r["plans_built"] == 2 and r["aliased_after_sync"]
    for r in results[1:]:
        for a, b in zip(r[True][-1], results[0][True][-1]):
            assert torch.equal(a, b)


def test_zero_copy_on_padded_shards_is_refused_on_every_rank_naming_the_parameter():
    messages = run_ranks(4, "workers_sharded:refusal", "zero_copy", timeout=120)
    assert all(
        m is not None
        and m.startswith(
            "NotImplementedError: zero_copy on FSDP2 shards needs every shard unpadded, but "
            "0.weight (params[0], shape (15, 8)) has 15 rows in dimension 0 over 2 shards"
        )
        for m in messages
    ), messages


def test_zero_copy_averager_on_shards_needs_the_model_that_owns_them():
    messages = run_ranks(4, "workers_sharded:refusal", "zero_copy_averager", timeout=120)
    assert all(
        m is not None and m.startswith("TypeError: zero_copy with DTensor parameters needs sharded_model") for m in messages
    ), messages


def test_hierarchy_over_replicas_averages_pairs_of_replicas_between_the_world_averages():
    steps = 5
    results = run_ranks(8, "workers_sharded:hierarchy_over_replicas", steps, timeout=300)
    # Mesh (replicate, shard) = (4, 2): replica r is ranks 2r and 2r + 1; shard k's replicas are ranks k, k+2, k+4, k+6.
    assert [r["level_ranks"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [5, 7], [4, 6], [5, 7]]
    for step in range(1, steps + 1):
        for shard in (0, 1):
            replicas = [results[shard + 2 * r]["after"][step - 1] for r in range(4)]
            pair_a, pair_b = (replicas[0], replicas[1]), (replicas[2], replicas[3])
            for a, b in (pair_a, pair_b):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), (step, shard, "a pair averages at every step")
            world = step == 4
            same = all(torch.equal(x, y) for x, y in zip(pair_a[0], pair_b[0]))
            assert same == world, (step, shard, "the pairs meet only at the world's steps")
    for r in results:
        assert r["sync_count"] == 2 and r["level_sync_counts"] == {2: 4}, r  # world: step 4 and the exit; pairs: 1-3, 5


def test_a_hierarchy_level_not_below_the_number_of_replicas_is_refused_on_every_rank():
    messages = run_ranks(4, "workers_sharded:refusal", "hierarchy", timeout=120)
    assert (
        messages == ["ValueError: hierarchy group size 2 must divide the number of replicas and be below it, got 2 replicas"] * 4
    ), messages
