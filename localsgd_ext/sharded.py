"""DTensor parameters (FSDP2's `fully_shard` within each replica): Local SGD averages each rank's local
shard across the replicas only, i.e. with the ranks that hold the same shard of the other copies of the
model. They hold the same slice of the model, so averaging their local tensors is averaging the full
model across replicas."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_sharded", "local_tensors", "local_tensors_and_replica_group", "replica_group_from_mesh", "REPLICATE_DIM_NAMES"]

# The replicate dimension's name in Accelerate's ParallelismConfig meshes, then in torchtitan's and torch's examples.
REPLICATE_DIM_NAMES = ("dp_replicate", "replicate")


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no sharded parameters either
        return None
    return DTensor


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def local_tensors(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Each DTensor's local shard (detached: the same storage, without the autograd view that forbids
    writing through it); plain tensors as they are."""
    dtensor = _dtensor_class()
    return [t.to_local().detach() if dtensor is not None and isinstance(t, dtensor) else t for t in tensors]


def local_tensors_and_replica_group(
    params: Sequence[torch.Tensor], names: Sequence[str], process_group: Optional[dist.ProcessGroup]
) -> Tuple[List[torch.Tensor], dist.ProcessGroup]:
    """Each DTensor's local tensor (its storage: averaging it in place updates the parameter)
    and the process group of the replicas, which must be given: FSDP2 shards each replica over its own
    mesh (`fully_shard(model, mesh=mesh["shard"])`, torchft's and torchtitan's layout for DiLoCo), and
    the replicas are the ranks holding the same shard index in the others (`mesh.get_group("replicate")`)."""
    from torch.distributed.tensor import DTensor, Replicate

    for i, (p, name) in enumerate(zip(params, names)):
        if not isinstance(p, DTensor):
            raise TypeError(
                f"{name} (params[{i}]) is a plain tensor among DTensor parameters; shard the whole model (FSDP2's "
                "fully_shard on its root) or none of it"
            )
    mesh = params[0].device_mesh
    for i, (p, name) in enumerate(zip(params, names)):
        if p.device_mesh != mesh:
            raise ValueError(f"{name} (params[{i}]) lives on another device mesh than {names[0]}: {p.device_mesh} vs {mesh}")
    if any(isinstance(placement, Replicate) for placement in params[0].placements):
        # FSDP2's HSDP: set_requires_all_reduce(False) does not skip the cross-replica all-reduce, it
        # defers it, and the gradients are not handed to the optimizer meanwhile.
        raise NotImplementedError(
            f"DTensor parameters replicated over their own mesh (FSDP2's HSDP, placements {params[0].placements}) "
            "are not supported: FSDP2 all-reduces their gradients across replicas at every step, and switching that "
            "off withholds the gradients. Shard each replica on its own mesh, fully_shard(model, "
            "mesh=mesh['shard']), and pass process_group=mesh.get_group('replicate') or device_mesh=mesh. With "
            "Accelerate's ParallelismConfig(dp_replicate_size=R, dp_shard_size=S): fully_shard the model over "
            "accelerator.torch_device_mesh['dp_shard'] before accelerator.prepare(), which leaves it as it is"
        )
    if process_group is None:
        raise ValueError(
            f"the parameters are sharded over their whole device mesh (placements {params[0].placements} on a mesh "
            f"of shape {tuple(mesh.shape)}): each rank holds a different part of one model, so there are no "
            "replicas to average among them. Local SGD needs replicas: pass process_group, the group of the ranks "
            "that hold the same shard in the other replicas (e.g. mesh.get_group('replicate') with "
            "fully_shard(model, mesh=mesh['shard'])), or use DDP"
        )
    return local_tensors(params), process_group


def replica_group_from_mesh(device_mesh, mesh_dim) -> dist.ProcessGroup:
    """The process group along `mesh_dim` of `device_mesh` (a name or an index; None: the replicate
    dimension, by one of the `REPLICATE_DIM_NAMES`)."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a torch.distributed.device_mesh.DeviceMesh or None, got {device_mesh!r}")
    names = tuple(device_mesh.mesh_dim_names or ())
    if mesh_dim is None:
        found = [name for name in REPLICATE_DIM_NAMES if name in names]
        if not found:
            raise ValueError(
                f"device_mesh has no replicate dimension to average over (its dimensions are named {names}, none "
                f"of {REPLICATE_DIM_NAMES}); pass mesh_dim, the name or index of the dimension across replicas"
            )
        mesh_dim = found[0]
    elif isinstance(mesh_dim, str):
        if mesh_dim not in names:
            raise ValueError(f"mesh_dim must name a dimension of device_mesh, one of {names}, got {mesh_dim!r}")
    elif isinstance(mesh_dim, int) and not isinstance(mesh_dim, bool):
        if not 0 <= mesh_dim < device_mesh.ndim:
            raise ValueError(f"mesh_dim must be in [0, {device_mesh.ndim}) for this device_mesh, got {mesh_dim}")
    else:
        raise TypeError(f"mesh_dim must be a dimension's name (str), its index (int) or None, got {mesh_dim!r}")
    return device_mesh.get_group(mesh_dim)
