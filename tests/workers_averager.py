"""Rank-side bodies of the ParameterAverager tests (run through multiprocess.run_ranks)."""

import os

import torch
import torch.distributed as dist
from rank_setup import group_timeout, init_group, snapshot

from localsgd_ext import ParameterAverager, QuantizedAverager


def _mixed_tensors(seed: int, device: str = "cpu"):
    """A parameter-like list: uneven sizes, empty and scalar tensors, one tensor larger than a 1 MiB cap,
    every float dtype, and a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    return [
        randn(37, 11),
        randn(0),
        randn(()),
        randn(600, 500),  # 1.1 MiB in fp32: bigger than a 1 MiB cap
        randn(129, dtype=torch.bfloat16),
        randn(5, 3, dtype=torch.float16),
        randn(1000, dtype=torch.float64),
        randn(9, 7).t(),  # non-contiguous
        randn(3, 0, 2, dtype=torch.bfloat16),
        randn(4097),
    ]


def average_mixed(bucket_cap_mb: float, syncs: int, device: str = "cpu"):
    """Averages the same mixed list with reduce_op 'avg' and 'sum', `syncs` times with local updates
    in between; returns what every sync left behind, plus whether the tensors kept their storage.
    On "cuda" the group is NCCL and the tensors live on this rank's GPU."""
    init_group(device)
    rank = dist.get_rank()
    out = {}
    for reduce_op in ("avg", "sum"):
        tensors = _mixed_tensors(seed=100 + rank, device=device)
        storages = [t.untyped_storage().data_ptr() for t in tensors]
        averager = ParameterAverager(tensors, bucket_cap_mb=bucket_cap_mb, reduce_op=reduce_op)
        before, after = [], []
        for sync in range(syncs):
            for t in tensors:  # a "local step" that differs per rank
                t.add_(rank + sync + 1, alpha=0.25)
            before.append(snapshot(tensors))
            averager.average()
            after.append(snapshot(tensors))
        out[reduce_op] = {
            "before": before,
            "after": after,
            "same_storage": storages == [t.untyped_storage().data_ptr() for t in tensors],
            "buckets": averager.buckets,
            "staging_bytes": averager.staging_bytes,
            "devices": [t.device.type for t in tensors],
        }
    return out


def average_after_repointing():
    """`param.data = new tensor` of another shape between syncs: the engine must re-plan, not skip it."""
    init_group()
    rank = dist.get_rank()
    params = [torch.nn.Parameter(torch.full((4, 4), float(rank))), torch.nn.Parameter(torch.full((3,), 10.0 * rank))]
    averager = ParameterAverager(params, bucket_cap_mb=1)
    averager.average()
    first = snapshot(params)
    params[0].data = torch.full((2, 5), float(rank + 1))
    params[1].data = torch.full((3,), 2.0 * rank, dtype=torch.float64)
    averager.average()
    return {"first": first, "second": snapshot(params), "dtypes": [p.dtype for p in params]}


def average_leaf_parameters_requiring_grad():
    """Parameters that require grad are averaged in place outside torch.no_grad(), and their version
    counter moves so autograd can detect the in-place change."""
    init_group()
    rank = dist.get_rank()
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(rank)
    versions = [p._version for p in model.parameters()]
    ParameterAverager(model.parameters()).average()
    return {
        "values": snapshot(model.parameters()),
        "versions_moved": [p._version > v for p, v in zip(model.parameters(), versions)],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def average_after_repointing_to_integers():
    """A tensor re-pointed to integer data since the last plan: the re-plan refuses it by name, on every
    rank, before any collective starts (so nothing hangs and nothing is half-averaged)."""
    init_group()
    rank = dist.get_rank()
    tensors = [torch.full((4,), float(rank)), torch.full((3,), float(rank))]
    averager = ParameterAverager(tensors)
    averager.average()
    tensors[1].data = torch.zeros(3, dtype=torch.int64)
    try:
        averager.average()
    except TypeError as error:
        return {"error": str(error), "untouched": snapshot(tensors)}
    return {"error": None}


def average_on_alternating_streams():
    """CUDA: syncs issued on a side stream and on the default stream in turn, with no host sync in
    between. Each must see the previous one's result (the engine orders its staging buffers across
    streams with events)."""
    init_group("cuda")
    tensors = [torch.randn(1000, 37, device="cuda"), torch.randn(5, device="cuda", dtype=torch.bfloat16)]
    averager = ParameterAverager(tensors, bucket_cap_mb=0.05, reduce_op="sum")
    side = torch.cuda.Stream()
    expected = snapshot(tensors)
    for round_index in range(6):
        stream = side if round_index % 2 == 0 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for t in tensors:
                t.add_(1)
            averager.average()
        torch.cuda.current_stream().wait_stream(stream)
        expected = [e + 1 for e in expected]
    return {"got": snapshot(tensors), "expected": expected}


def comm_dtype_sync_launches():
    """CUDA, NCCL at world size 1: 1000 float32 tensors in one bucket on a bfloat16 wire. The names of
    the kernels one sync launches, and the values before and after it."""
    init_group("cuda")
    tensors = [torch.randn(n, device="cuda") for n in range(1, 1001)]
    averager = ParameterAverager(tensors, comm_dtype=torch.bfloat16, bucket_cap_mb=1000)
    averager.average()  # warm-up: NCCL's communicator, the pinned pool
    for t in tensors:
        t.add_(torch.randn_like(t) / 3)  # full float32 precision again, for the wire to round
    before = snapshot(tensors)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        averager.average()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "emcpy" not in e.name]
    return {"kernels": kernels, "before": before, "after": snapshot(tensors)}


def _group_torch_did_not_create():
    """A gloo group built from a store by hand, as torchft builds its reconfigurable groups: no default
    group exists, and torch.distributed's group map does not know it."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, rank == 0, timeout=group_timeout())
    group = dist.ProcessGroup(store, rank, size)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    backend = dist.ProcessGroupGloo(store, rank, size, group_timeout())
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    return group


def average_over_a_group_torch_did_not_create():
    """The float and int8 wires and a disagreement's report over such a group."""
    group = _group_torch_did_not_create()
    rank = group.rank()
    floats = [torch.full((300,), float(rank)), torch.full((7,), 2.0 * rank)]
    ParameterAverager(floats, process_group=group).average()
    quantized = [torch.linspace(-1, 1, 5000)]  # the same on every rank: the anchor
    averager = QuantizedAverager(quantized, process_group=group, wire="int8")
    averager.rebase_anchor()
    quantized[0].add_(0.01 * (rank + 1))
    averager.average()
    try:
        ParameterAverager([torch.zeros(3 + rank)], process_group=group).average()
        mismatch = None
    except Exception as error:  # noqa: BLE001 - what every rank raises is the result
        mismatch = f"{type(error).__name__}: {error}"
    return {
        "floats": snapshot(floats),
        "quantized": snapshot(quantized),
        "mismatch": mismatch,
        "default_group": dist.is_initialized(),
    }
