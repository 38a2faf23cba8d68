"""Rank-side bodies of the tests of LocalSGD's options beyond Accelerate (warmup_steps, sync_buffers,
outer_optimizer, state_dict/load_state_dict), on real gloo ranks through multiprocess.run_ranks."""

import contextlib
import functools
import os
import signal

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from rank_setup import group_timeout, snapshot

from localsgd_ext import LocalSGD


def _accelerator(*handlers) -> Accelerator:
    return Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout()), *handlers])


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.linear(x))


def buffers_synced(sync_buffers):
    """Each rank runs its own batches (a different number of them) through a BatchNorm, then syncs."""
    # broadcast_buffers=False: by default DDP itself copies rank 0's buffers at every forward.
    accelerator = _accelerator(DistributedDataParallelKwargs(broadcast_buffers=False))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = accelerator.prepare(BatchNormNet())
    inner = accelerator.unwrap_model(model)
    data = torch.Generator().manual_seed(100 + rank)
    local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, sync_buffers=sync_buffers)
    with local_sgd:
        for _ in range(2 + rank):
            model(torch.randn(8, 3, generator=data) * (1 + rank))
        before = {name: b.detach().clone() for name, b in inner.named_buffers()}
        local_sgd.step()
        after = {name: b.detach().clone() for name, b in inner.named_buffers()}
    return {"before": before, "after": after}


def _regression_data(rank, n=64):
    gen = torch.Generator().manual_seed(7)
    true_w = torch.randn(8, 1, generator=gen)
    local = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, 8, generator=local)
    return x, x @ true_w + 0.01 * torch.randn(n, 1, generator=local)


def _regression_setup(accelerator):
    """The same seeded model on every rank, plain SGD (no per-rank optimizer state), this rank's data."""
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, *_regression_data(dist.get_rank())


def _regression_step(accelerator, model, optimizer, local_sgd, x, y, step):
    batch = slice((step * 8) % 64, (step * 8) % 64 + 8)
    loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    local_sgd.step()


def _regression_run(accelerator, steps, local_sgd_kwargs, local_sgd_steps=4):
    """A seeded linear regression under LocalSGD; returns the final parameters and the loss over all
    ranks' data before and after."""
    model, optimizer, x, y = _regression_setup(accelerator)

    def global_loss():
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(model(x), y).reshape(1)
        dist.all_reduce(loss)
        return loss.item() / dist.get_world_size()

    first = global_loss()
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=local_sgd_steps, **local_sgd_kwargs) as local_sgd:
        for step in range(steps):
            _regression_step(accelerator, model, optimizer, local_sgd, x, y, step)
    return {"params": snapshot(model.parameters()), "first_loss": first, "last_loss": global_loss()}


def outer_step_runs(anchor_device):
    """The same seeded run with plain averaging, with outer SGD(lr=1, momentum=0), and with DiLoCo's
    recipe."""
    accelerator = _accelerator()
    return {
        "plain": _regression_run(accelerator, 40, {}),
        "sgd_lr1": _regression_run(
            accelerator,
            40,
            {"outer_optimizer": functools.partial(torch.optim.SGD, lr=1.0), "outer_anchor_device": anchor_device},
        ),
        "diloco": _regression_run(accelerator, 40, {"outer_optimizer": "diloco", "outer_anchor_device": anchor_device}),
    }


# Checkpointing: the same training, uninterrupted or saved at a step, killed, and resumed. Accelerate's
# save_state() writes rank 0's model and optimizer only, so a checkpoint resumes every rank exactly only
# where they all hold the same state: right after a sync (step 11 here: warmup syncs 1, 2, 3, then every
# 4 from there: 7, 11, ...), with an optimizer whose state does not differ by rank (plain SGD). The
# DiLoCo anchor and outer momentum are the same on every rank by construction.
CHECKPOINT_STEPS = 23
CHECKPOINT_AT = 11
CHECKPOINT_OPTIONS = dict(local_sgd_steps=4, warmup_steps=3, outer_optimizer="diloco")


def checkpointed_training(mode, directory):
    """mode "full": all steps. "save_and_die": saves after CHECKPOINT_AT steps, then the process kills
    itself (SIGKILL, no cleanup). "resume": loads that state and runs the remaining steps."""
    accelerator = _accelerator()
    model, optimizer, x, y = _regression_setup(accelerator)
    local_sgd = LocalSGD(accelerator=accelerator, model=model, **CHECKPOINT_OPTIONS)
    accelerator.register_for_checkpointing(local_sgd)
    start = 0
    if mode == "resume":
        accelerator.load_state(directory)
        start = local_sgd.num_steps
    with local_sgd:
        for step in range(start, CHECKPOINT_STEPS):
            _regression_step(accelerator, model, optimizer, local_sgd, x, y, step)
            if mode == "save_and_die" and step + 1 == CHECKPOINT_AT:
                assert local_sgd.last_step_synced
                accelerator.save_state(directory)
                accelerator.wait_for_everyone()
                os.kill(os.getpid(), signal.SIGKILL)
    return {
        "params": snapshot(model.parameters()),
        "num_steps": local_sgd.num_steps,
        "sync_count": local_sgd.sync_count,
        "started_at": start,
    }


def comm_dtype_average(comm_dtype_name):
    """Averages fp32 tensors (one of them strided) and a bf16 one with comm_dtype; returns this rank's
    inputs and the results."""
    from localsgd_ext import ParameterAverager

    dist.init_process_group("gloo", timeout=group_timeout())
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(10 + rank)
    tensors = [
        torch.randn(1000, generator=gen) * 100,
        torch.randn(37, 5, generator=gen) * 1e-3,
        torch.randn(6, 8, generator=gen).t(),  # strided: the ATen path
        torch.randn(50, generator=gen).to(torch.bfloat16),
    ]
    inputs = snapshot(tensors)
    averager = ParameterAverager(tensors, bucket_cap_mb=0.002, comm_dtype=getattr(torch, comm_dtype_name))
    averager.average()
    result = {
        "inputs": inputs,
        "outputs": snapshot(tensors),
        "dtypes": [t.dtype for t in tensors],
        "wire_element_sizes": sorted({b["element_size"] for b in averager.buckets}),
        "staging_bytes": averager.staging_bytes,
    }
    dist.destroy_process_group()
    return result


def comm_dtype_training():
    """The regression run with a bf16 wire: converges like the fp32 one, ranks identical."""
    accelerator = _accelerator()
    return {
        "fp32": _regression_run(accelerator, 40, {}),
        "bf16": _regression_run(accelerator, 40, {"comm_dtype": torch.bfloat16}),
    }


def _torch_post_local_sgd(model, warmup_steps: int, momentum: float):
    """torch's own post-local SGD on a DDP model: `post_localSGD_hook` all-reduces the gradients until
    `start_localSGD_iter`, then leaves them local (subgroups of one rank), and `PostLocalSGDOptimizer`
    averages the parameters with a `PeriodicModelAverager` (period 4, the same warm-up)."""
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    subgroup, _ = dist.new_subgroups(group_size=1)
    state = PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=warmup_steps)
    model.register_comm_hook(state, post_localSGD_hook)
    averager = PeriodicModelAverager(period=4, warmup_steps=warmup_steps)
    return PostLocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum), averager)


def warmup_is_ddp_training(warmup_steps: int, steps: int, momentum: float = 0.9):
    """The same seeded training with SGD + momentum on this rank's data, three times: under
    LocalSGD(warmup_steps), under plain DDP (no LocalSGD), and under torch's PostLocalSGDOptimizer with
    post_localSGD_hook. Each run's parameters and momentum buffers after every step."""
    accelerator = _accelerator()
    runs = {}
    for name in ("local_sgd", "ddp", "torch_post_local_sgd"):
        set_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        if name == "torch_post_local_sgd":
            model = accelerator.prepare(module)
            optimizer = _torch_post_local_sgd(model, warmup_steps, momentum)
        else:
            model, optimizer = accelerator.prepare(module, torch.optim.SGD(module.parameters(), lr=0.05, momentum=momentum))
        x, y = _regression_data(dist.get_rank())
        local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, warmup_steps=warmup_steps)
        context = local_sgd if name == "local_sgd" else contextlib.nullcontext()
        params, momenta, synced = [], [], []
        with context:
            for step in range(steps):
                batch = slice((step * 8) % 64, (step * 8) % 64 + 8)
                accelerator.backward(torch.nn.functional.mse_loss(model(x[batch]), y[batch]))
                optimizer.step()
                optimizer.zero_grad()
                if name == "local_sgd":
                    local_sgd.step()
                    synced.append(local_sgd.last_step_synced)
                params.append(snapshot(model.parameters()))
                # Plain SGD keeps no momentum buffer.
                momenta.append(snapshot(optimizer.state[p].get("momentum_buffer", torch.zeros(0)) for p in model.parameters()))
        runs[name] = {"params": params, "momenta": momenta, "synced": synced, "sync_count": local_sgd.sync_count}
    return runs
