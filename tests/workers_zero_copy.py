"""Rank-side bodies of the zero-copy tests: parameters re-pointed or replaced between syncs must be
averaged all the same (run through multiprocess.run_ranks on real gloo ranks)."""

import torch
import torch.distributed as dist
from accelerate import Accelerator
from rank_setup import init_group, snapshot

from localsgd_ext import LocalSGD, ParameterAverager


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same start on every rank
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _one_storage(params) -> bool:
    return len({p.untyped_storage().data_ptr() for p in params}) == 1


def repointed_tensors_are_flattened_again():
    """Each case moves a parameter off the flat buffer behind the averager's back, then averages with
    every rank adding its rank number: the mean must land in every parameter, flattened again."""
    init_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    shift = (world - 1) / 2
    model = _model()
    params = list(model.parameters())  # each Linear is one bucket
    averager = ParameterAverager(params, zero_copy=True)
    out = {"flat_bytes": averager.flat_bytes, "staging_bytes": averager.staging_bytes}

    # A manual `.data =` on one parameter.
    before = snapshot(params)
    model[0].weight.data = model[0].weight.data.clone() + rank
    averager.average()
    out["data_assigned"] = {
        "got": snapshot(params),
        "expected": [before[0] + shift] + before[1:],
        "one_storage": _one_storage(params[:2]),
    }

    # module.to(dtype): every parameter re-pointed to a float64 tensor.
    model.to(torch.float64)
    before = snapshot(params)
    with torch.no_grad():
        for p in params:
            p.add_(rank)
    averager.average()
    out["module_to"] = {
        "got": snapshot(params),
        "expected": [b + shift for b in before],
        "dtypes": [p.dtype for p in params],
        "one_storage": _one_storage(params[:2]),
    }

    # An in-place load_state_dict writes into the flat buffer itself: nothing to re-flatten.
    storage = params[0].untyped_storage().data_ptr()
    model.load_state_dict({k: torch.full_like(v, float(rank)) for k, v in model.state_dict().items()})
    averager.average()
    out["load_state_dict"] = {
        "got": snapshot(params),
        "expected": [torch.full_like(b, shift) for b in before],
        "storage_kept": params[0].untyped_storage().data_ptr() == storage,
    }
    dist.destroy_process_group()
    return out


def replaced_parameters_are_averaged():
    """`load_state_dict(assign=True)` replaces the Parameter objects: LocalSGD must average the new ones
    (and flatten them), not the old ones it flattened on enter."""
    accelerator = Accelerator(cpu=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, zero_copy=True)
    local_sgd._sync_and_avg_model_params()
    old = list(model.parameters())
    model.load_state_dict({k: torch.full_like(v, float(rank)) for k, v in model.state_dict().items()}, assign=True)
    new = list(model.parameters())
    local_sgd._sync_and_avg_model_params()
    return {
        "replaced": all(a is not b for a, b in zip(old, new)),
        "got": snapshot(new),
        "expected": [torch.full_like(p, (world - 1) / 2) for p in snapshot(new)],
        "one_storage": _one_storage(new[:2]),
    }


def staged_syncs_keep_the_parameters_flat(options: dict):
    """LocalSGD(zero_copy=True) with a sync that stages (a narrow or quantized wire, sync_delay): the
    parameters are views of one flat buffer per bucket after enter, stay so through the syncs, and a
    parameter re-pointed between syncs is flattened again before the next one; every sync still averages."""
    accelerator = Accelerator(cpu=True)
    rank = dist.get_rank()
    model = accelerator.prepare(_model())
    params = list(model.parameters())
    out = {}
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, zero_copy=True, **options) as local_sgd:
        out["flat_on_enter"] = _one_storage(params[:2])
        for _ in range(2):
            with torch.no_grad():
                for p in params:
                    p.add_(rank)
            local_sgd.step()
        out["flat_after_sync"] = _one_storage(params[:2])
        model.module[0].weight.data = model.module[0].weight.data.clone()
        out["off_the_buffer"] = not _one_storage(params[:2])
        for _ in range(2):
            local_sgd.step()
        out["flat_again"] = _one_storage(params[:2])
    out["final"] = snapshot(params)
    out["sync_count"] = local_sgd.sync_count
    return out
