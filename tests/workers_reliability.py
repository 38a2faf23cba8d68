"""Rank-side bodies of the reliability tests: ranks that disagree, hold NaN, raise, die or stall."""

import os
import signal
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from rank_setup import group_timeout, init_group, snapshot

from localsgd_ext import LocalSGD, ParameterAverager


def _params_for(rank: int, mismatch: str):
    """The same three tensors on every rank, except where `mismatch` makes this rank differ."""
    shapes = [(4, 3), (5,), (2, 2)]
    dtypes = [torch.float32, torch.float32, torch.float32]
    if mismatch == "shape" and rank == 1:
        shapes[1] = (6,)
    if mismatch == "dtype" and rank == 1:
        dtypes[2] = torch.bfloat16
    if mismatch == "count" and rank == 2:
        shapes.append((7,))
        dtypes.append(torch.float32)
    return [torch.full(shape, float(rank), dtype=dtype) for shape, dtype in zip(shapes, dtypes)]


def mismatched_layouts(mismatch: str):
    """Every rank calls average(); returns the error each got and whether its tensors stayed untouched."""
    init_group()
    rank = dist.get_rank()
    tensors = _params_for(rank, mismatch)
    names = [f"layer{i}.weight" for i in range(len(tensors))]
    before = snapshot(tensors)
    averager = ParameterAverager(tensors, names=names)
    start = time.monotonic()
    try:
        averager.average()
        error = None
    except RuntimeError as e:
        error = str(e)
    return {
        "error": error,
        "seconds": time.monotonic() - start,
        "untouched": all(torch.equal(a, b) for a, b in zip(before, snapshot(tensors))),
    }


def repointed_on_one_rank():
    """A first sync agrees; then rank 1 alone re-points a tensor to another shape (`.data = ...`): the
    next sync must raise on every rank rather than average mismatched buckets or hang."""
    init_group()
    rank = dist.get_rank()
    params = [torch.nn.Parameter(torch.full((4, 4), float(rank))), torch.nn.Parameter(torch.zeros(3))]
    averager = ParameterAverager(params)
    averager.average()
    if rank == 1:
        params[0].data = torch.zeros(2, 8)
    try:
        averager.average()
        return {"error": None}
    except RuntimeError as e:
        return {"error": str(e)}


def nonfinite_values(check_finite: bool):
    init_group()
    rank = dist.get_rank()
    tensors = [torch.full((3,), float(rank)), torch.full((4,), 1.0 + rank)]
    if rank == 1:
        tensors[1][2] = float("nan")
    before = snapshot(tensors)
    averager = ParameterAverager(tensors, names=["a", "b"], check_finite=check_finite)
    try:
        averager.average()
        error = None
    except RuntimeError as e:
        error = str(e)
    untouched = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, snapshot(tensors)))
    return {"error": error, "untouched": untouched, "after": snapshot(tensors)}


def _accelerator() -> Accelerator:
    return Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])


def exception_inside_with():
    """Every rank raises inside the `with` block: the exception propagates, no final average happens
    (the ranks keep their own parameters) and gradient sync is switched back on."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=100)
    raised = None
    try:
        with local_sgd:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(rank)
            local_sgd.step()
            raise KeyError("a bug in the training loop")
    except KeyError as e:
        raised = str(e)
    return {
        "raised": raised,
        "sync_count": local_sgd.sync_count,
        "grad_sync_back_on": model.require_backward_grad_sync,
        "weight": snapshot([model.module.weight])[0],
    }


def lost_rank(how: str, lost: int):
    """Three ranks train with LocalSGD (K=2). Rank `lost` dies (SIGKILL) or stalls (sleeps) before the
    second sync; the others must raise a clear error within the group's timeout."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    started = None
    try:
        with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2) as local_sgd:
            for step in range(6):
                if step == 3 and rank == lost:
                    if how == "dies":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(3600)  # stalls: never reaches the next collective
                loss = model(torch.randn(4, 8)).pow(2).mean()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                started = time.monotonic()
                local_sgd.step()
        return {"error": None}
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.monotonic() - started, "timeout": group_timeout().total_seconds()}
