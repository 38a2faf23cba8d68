"""Rank-side bodies of the sharded-model tests: 4 gloo ranks, a (replicate=2, shard=2) CPU mesh; FSDP2
shards each replica over the "shard" dimension, LocalSGD averages over the "replicate" one."""

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from localsgd_ext import LocalSGD
from rank_setup import group_timeout, snapshot


def _sharded_model(mesh_shape, names, shard_over=None):
    """The model, fully_shard-ed over `mesh[shard_over]` (the whole mesh when None), and the mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    shard_mesh = mesh if shard_over is None else mesh[shard_over]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    return model, mesh


def hsdp_local_sgd(steps: int):
    """Trains with LocalSGD(local_sgd_steps=3) on rank-specific data; records each step's full
    (unsharded) parameters before and after `step()`, and whether gradient all-reduce was off."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    model, mesh = _sharded_model((2, 2), ("replicate", "shard"), shard_over="shard")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(300 + rank // 2)  # the two shards of one replica see the same data
    before, after, local_before, local_after = [], [], [], []
    replicas = mesh.get_group("replicate")
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=3, process_group=replicas) as local_sgd:
        for _ in range(steps):
            x = torch.randn(6, 8, generator=data)
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            before.append([p.full_tensor() for p in model.parameters()])
            local_before.append(snapshot(p.to_local() for p in model.parameters()))
            local_sgd.step()
            after.append([p.full_tensor() for p in model.parameters()])
            local_after.append(snapshot(p.to_local() for p in model.parameters()))
        group = local_sgd._averagers[0].process_group
        replica_ranks = dist.get_process_group_ranks(group)
    return {"before": before, "after": after, "local_before": local_before, "local_after": local_after,
            "replica_ranks": replica_ranks, "final": [p.full_tensor() for p in model.parameters()]}


def refusal(layout: str):
    """What entering LocalSGD raises for a model it cannot average: `pure` FSDP over all 4 ranks with no
    process_group, or FSDP2's `hsdp` (replicated over its own 2-D mesh)."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    if layout == "pure":
        model, _ = _sharded_model((4,), ("shard",))
    else:
        model, _ = _sharded_model((2, 2), ("replicate", "shard"))
    try:
        LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2).__enter__()
    except (ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None
