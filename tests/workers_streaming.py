"""Rank-side bodies of the overlapped-sync tests (sync_delay): the merge formula on the engine, and a real
LocalSGD training with averages in flight while it trains."""

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from rank_setup import group_timeout, init_group, snapshot, step_with_rank_moves

from localsgd_ext import LocalSGD, ParameterAverager, QuantizedAverager


def delayed_merge():
    """Start an average, keep training locally (add a rank-specific delta), then merge: each rank must
    hold its own progress plus the averaged correction, mean(snapshot) - snapshot."""
    init_group()
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(300, generator=generator), torch.randn(5, 7, generator=generator).bfloat16()]
    averager = ParameterAverager(tensors)
    snapshots = snapshot(tensors)
    averager.start_average()
    pending = averager.average_pending
    deltas = [torch.randn(t.shape, generator=generator).to(t.dtype) for t in tensors]
    for t, delta in zip(tensors, deltas):
        t.add_(delta)
    progressed = snapshot(tensors)
    averager.finish_average()
    return {
        "snapshots": snapshots,
        "progressed": progressed,
        "merged": snapshot(tensors),
        "pending": pending,
        "pending_after": averager.average_pending,
    }


def delayed_merge_with_outer_step(comm_dtype_name: str, magnitude: float = 1.0):
    """The float wire's overlapped sync with an outer step (Streaming DiLoCo on fp32, bf16 or fp16): a
    stand-in outer step that is easy to check halves the mean of the snapshots; each rank must then hold
    its own progress plus `result - snapshot`. `magnitude` scales the values (past fp16's range)."""
    init_group()
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(300, generator=generator) * magnitude, torch.randn(5, 7, generator=generator) * magnitude]
    comm_dtype = None if comm_dtype_name == "fp32" else getattr(torch, comm_dtype_name)
    averager = ParameterAverager(tensors, comm_dtype=comm_dtype)
    snapshots = snapshot(tensors)
    averager.start_average()
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=generator))
    progressed = snapshot(tensors)
    means = []

    def outer_step(averaged):
        means.extend(snapshot(averaged))
        for m in averaged:
            m.mul_(0.5)

    averager.finish_average(outer_step=outer_step)
    return {
        "snapshots": snapshots,
        "progressed": progressed,
        "means": means,
        "merged": snapshot(tensors),
        "pending_after": averager.average_pending,
    }


def quantized_pieces_agree(wire: str, overlapped: bool):
    """The same tensors averaged over the quantized wire in one piece and in many (bucket_cap_mb tiny):
    the results must be the same bits, waited for or overlapped."""
    init_group()
    rank = dist.get_rank()
    results = []
    # One piece; pieces of 1024 elements (2 ranks x 512-element blocks); pieces of 2048, the last of 1024
    # (a waited sync's slots then take a shorter piece).
    for bucket_cap_mb in (25, 0.004, 8192 / 2**20):
        generator = torch.Generator().manual_seed(rank)
        tensors = [torch.randn(3000, generator=generator), torch.randn(40, 30, generator=generator)]
        averager = QuantizedAverager(tensors, wire=wire, block_size=512, error_feedback=True, bucket_cap_mb=bucket_cap_mb)
        averager.average()
        for _ in range(2):
            for t in tensors:
                t.add_(torch.randn(t.shape, generator=generator) * (rank + 1))
            if overlapped:
                averager.start_average()
                averager.advance_average()
                averager.finish_average()
            else:
                averager.average()
        results.append(
            {
                "tensors": snapshot(tensors),
                "pieces": len(averager._anchored.pieces),
                "residual": averager._anchored.residual.clone(),
            }
        )
    return results


def streaming_training(sync_delay: int, options: dict = None):
    """A linear regression trained with LocalSGD(local_sgd_steps=4, sync_delay=..., **options): losses,
    after each step the sync count, `last_step_synced` and the parameters, and the parameters after the
    exit sync."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    torch.manual_seed(0)
    true_weight = torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = torch.Generator().manual_seed(10 + rank)
    losses, counts, synced, params = [], [], [], []
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, sync_delay=sync_delay, **(options or {})) as local_sgd:
        for _ in range(60):
            x = torch.randn(16, 8, generator=data)
            loss = (model(x) - x @ true_weight).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            local_sgd.step()
            losses.append(loss.item())
            counts.append(local_sgd.sync_count)
            synced.append(local_sgd.last_step_synced)
            params.append(snapshot(model.parameters()))
    return {
        "losses": losses,
        "counts": counts,
        "synced": synced,
        "steps": params,
        "sync_count": local_sgd.sync_count,
        "params": snapshot(model.parameters()),
    }


def fragment_syncs(local_sgd_steps: int, num_fragments: int, steps: int):
    """LocalSGD(local_sgd_steps=..., num_fragments=...) over a 3-layer model whose parameters each rank
    moves by its own amounts at every step (no optimizer: the values tell what was averaged when).
    Returns each step's parameters before and after `step()`, and where each fragment starts."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)))
    moves = torch.Generator().manual_seed(100 + rank)
    with LocalSGD(
        accelerator=accelerator, model=model, local_sgd_steps=local_sgd_steps, num_fragments=num_fragments
    ) as local_sgd:
        before, after = step_with_rank_moves(model, local_sgd, steps, moves)
        fragment_starts = list(local_sgd._controller.fragment_starts)
    return {"before": before, "after": after, "fragment_starts": fragment_starts, "final": snapshot(model.parameters())}


def quantized_average(wire: str, error_feedback: bool, overlapped: bool, halve_in_outer_step: bool = False):
    """Two syncs of a QuantizedAverager: the first (float32) sets the anchor; then each rank moves its
    tensors by its own delta and the second sync averages the deltas over the int8 or fp8 wire (waited
    for, or started and finished with the tensors moved again in between)."""
    init_group()
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(3000, generator=generator), torch.randn(40, 30, generator=generator)]
    averager = QuantizedAverager(tensors, wire=wire, block_size=256, error_feedback=error_feedback)
    averager.average()
    anchor = snapshot(tensors)
    # Deltas of very different sizes, so that blocks get very different scales.
    deltas = [torch.randn(t.shape, generator=generator) * (10.0 ** (rank - 1)) for t in tensors]
    for t, delta in zip(tensors, deltas):
        t.add_(delta)
    later = [torch.randn(t.shape, generator=generator) for t in tensors]
    if overlapped:
        averager.start_average()
        for t, move in zip(tensors, later):
            t.add_(move)
        averager.advance_average()  # the all_gather goes on the wire before the merge
        # A stand-in outer step that is easy to check: it halves the mean of the snapshots.
        outer_step = (lambda means: [m.mul_(0.5) for m in means]) if halve_in_outer_step else None
        averager.finish_average(outer_step=outer_step)
    else:
        averager.average()
    anchored = averager._anchored
    residual = None if anchored is None or anchored.residual is None else anchored.residual.clone()
    return {
        "anchor": anchor,
        "deltas": deltas,
        "later": later if overlapped else None,
        "result": snapshot(tensors),
        "new_anchor": None if anchored is None else anchored.anchor.clone(),
        "wire_bytes": averager.last_wire_bytes,
        "residual": residual,
    }


def mixed_dtypes_on_the_quantized_wire(options: dict):
    """LocalSGD(wire="int8") over a model with float32 and bfloat16 layers: the float32 parameters travel
    quantized, the bfloat16 ones on the float wire. Each step's parameters before and after step(), the
    final ones, and the counts."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    model = accelerator.prepare(module)
    moves = torch.Generator().manual_seed(300 + rank)
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, wire="int8", **options) as local_sgd:
        before, after = step_with_rank_moves(model, local_sgd, 4, moves)
        parts = [type(part).__name__ for _, part in local_sgd._controller.averagers[0].parts]
    return {
        "before": before,
        "after": after,
        "final": snapshot(model.parameters()),
        "parts": parts,
        "sync_count": local_sgd.sync_count,
    }
