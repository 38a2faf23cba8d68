"""Rank-side bodies of the sharded-model tests: 4 gloo ranks, a (replicate=2, shard=2) CPU mesh; FSDP2
shards each replica over the "shard" dimension, LocalSGD averages over the "replicate" one."""

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from rank_setup import group_timeout, snapshot

from localsgd_ext import LocalSGD, ParameterAverager


def _sharded_model(mesh_shape, names, shard_over=None, mesh=None, hidden=16):
    """The model, fully_shard-ed over `mesh[shard_over]` (the whole mesh when None), and the mesh (built
    from `mesh_shape` and `names` unless given)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    shard_mesh = mesh if shard_over is None else mesh[shard_over]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    return model, mesh


def _replica_mesh(source: str):
    """A (replicate=2, shard=2) mesh, its dimension for fully_shard, and LocalSGD's keyword arguments
    naming the replicas: a torch mesh and `process_group`, or the mesh Accelerate's own
    `ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)` builds, passed whole as `device_mesh`."""
    if source == "process_group":
        model, mesh = _sharded_model((2, 2), ("replicate", "shard"), shard_over="shard")
        return model, mesh, "replicate", {"process_group": mesh.get_group("replicate")}
    from accelerate.parallelism_config import ParallelismConfig

    mesh = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2).build_device_mesh("cpu")
    model, _ = _sharded_model(None, None, shard_over="dp_shard", mesh=mesh)
    return model, mesh, "dp_replicate", {"device_mesh": mesh}


def hsdp_local_sgd(steps: int, source: str = "process_group", options: dict = None):
    """Trains with LocalSGD(local_sgd_steps=3, **options) on rank-specific data, the replicas named as
    `_replica_mesh` says; records each step's full (unsharded) parameters before and after `step()`."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    model, mesh, replicate_dim, replicas = _replica_mesh(source)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(300 + rank // 2)  # the two shards of one replica see the same data
    before, after, local_before, local_after = [], [], [], []
    initial = [p.full_tensor() for p in model.parameters()]
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=3, **replicas, **(options or {})) as local_sgd:
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
        group = local_sgd._controller.averagers[0].process_group
        replica_ranks = dist.get_process_group_ranks(group)
        assert replica_ranks == dist.get_process_group_ranks(mesh.get_group(replicate_dim))
    return {
        "initial": initial,
        "before": before,
        "after": after,
        "local_before": local_before,
        "local_after": local_after,
        "replica_ranks": replica_ranks,
        "final": [p.full_tensor() for p in model.parameters()],
    }


def zero_copy_like_copy_mode(steps: int, forward_first: bool):
    """Trains the same replicas twice, in copy mode and in zero-copy mode (LocalSGD(local_sgd_steps=2) on
    rank-specific data), `forward_first`: one forward before LocalSGD is entered, so that FSDP2 has
    initialized (lazy_init) before the shards move. Each step's full parameters after `step()`, for both;
    whether FSDP2's all-gather input is the local shard (one memory) after training, and again after a
    shard was moved away from under the engine (which moves every shard into new flat buffers)."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    results = {}
    for zero_copy in (False, True):
        model, mesh = _sharded_model((2, 2), ("replicate", "shard"), shard_over="shard")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(300 + dist.get_rank() // 2)
        if forward_first:
            model(torch.randn(2, 8, generator=data))
        after = []
        with LocalSGD(
            accelerator=accelerator, model=model, local_sgd_steps=2, device_mesh=mesh, zero_copy=zero_copy
        ) as local_sgd:
            for _ in range(steps):
                model(torch.randn(6, 8, generator=data)).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                local_sgd.step()
                after.append([p.full_tensor() for p in model.parameters()])
            results[zero_copy] = after
            if zero_copy:
                averager = local_sgd._controller.averagers[0]
                results["flat_bytes"] = averager.flat_bytes
                results["aliased"] = _fsdp_gathers_local_shards(model)
                moved = model[0].weight._local_tensor
                moved.data = moved.clone()  # FSDP2 still gathers the old memory
                results["aliased_after_move"] = _fsdp_gathers_local_shards(model)
                local_sgd._sync_and_avg_model_params()
                results["plans_built"] = averager._engine.plans_built
                results["aliased_after_sync"] = _fsdp_gathers_local_shards(model)
    return results


def _fsdp_gathers_local_shards(model) -> bool:
    """Whether every FSDP2 module's all-gather input (its padded shard buffer) is the memory of the
    parameter's local shard."""
    from torch.distributed.fsdp import FSDPModule

    records = [
        record
        for module in model.modules()
        if isinstance(module, FSDPModule)
        for group in module._get_fsdp_state()._fsdp_param_groups
        for record in group.fsdp_params
    ]
    assert len(records) == len(list(model.parameters()))
    return all(r._sharded_param_data.data_ptr() == r.sharded_param._local_tensor.data_ptr() for r in records)


def refusal(layout: str):
    """What entering LocalSGD raises for a model it cannot average: `pure` FSDP over all 4 ranks with no
    process_group, FSDP2's `hsdp` (replicated over its own 2-D mesh), `zero_copy` with a shard FSDP2 pads
    (15 rows over 2 shards), a `hierarchy` level as large as the 2 replicas, or the shards' own group as the
    replicas (`shard_dim`: mesh_dim="shard", `shard_group`: its process group); `zero_copy_averager`: a
    ParameterAverager in zero-copy mode on shards without the model that owns them."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    options = {}
    if layout == "pure":
        model, _ = _sharded_model((4,), ("shard",))
    elif layout in ("zero_copy", "hierarchy"):
        model, mesh = _sharded_model(
            (2, 2), ("replicate", "shard"), shard_over="shard", hidden=15 if layout == "zero_copy" else 16
        )
        options = (
            {"device_mesh": mesh, "zero_copy": True} if layout == "zero_copy" else {"device_mesh": mesh, "hierarchy": {2: 1}}
        )
    elif layout in ("shard_dim", "shard_group"):
        # The parameters' own sharding group named as if it held replicas.
        model, mesh = _sharded_model((2, 2), ("replicate", "shard"), shard_over="shard")
        options = (
            {"device_mesh": mesh, "mesh_dim": "shard"} if layout == "shard_dim" else {"process_group": mesh.get_group("shard")}
        )
    elif layout == "zero_copy_averager":
        model, mesh = _sharded_model((2, 2), ("replicate", "shard"), shard_over="shard")
        try:
            ParameterAverager(model.parameters(), process_group=mesh.get_group("replicate"), zero_copy=True)
        except TypeError as error:
            return f"{type(error).__name__}: {error}"
        return None
    else:
        model, _ = _sharded_model((2, 2), ("replicate", "shard"))
    try:
        LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, **options).__enter__()
    except (ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def shard_layout_mismatch():
    """Rank 3 (shard 1 of replica B) builds a wider model, so only shard 1's replicas (ranks 1 and 3)
    disagree; what entering LocalSGD raises on each rank (ranks 0 and 2 must not go on to train)."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    hidden = 20 if dist.get_rank() == 3 else 16
    model, mesh = _sharded_model((2, 2), ("replicate", "shard"), shard_over="shard", hidden=hidden)
    try:
        LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, device_mesh=mesh).__enter__()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def mesh_dim_refusals():
    """What LocalSGD raises for replica dimensions a (1, 1) mesh lacks, by the argument given."""
    from torch.distributed.device_mesh import init_device_mesh

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    named = init_device_mesh("cpu", (1, 1), mesh_dim_names=("pp", "shard"))
    messages = {}
    for label, kwargs in {
        "no replicate dimension": dict(device_mesh=named),
        "unknown name": dict(device_mesh=named, mesh_dim="tp"),
        "index out of range": dict(device_mesh=named, mesh_dim=2),
        "float": dict(device_mesh=named, mesh_dim=1.0),
    }.items():
        try:
            LocalSGD(accelerator=accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=2, **kwargs)
            messages[label] = None
        except (TypeError, ValueError) as error:
            messages[label] = f"{type(error).__name__}: {error}"
    messages["by index"] = dist.get_process_group_ranks(
        LocalSGD(
            accelerator=accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=2, device_mesh=named, mesh_dim=0
        ).process_group
    )
    return messages


def hierarchy_over_replicas(steps: int):
    """8 ranks, a (replicate=4, shard=2) mesh, LocalSGD(local_sgd_steps=4, hierarchy={2: 1}): each pair
    of consecutive replicas averages every step, all 4 replicas every 4 steps. No optimizer: each rank
    moves its local shard by its own amounts. Each step's local shard after `step()`, and the counts."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    model, mesh = _sharded_model((4, 2), ("replicate", "shard"), shard_over="shard")
    moves = torch.Generator().manual_seed(500 + dist.get_rank())
    after = []
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, hierarchy={2: 1}, device_mesh=mesh) as local_sgd:
        for _ in range(steps):
            with torch.no_grad():
                for p in model.parameters():
                    local = p.to_local()
                    local.add_(torch.randn(local.shape, generator=moves))
            local_sgd.step()
            after.append(snapshot(p.to_local() for p in model.parameters()))
        level_ranks = dist.get_process_group_ranks(local_sgd._controller.hierarchy.groups[2])
    return {
        "after": after,
        "level_ranks": level_ranks,
        "sync_count": local_sgd.sync_count,
        "level_sync_counts": local_sgd.level_sync_counts,
    }
