"""Rank-side bodies of the Reliability II tests: ranks that disagree on settings, buffers, names or
starting values, ranks that fail locally, narrow wires at their limits, nesting, and Ctrl-C. Each case
reproduces a crash, hang or silently wrong result found by trying the library as an adversarial user."""

import os
import resource
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from rank_setup import group_timeout, init_group, press_ctrl_c_after, save_result_and_leave, snapshot

from localsgd_ext import LocalSGD, ParameterAverager, RanksDisagreeError


def _accelerator() -> Accelerator:
    # broadcast_buffers=False: DDP would otherwise copy rank 0's buffers at every forward.
    return Accelerator(
        cpu=True,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout()), DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def _model(accelerator: Accelerator):
    torch.manual_seed(0)
    return accelerator.prepare(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)))


def _outcome(error, tensors_before, tensors_after) -> dict:
    return {
        "error": None if error is None else str(error),
        "type": None if error is None else type(error).__name__,
        "untouched": all(torch.equal(a, b) for a, b in zip(tensors_before, tensors_after)),
    }


# option, value on rank 0, value on rank 1: each must be refused on both ranks at enter.
SETTING_CASES = [
    ("bucket_cap_mb", 25, 0.00005),
    ("comm_dtype", None, torch.bfloat16),
    ("zero_copy", False, True),
    ("check_finite", False, True),
    ("sync_buffers", False, True),
    ("outer_optimizer", None, "diloco"),
    ("local_sgd_steps", 4, 8),
    ("warmup_steps", 0, 2),
]


def settings_disagree():
    """For each option, LocalSGD with rank 0 and rank 1 configured differently; then the engine alone
    (ParameterAverager) with different bucket caps, which used to abort a rank inside gloo."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    model = _model(accelerator)
    results = {}
    for option, *values in SETTING_CASES:
        kwargs = {"local_sgd_steps": 4, option: values[rank]}
        before = snapshot(model.parameters())
        error = None
        try:
            with LocalSGD(accelerator=accelerator, model=model, **kwargs) as local_sgd:
                local_sgd.step()
        except RanksDisagreeError as e:
            error = e
        results[option] = _outcome(error, before, snapshot(model.parameters()))
    tensors = [torch.full((1000,), float(rank)), torch.full((10,), float(rank))]
    before = snapshot(tensors)
    error = None
    try:
        ParameterAverager(tensors, bucket_cap_mb=(25, 0.00005)[rank]).average()
    except RanksDisagreeError as e:
        error = e
    results["engine bucket_cap_mb"] = _outcome(error, before, snapshot(tensors))
    return results


class WithBuffer(torch.nn.Module):
    def __init__(self, counts: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.register_buffer("counts", counts)


def integer_buffers_of_different_shapes(rank0_bigger: bool):
    """sync_buffers=True with an integer buffer shaped differently per rank: used to abort one rank (rank
    0 bigger) or silently mix the values (rank 0 smaller)."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    size = 5 if (rank == 0) == rank0_bigger else 3
    model = accelerator.prepare(WithBuffer(torch.arange(10, 10 + size)))
    error = None
    try:
        with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, sync_buffers=True) as local_sgd:
            local_sgd.step()
    except RanksDisagreeError as e:
        error = e
    return {"error": str(error) if error else None, "counts": accelerator.unwrap_model(model).counts.clone()}


class Rotary(torch.nn.Module):
    """A rotary embedding's complex table (identical on every rank) and a complex buffer that differs."""

    def __init__(self, rank: int):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        angles = torch.outer(torch.arange(6.0), 1.0 / (10000 ** (torch.arange(0, 4, 2.0) / 4)))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))
        self.register_buffer("phase", torch.full((3,), complex(1.0 + rank, -2.0 * (1 + rank)), dtype=torch.complex64))


def complex_buffers():
    accelerator = _accelerator()
    rank = dist.get_rank()
    model = accelerator.prepare(Rotary(rank))
    inner = accelerator.unwrap_model(model)
    freqs_before = inner.freqs_cis.clone()
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, sync_buffers=True) as local_sgd:
        local_sgd.step()
    return {"freqs_before": freqs_before, "freqs_after": inner.freqs_cis.clone(), "phase": inner.phase.clone()}


def fp16_wire(check_finite: bool):
    """comm_dtype=float16 at its limits: values whose sum overflows fp16, values below fp16's smallest
    subnormal, and ordinary values (whose result must keep the unscaled computation's bits)."""
    init_group()
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    ordinary = (torch.rand(1000, generator=generator) * 3.5 + 0.5) * torch.where(
        torch.rand(1000, generator=generator) < 0.5, -1.0, 1.0
    )
    cases = {
        "large": torch.full((7,), 40000.0 + 1000.0 * rank),
        "tiny": torch.full((5,), 1e-8 * (1 + rank)),
        "ordinary": ordinary,
    }
    results = {"inputs": {name: t.clone() for name, t in cases.items()}}
    for name, tensor in cases.items():
        ParameterAverager([tensor], comm_dtype=torch.float16, check_finite=check_finite).average()
        results[name] = tensor.clone()
    return results


class TwoParameters(torch.nn.Module):
    def __init__(self, order):
        super().__init__()
        for name in order:
            self.register_parameter(name, torch.nn.Parameter(torch.full((3,), float(len(name)))))


def names_in_different_order():
    accelerator = _accelerator()
    rank = dist.get_rank()
    model = accelerator.prepare(TwoParameters(("alpha", "beta") if rank == 0 else ("beta", "alpha")))
    before = snapshot(model.parameters())
    error = None
    try:
        with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1) as local_sgd:
            local_sgd.step()
    except RanksDisagreeError as e:
        error = e
    return _outcome(error, before, snapshot(model.parameters()))


def diloco_unequal_start():
    """DiLoCo needs equal parameters at enter: rank 1 changes one after DDP made them equal."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    model = _model(accelerator)
    if rank == 1:
        with torch.no_grad():
            model.module[2].bias[1] += 1e-3
    error = None
    try:
        with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, outer_optimizer="diloco") as local_sgd:
            local_sgd.step()
    except RanksDisagreeError as e:
        error = e
    return {"error": str(error) if error else None}


def nested_with():
    accelerator = _accelerator()
    model = _model(accelerator)
    local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=100)
    with local_sgd:
        try:
            with local_sgd:
                pass
            error = None
        except RuntimeError as e:
            error = str(e)
        grad_sync_inside = model.require_backward_grad_sync
        local_sgd.step()
    return {
        "error": error,
        "grad_sync_inside": grad_sync_inside,
        "grad_sync_after": model.require_backward_grad_sync,
        "sync_count": local_sgd.sync_count,
    }


def _break_locally(model, kind: str) -> None:
    inner = model.module
    if kind == "freed storage":
        inner[0].weight.untyped_storage().resize_(0)
    elif kind == "expanded data":
        inner[0].weight.data = torch.zeros(1, 1).expand(16, 8)
    elif kind == "expanded parameter":
        inner[0].weight = torch.nn.Parameter(torch.zeros(1, 1).expand(16, 8))
    elif kind == "allocation failure":
        # Staging is allocated at the first sync: leave too little address space for it.
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 64 * 2**20, resource.RLIM_INFINITY))
    else:
        raise ValueError(kind)


def local_failure(kind: str):
    """Rank 1 breaks something of its own before a sync: it must raise its own error, rank 0 a
    RanksDisagreeError naming rank 1 (at once, not at the group timeout), and nothing be averaged."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    model = _model(accelerator)
    wide = torch.nn.Parameter(torch.zeros(40 * 2**20 // 4)) if kind == "allocation failure" else None
    if wide is not None:
        model.module.register_parameter("wide", wide)  # a 40 MiB bucket to stage
    local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1)
    error = None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rank)
    before = snapshot(p for name, p in model.module.named_parameters() if name != "0.weight")
    start = time.monotonic()
    try:
        with local_sgd:
            if rank == 1:
                _break_locally(model, kind)
            local_sgd.step()
    except Exception as e:
        error = e
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    outcome = _outcome(error, before, snapshot(p for name, p in model.module.named_parameters() if name != "0.weight"))
    outcome["seconds"] = time.monotonic() - start
    return outcome


def interrupted_sync():
    """Rank 0 is blocked in a sync that rank 1 never joins; Ctrl-C (SIGINT) arrives after 1 s. It must
    raise KeyboardInterrupt promptly, not at the group timeout; the averager then refuses to be used."""
    init_group()
    rank = dist.get_rank()
    if rank == 1:
        time.sleep(3600)  # killed by the test once rank 0 is done
    averager = ParameterAverager([torch.zeros(1000)])
    press_ctrl_c_after(1.0)
    start = time.monotonic()
    try:
        averager.average()
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.monotonic() - start
    try:
        averager.average()
        reuse_error = None
    except RuntimeError as e:
        reuse_error = str(e)
    result = {"interrupted": interrupted, "seconds": seconds, "reuse_error": reuse_error}
    # The collective left in flight would hold up the group's teardown until its timeout: leave now.
    save_result_and_leave(result)
