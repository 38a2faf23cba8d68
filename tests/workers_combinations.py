"""Rank-side body of the combination test: every pair of options on one launch of real ranks, each over a
fresh model moved by the reference's own moves (no optimizer), recording every step."""

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from combination_reference import LOCAL_SGD_STEPS, STEPS, initial, move, mover_of, options_of
from rank_setup import group_timeout, snapshot

from localsgd_ext import LocalSGD


def _model(accelerator):
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(initial(i, p.shape))
        for j, b in enumerate(_float_buffers(module)):
            b.copy_(initial(1000 + j, b.shape))
    return accelerator.prepare(module)


def _float_buffers(model):
    return [b for b in model.buffers() if b.is_floating_point()]


def _int_buffers(model):
    return [b for b in model.buffers() if not b.is_floating_point()]


def _state(model):
    return {
        "params": snapshot(model.parameters()),
        "float_buffers": snapshot(_float_buffers(model)),
        "int_buffers": [int(b) for b in _int_buffers(model)],
    }


def _run(accelerator, rank: int, case):
    options = options_of(case)
    if "hierarchy" in options:
        options["hierarchy"] = {int(size): period for size, period in options["hierarchy"].items()}
    model = _model(accelerator)
    try:
        local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=LOCAL_SGD_STEPS, **options)
    except Exception as error:  # noqa: BLE001 - a refusal is what some pairs must get
        return {"refused": (type(error).__name__, str(error))}
    steps = []
    with local_sgd:
        for step in range(1, STEPS + 1):
            # During warm-up DDP's gradient all-reduce keeps the ranks in step: every rank moves as rank 0.
            mover = mover_of(rank, step, step <= options.get("warmup_steps", 0))
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.add_(move(mover, step, i, p.shape))
                for j, b in enumerate(_float_buffers(model)):
                    b.add_(move(mover, step, 1000 + j, b.shape))
                for j, b in enumerate(_int_buffers(model)):
                    b.fill_(step * (mover + 1) + j)
            local_sgd.step()
            steps.append(_state(model))
    return {
        "steps": steps,
        "final": _state(model),
        "sync_count": local_sgd.sync_count,
        "level_sync_counts": dict(local_sgd.level_sync_counts),
    }


def every_case(cases):
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    return {"+".join(case): _run(accelerator, rank, case) for case in cases}


def _sharded_model(mesh):
    """The combination model, every parameter sharded over `mesh["shard"]` (2 shards, dimension 0)."""
    from torch.distributed.fsdp import fully_shard

    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(initial(i, p.shape))
        for j, b in enumerate(_float_buffers(module)):
            b.copy_(initial(1000 + j, b.shape))
    for layer in module:
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(module, mesh=mesh["shard"])
    return module


def _full_state(model):
    return {
        "params": snapshot(p.full_tensor() for p in model.parameters()),
        "float_buffers": snapshot(_float_buffers(model)),
        "int_buffers": [int(b) for b in _int_buffers(model)],
    }


def _run_sharded(accelerator, mesh, case):
    """As _run, on 2 replicas of a model sharded over 2 ranks each: the replica moves its full tensors by the
    reference's moves for replica `replica` (each shard adds its rows), and records the full tensors."""
    replica, shard = mesh["replicate"].get_local_rank(), mesh["shard"].get_local_rank()
    options = options_of([axis for axis in case if axis != "sharded"])
    model = _sharded_model(mesh)
    try:
        local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=LOCAL_SGD_STEPS, device_mesh=mesh, **options)
    except Exception as error:  # noqa: BLE001 - a refusal is what some pairs must get
        return {"refused": (type(error).__name__, str(error))}
    steps = []
    with local_sgd:
        for step in range(1, STEPS + 1):
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    full_move = move(replica, step, i, p.shape)
                    p.to_local().add_(full_move.chunk(2, dim=0)[shard])
                for j, b in enumerate(_float_buffers(model)):
                    b.add_(move(replica, step, 1000 + j, b.shape))
                for j, b in enumerate(_int_buffers(model)):
                    b.fill_(step * (replica + 1) + j)
            local_sgd.step()
            steps.append(_full_state(model))
    return {
        "steps": steps,
        "final": _full_state(model),
        "sync_count": local_sgd.sync_count,
        "level_sync_counts": dict(local_sgd.level_sync_counts),
    }


def every_sharded_case(cases):
    """Every case on a (replicate=2, shard=2) mesh of 4 ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return {"+".join(case): _run_sharded(accelerator, mesh, case) for case in cases}
