"""Our LocalSGD, in copy and zero-copy mode, against Accelerate's own, trained from the same seed on 2
and 3 real gloo ranks."""

import pytest
import torch
from multiprocess import run_ranks
from workers_local_sgd import OUR_MODES, SCENARIOS


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def comparison(request):
    """All scenarios in one launch per world size: each rank trains every scenario twice."""
    world_size = request.param
    return world_size, run_ranks(world_size, "workers_local_sgd:compare_with_accelerate", list(SCENARIOS), timeout=240)


@pytest.mark.parametrize("mode", list(OUR_MODES))
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_accelerate(comparison, name, mode):
    world_size, results = comparison
    for rank, per_rank in enumerate(results):
        r = per_rank[name]
        mine = r["modes"][mode]
        assert mine["our_num_steps"] == r["their_num_steps"], f"rank {rank}: num_steps differ"
        assert len(mine["ours"]) == len(r["theirs"])
        for i, (ours, theirs) in enumerate(zip(mine["ours"], r["theirs"])):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            if world_size == 2:
                # Two summands add the same way in any order, so ours is Accelerate's bit for bit.
                assert torch.equal(ours, theirs), f"rank {rank} parameter {i}: max diff {(ours - theirs).abs().max()}"
            elif ours.dtype == torch.float32:
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
            else:  # bf16: about one ulp (2**-7 relative) from a sum of three added in another order
                torch.testing.assert_close(ours.float(), theirs.float(), rtol=2**-7, atol=2**-9)


@pytest.mark.parametrize("mode", list(OUR_MODES))
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_bit_identical_after_every_sync(comparison, name, mode):
    _, results = comparison
    for per_rank in results:
        r = per_rank[name]
        mine = r["modes"][mode]
        if SCENARIOS[name].get("enabled", True):
            assert mine["agreed_syncs"], "the scenario must have synced at least once"
            assert all(agree for _, agree in mine["agreed_syncs"]), mine["agreed_syncs"]
            assert mine["our_final_agree"] and r["their_final_agree"]
        else:
            # Disabled: no no_sync(), no averaging; DDP all-reduces every gradient, which alone keeps
            # the ranks identical (plain data parallel).
            assert not mine["agreed_syncs"]
            assert mine["our_final_agree"] and r["their_final_agree"]


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero_copy"])
def test_parameters_stay_the_same_objects(zero_copy):
    for rank in run_ranks(2, "workers_local_sgd:parameters_stay_the_same_objects", zero_copy):
        assert rank["same"]
        assert rank["storage_kept_after_enter"]
        assert rank["sync_count"] == 4  # three steps with local_sgd_steps=1, plus the one at exit
        assert rank["last"] is not None and rank["last"] >= 0


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero_copy"])
def test_parameter_registered_between_syncs_is_averaged(zero_copy):
    for rank in run_ranks(2, "workers_local_sgd:parameter_registered_between_syncs", zero_copy):
        assert torch.equal(rank["first"], torch.full((3,), 1.0))  # 0.5 on both, then +0 / +1, averaged
        assert torch.equal(rank["second"], torch.full((2, 2), 2.0))
