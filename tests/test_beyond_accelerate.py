"""LocalSGD's options beyond Accelerate, on real gloo ranks: sync_buffers, DiLoCo's outer step,
checkpointing through Accelerate (save, kill, resume). The sync cadence (warmup_steps) is pure logic,
tested in-process in test_cadence.py."""

import pytest
import torch
from multiprocess import run_ranks
from workers_beyond import CHECKPOINT_AT, CHECKPOINT_STEPS


def test_sync_buffers_averages_floats_and_copies_integers_from_rank_0():
    ranks = run_ranks(2, "workers_beyond:buffers_synced", True)
    before = [r["before"] for r in ranks]
    assert not torch.equal(before[0]["norm.running_mean"], before[1]["norm.running_mean"])
    assert before[0]["norm.num_batches_tracked"] != before[1]["norm.num_batches_tracked"]
    for r in ranks:
        for name in ("norm.running_mean", "norm.running_var"):
            torch.testing.assert_close(r["after"][name], (before[0][name] + before[1][name]) / 2, rtol=0, atol=1e-6)
        assert torch.equal(r["after"]["norm.num_batches_tracked"], before[0]["norm.num_batches_tracked"])
    assert torch.equal(ranks[0]["after"]["norm.running_var"], ranks[1]["after"]["norm.running_var"])


def test_without_sync_buffers_buffers_stay_local():
    """The default keeps Accelerate's behaviour: parameters only."""
    for r in run_ranks(2, "workers_beyond:buffers_synced", False):
        for name, value in r["before"].items():
            assert torch.equal(r["after"][name], value), name


@pytest.fixture(scope="module", params=["device", "cpu"])
def outer_runs(request):
    return run_ranks(2, "workers_beyond:outer_step_runs", request.param, timeout=180)


def test_outer_sgd_with_lr_1_and_no_momentum_is_plain_averaging(outer_runs):
    for rank in outer_runs:
        for ours, plain in zip(rank["sgd_lr1"]["params"], rank["plain"]["params"]):
            # anchor - 1 * (anchor - mean) is the mean up to the rounding of that subtraction.
            torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


def test_diloco_recipe_converges_and_keeps_ranks_identical(outer_runs):
    diloco = [rank["diloco"] for rank in outer_runs]
    assert diloco[0]["last_loss"] < 0.1 * diloco[0]["first_loss"], diloco[0]
    for a, b in zip(diloco[0]["params"], diloco[1]["params"]):
        assert torch.equal(a, b)
    # The outer step changes the trajectory: it is not plain averaging.
    plain = outer_runs[0]["plain"]["params"]
    assert any(not torch.allclose(a, b) for a, b in zip(diloco[0]["params"], plain))


def test_save_kill_resume_matches_an_uninterrupted_run(tmp_path):
    full = run_ranks(2, "workers_beyond:checkpointed_training", "full", str(tmp_path / "unused"), timeout=180)
    directory = str(tmp_path / "checkpoint")
    run_ranks(2, "workers_beyond:checkpointed_training", "save_and_die", directory, timeout=180, expect_killed=True)
    resumed = run_ranks(2, "workers_beyond:checkpointed_training", "resume", directory, timeout=180)
    for a, b in zip(full, resumed):
        assert b["started_at"] == CHECKPOINT_AT
        assert b["num_steps"] == a["num_steps"] == CHECKPOINT_STEPS
        assert b["sync_count"] == a["sync_count"]
        for x, y in zip(a["params"], b["params"]):
            assert torch.equal(x, y), f"max diff {(x - y).abs().max()}"


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain SGD", "momentum"])
def test_warmup_is_ddps_own_training_and_keeps_the_optimizer_states_equal(momentum):
    # Post-local SGD (torch's PostLocalSGDOptimizer + post_localSGD_hook, Lin et al.): during warm-up the
    # gradients are all-reduced, so with momentum every rank's parameters and optimizer state stay equal,
    # bit for bit DDP's own training; Local SGD starts after it (no parameter average before step 5 + 4).
    warmup, steps = 5, 9
    results = run_ranks(2, "workers_beyond:warmup_is_ddp_training", warmup, steps, momentum)
    for r in results:
        ours, ddp, torch_own = r["local_sgd"], r["ddp"], r["torch_post_local_sgd"]
        for step in range(warmup):
            for a, b in zip(ours["params"][step] + ours["momenta"][step], ddp["params"][step] + ddp["momenta"][step]):
                assert torch.equal(a, b), (step, "warm-up is DDP's training, bit for bit")
            # torch's PostLocalSGDOptimizer + post_localSGD_hook: the same warm-up, bit for bit.
            for a, b in zip(ours["params"][step] + ours["momenta"][step], torch_own["params"][step] + torch_own["momenta"][step]):
                assert torch.equal(a, b), (step, "warm-up is torch's post-local SGD, bit for bit")
        assert ours["synced"] == [True] * warmup + [False] * 3 + [True], "identical ranks at each warm-up step"
        assert ours["sync_count"] == 2, "step 9, then the exit"
    a, b = (r["local_sgd"] for r in results)
    for step in range(warmup):
        for x, y in zip(a["momenta"][step], b["momenta"][step]):
            assert torch.equal(x, y), (step, "the ranks' optimizer states stay equal through warm-up")
    if momentum:
        assert not all(torch.equal(x, y) for x, y in zip(a["momenta"][warmup + 1], b["momenta"][warmup + 1])), "local after"
    # How the periods count (docs/options.md, warmup_steps): torch's PeriodicModelAverager averages at the first
    # step after warm-up and every 4 from there; ours first averages 4 steps after warm-up (the 9th step).
    t0, t1 = (r["torch_post_local_sgd"] for r in results)
    assert all(torch.equal(x, y) for x, y in zip(t0["params"][warmup], t1["params"][warmup])), "torch: step 6"
    assert not all(torch.equal(x, y) for x, y in zip(a["params"][warmup], b["params"][warmup])), "ours: local at 6"
    assert all(torch.equal(x, y) for x, y in zip(a["params"][steps - 1], b["params"][steps - 1])), "ours: step 9"
