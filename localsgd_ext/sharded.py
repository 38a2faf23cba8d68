"""DTensor parameters (FSDP2's `fully_shard` within each replica): Local SGD averages each rank's local
shard across the replicas only, i.e. with the ranks that hold the same shard of the other copies of the
model. They hold the same slice of the model, so averaging their local tensors is averaging the full
model across replicas."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, cast

import torch
import torch.distributed as dist

__all__ = [
    "FsdpShardAliases",
    "is_sharded",
    "local_tensors",
    "local_tensors_and_replica_group",
    "replica_group_from_mesh",
    "REPLICATE_DIM_NAMES",
]

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


def shaped_like_parameters(tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Local tensors (e.g. the averaged means of the shards) as the parameters are: DTensors with each
    parameter's mesh, placements, shape and strides, sharing the local memory; plain tensors as they are."""
    if not is_sharded(params):
        return list(tensors)
    from torch.distributed.tensor import DTensor

    return [
        DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        for t, p in zip(tensors, cast(Sequence[DTensor], params))
    ]


def local_tensors_and_replica_group(
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    process_group: Optional[dist.ProcessGroup],
    own_objects: bool = False,
) -> Tuple[List[torch.Tensor], dist.ProcessGroup]:
    """Each DTensor's local tensor (its storage: averaging it in place updates the parameter; with
    `own_objects`, the DTensor's own local tensor object, which zero-copy mode rebinds to its flat buffer)
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
    dtensors = cast(Sequence[DTensor], params)
    mesh = dtensors[0].device_mesh
    for i, (p, name) in enumerate(zip(dtensors, names)):
        if p.device_mesh != mesh:
            raise ValueError(f"{name} (params[{i}]) lives on another device mesh than {names[0]}: {p.device_mesh} vs {mesh}")
    if any(isinstance(placement, Replicate) for placement in dtensors[0].placements):
        # FSDP2's HSDP: set_requires_all_reduce(False) does not skip the cross-replica all-reduce, it
        # defers it, and the gradients are not handed to the optimizer meanwhile.
        raise NotImplementedError(
            f"DTensor parameters replicated over their own mesh (FSDP2's HSDP, placements {dtensors[0].placements}) "
            "are not supported: FSDP2 all-reduces their gradients across replicas at every step, and switching that "
            "off withholds the gradients. Shard each replica on its own mesh, fully_shard(model, "
            "mesh=mesh['shard']), and pass process_group=mesh.get_group('replicate') or device_mesh=mesh. With "
            "Accelerate's ParallelismConfig(dp_replicate_size=R, dp_shard_size=S): fully_shard the model over "
            "accelerator.torch_device_mesh['dp_shard'] before accelerator.prepare(), which leaves it as it is"
        )
    if process_group is None:
        raise ValueError(
            f"the parameters are sharded over their whole device mesh (placements {dtensors[0].placements} on a mesh "
            f"of shape {tuple(mesh.shape)}): each rank holds a different part of one model, so there are no "
            "replicas to average among them. Local SGD needs replicas: pass process_group, the group of the ranks "
            "that hold the same shard in the other replicas (e.g. mesh.get_group('replicate') with "
            "fully_shard(model, mesh=mesh['shard'])), or use DDP"
        )
    _refuse_group_across_shards(params[0], process_group)
    if own_objects:
        return [p._local_tensor for p in dtensors], process_group
    return local_tensors(params), process_group


def _refuse_group_across_shards(param, process_group: dist.ProcessGroup) -> None:
    """The replicas hold the same shard: a group with another rank of the parameters' own mesh (e.g.
    `mesh_dim="shard"`, or `mesh.get_group("shard")`) would average different shards together."""
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    me = dist.get_rank()
    try:
        members = set(dist.get_process_group_ranks(process_group))
    except (KeyError, ValueError, RuntimeError):
        # A group torch.distributed did not create (a torchft quorum's, across replica groups that are jobs of
        # their own): none of its ranks is another rank of this job's mesh.
        return
    coordinates = (mesh.mesh == me).nonzero()
    if len(coordinates) != 1:
        return
    names = tuple(mesh.mesh_dim_names or range(mesh.ndim))
    for dim, placement in enumerate(param.placements):
        if not isinstance(placement, Shard):
            continue
        # The ranks holding the other shards along this dimension: this rank's row of the mesh there.
        index = [slice(None) if d == dim else int(c) for d, c in enumerate(coordinates[0])]
        others = sorted(set(mesh.mesh[tuple(index)].flatten().tolist()) & members - {me})
        if others:
            raise ValueError(
                f"process_group (ranks {sorted(members)}) spans the dimension {names[dim]!r} of the parameters' "
                f"device mesh, across which they are sharded ({placement}): rank {me} would average its shard with "
                f"the different shards of ranks {others}. Pass the group across the replicas instead (e.g. "
                "mesh.get_group('replicate'), or device_mesh with mesh_dim naming the replicate dimension)"
            )


class FsdpShardAliases:
    """Zero-copy mode on FSDP2 shards. FSDP2 keeps a second reference to each shard's memory, the padded
    1-D buffer its all-gather reads (`FSDPParam._sharded_param_data`), besides the DTensor's local tensor
    that the optimizer writes. Once the engine has moved the local tensors into its flat buffers, FSDP2
    is asked to derive that reference again from the local tensor, with its own method for a local tensor
    replaced under it (what `module.to()` and `load_state_dict` trigger), so that it all-gathers the
    averaged values. Only unpadded shards can alias: FSDP2 copies a padded one (a dimension not divisible
    by the shard count) into a buffer of its own, so those are refused before anything is moved.

    Args:
        model (`torch.nn.Module`): the model whose FSDP2 modules own the parameters.
        params (`Sequence[torch.Tensor]`): the DTensor parameters to average.
        names (`Sequence[str]`): their names, for errors.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], names: Sequence[str]):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                "zero_copy with DTensor parameters needs sharded_model, the torch.nn.Module (FSDP2-sharded) that owns "
                f"them: FSDP2 keeps its own reference to each shard's memory, which must follow the shard into the flat "
                f"buffers; got {model!r}"
            )
        owners = _fsdp_params_by_parameter(model)
        self._records = []  # (index in params, FSDP2's record of it)
        for i, (p, name) in enumerate(zip(params, names)):
            record = owners.get(id(p))
            if record is None:
                continue  # a DTensor no FSDP2 module manages (e.g. tensor parallel): its local tensor is its only storage
            try:
                offloaded = record.offload_to_cpu
                dim, shards = record.fsdp_placement.dim, record.mesh_info.shard_mesh_size
            except AttributeError as error:
                raise _internals_differ(error) from error
            if offloaded:
                raise NotImplementedError(
                    f"zero_copy with FSDP2's CPU offload is not supported ({name}): FSDP2 keeps offloaded shards in "
                    "memory of its own. Use zero_copy=False"
                )
            if p.shape[dim] % shards != 0:
                raise NotImplementedError(
                    f"zero_copy on FSDP2 shards needs every shard unpadded, but {name} (params[{i}], shape "
                    f"{tuple(p.shape)}) has {p.shape[dim]} rows in dimension {dim} over {shards} shards, which FSDP2 pads "
                    "and keeps in a buffer of its own. Use zero_copy=False, or sizes divisible by the shard count"
                )
            self._records.append((i, record))
        self._plans_aliased: Optional[int] = None

    def follow(self, tensors: Sequence[torch.Tensor], plans_built: int) -> None:
        """Points FSDP2 at the local tensors again when the engine has moved them since the last call
        (`plans_built`: the engine's count of plans)."""
        if plans_built == self._plans_aliased:
            return
        with torch.no_grad():
            for i, record in self._records:
                record.reset_sharded_param()
                if record.sharded_param._local_tensor is not tensors[i] or (
                    tensors[i].numel() > 0 and record._sharded_param_data.data_ptr() != tensors[i].data_ptr()
                ):
                    raise RuntimeError(
                        f"FSDP2 did not take params[{i}]'s shard from the flat buffer (this torch {torch.__version__} "
                        "derives its all-gather input differently); its all-gather would read stale values. Use "
                        "zero_copy=False"
                    )
        self._plans_aliased = plans_built


def _fsdp_params_by_parameter(model: torch.nn.Module) -> dict:
    """FSDP2's record (FSDPParam) of each parameter that an FSDP2 module in `model` manages, by id of the
    DTensor parameter."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    records = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            try:
                groups = module._get_fsdp_state()._fsdp_param_groups
                for group in groups:
                    for record in group.fsdp_params:
                        records[id(record.sharded_param)] = record
            except AttributeError as error:
                raise _internals_differ(error) from error
    return records


def _internals_differ(error: AttributeError) -> NotImplementedError:
    return NotImplementedError(
        f"zero_copy on FSDP2 shards reads FSDP2's records of its parameters, which this torch {torch.__version__} "
        f"keeps differently ({error}). Use zero_copy=False"
    )


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
