"""Rank-side bodies of the hierarchical-averaging tests."""

import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from rank_setup import group_timeout, snapshot, step_with_rank_moves

from localsgd_ext import LocalSGD


def hierarchical_syncs(local_sgd_steps: int, hierarchy: dict, steps: int, options: dict = None):
    """LocalSGD with `hierarchy` (and `options`) over a small model whose parameters each rank moves by its
    own amounts at every step (no optimizer): each step's parameters before and after `step()`, and the
    counts."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)))
    moves = torch.Generator().manual_seed(200 + rank)
    levels = {int(size): period for size, period in hierarchy.items()}  # JSON keys arrive as strings
    options = dict(options or {})
    with LocalSGD(
        accelerator=accelerator, model=model, local_sgd_steps=local_sgd_steps, hierarchy=levels, **options
    ) as local_sgd:
        before, after = step_with_rank_moves(model, local_sgd, steps, moves)
    return {
        "before": before,
        "after": after,
        "final": snapshot(model.parameters()),
        "sync_count": local_sgd.sync_count,
        "level_sync_counts": local_sgd.level_sync_counts,
    }


def hierarchy_that_does_not_fit():
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    try:
        with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, hierarchy={3: 2}):
            pass
    except ValueError as error:
        return str(error)
    return None


def hierarchy_refused_on_one_rank():
    """Rank 3's first weight is an expanded tensor, which the engine refuses while planning: entering
    LocalSGD with a hierarchy must raise on every rank at once (rank 3's own error, the others naming
    it), not leave them waiting in a level's check until the timeout."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)))
    if dist.get_rank() == 3:
        model.module[0].weight.data = torch.zeros(1).expand(4, 5)
    start = time.monotonic()
    try:
        with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, hierarchy={2: 2}):
            pass
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}
