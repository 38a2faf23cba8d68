"""Rank-side body of the combination test: every pair of options on one launch of real ranks, each over a
fresh model moved by the reference's own moves (no optimizer), recording every step."""

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from combination_reference import LOCAL_SGD_STEPS, STEPS, initial, move, mover_of, options_of, steps_of
from rank_setup import group_timeout, snapshot

from localsgd_ext import LocalSGD


def _module():
    """The combination model, at the reference's initial values (the same on every rank)."""
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(initial(i, p.shape))
        for j, b in enumerate(_float_buffers(module)):
            b.copy_(initial(1000 + j, b.shape))
    return module


def _float_buffers(model):
    return [b for b in model.buffers() if b.is_floating_point()]


def _int_buffers(model):
    return [b for b in model.buffers() if not b.is_floating_point()]


def _state(model, full_tensor):
    return {
        "params": snapshot(full_tensor(p) for p in model.parameters()),
        "float_buffers": snapshot(_float_buffers(model)),
        "int_buffers": [int(b) for b in _int_buffers(model)],
    }


def _run(model, build, move_parameters, mover_at, full_tensor, step_count=STEPS):
    """One case: the LocalSGD `build()` makes (or its refusal), then `step_count` steps, each moving the parameters
    (`move_parameters(mover, step)`) and the buffers by the reference's moves of rank `mover_at(step)` and
    recording the state (`full_tensor(p)`: a parameter's whole value)."""
    try:
        local_sgd = build()
    except Exception as error:  # noqa: BLE001 - a refusal is what some pairs must get
        return {"refused": (type(error).__name__, str(error))}
    steps = []
    with local_sgd:
        for step in range(1, step_count + 1):
            mover = mover_at(step)
            with torch.no_grad():
                move_parameters(mover, step)
                for j, b in enumerate(_float_buffers(model)):
                    b.add_(move(mover, step, 1000 + j, b.shape))
                for j, b in enumerate(_int_buffers(model)):
                    b.fill_(step * (mover + 1) + j)
            local_sgd.step()
            steps.append(_state(model, full_tensor))
    return {
        "steps": steps,
        "final": _state(model, full_tensor),
        "sync_count": local_sgd.sync_count,
        "level_sync_counts": dict(local_sgd.level_sync_counts),
    }


def _run_on_ddp(accelerator, rank: int, case):
    options = options_of(case)
    model = accelerator.prepare(_module())

    def move_parameters(mover, step):
        for i, p in enumerate(model.parameters()):
            p.add_(move(mover, step, i, p.shape))

    # During warm-up DDP's gradient all-reduce keeps the ranks in step: every rank moves as rank 0.
    warmup = options.get("warmup_steps", 0)
    return _run(
        model,
        lambda: LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=LOCAL_SGD_STEPS, **options),
        move_parameters,
        lambda step: mover_of(rank, step, step <= warmup),
        lambda p: p,
        steps_of(case),
    )


def every_case(cases):
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    return {"+".join(case): _run_on_ddp(accelerator, rank, case) for case in cases}


def _run_sharded(accelerator, mesh, case):
    """As _run_on_ddp, on 2 replicas of the model sharded over 2 ranks each (FSDP2, dimension 0): each
    replica moves its full tensors by the reference's moves for replica `replica` (each shard adds its
    rows), and records the full tensors."""
    from torch.distributed.fsdp import fully_shard

    replica, shard = mesh["replicate"].get_local_rank(), mesh["shard"].get_local_rank()
    options = options_of([axis for axis in case if axis != "sharded"])
    model = _module()
    for layer in model:
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])

    def move_parameters(mover, step):
        for i, p in enumerate(model.parameters()):
            p.to_local().add_(move(mover, step, i, p.shape).chunk(2, dim=0)[shard])

    return _run(
        model,
        lambda: LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=LOCAL_SGD_STEPS, device_mesh=mesh, **options),
        move_parameters,
        lambda step: replica,
        lambda p: p.full_tensor(),
    )


def every_sharded_case(cases):
    """Every case on a (replicate=2, shard=2) mesh of 4 ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return {"+".join(case): _run_sharded(accelerator, mesh, case) for case in cases}
