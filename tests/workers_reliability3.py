"""Rank-side bodies of the Reliability III tests: the newer options (sync_delay, fragments, the quantized
wires, hierarchy, DiLoCo's exit) under local mistakes, overflow, changed parameters and disagreement.
Each case reproduces a crash, hang or silently wrong result found by trying the library as an
adversarial user; `local_mistakes` runs the cases that leave the group healthy one after another."""

import contextlib
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from rank_setup import group_timeout, init_group, press_ctrl_c_after, save_result_and_leave, snapshot

from localsgd_ext import LocalSGD, ParameterAverager, QuantizedAverager


def _accelerator() -> Accelerator:
    return Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())])


def _model(accelerator: Accelerator, module=None):
    torch.manual_seed(0)
    return accelerator.prepare(module or torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)))


def _error(call) -> str:
    """What `call()` raised, as "Type: message" (None if nothing)."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test reads the type and the message
        return f"{type(error).__name__}: {error}"
    return None


def _move_by_rank(model, rank: int, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * (rank + 1))


def _overlapped_misuse(rank: int) -> dict:
    out = {}
    averager = ParameterAverager([torch.full((10,), float(rank))])
    out["finish without start"] = _error(averager.finish_average)
    averager.start_average()
    out["start twice"] = _error(averager.start_average)
    averager.finish_average()
    out["float mean after misuse"] = averager.params[0].clone()
    quantized = QuantizedAverager([torch.full((10,), float(rank))])
    out["quantized finish without start"] = _error(quantized.finish_average)
    return out


def _load_state_dict_inside_with(accelerator, rank: int) -> dict:
    model = _model(accelerator)
    moves = torch.Generator().manual_seed(rank)
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, sync_delay=1) as local_sgd:
        saved = None
        for _ in range(4):
            _move_by_rank(model, rank, moves)
            local_sgd.step()
        saved = {"num_steps": 4, "sync_count": 0, "outer": None}
        error = _error(lambda: local_sgd.load_state_dict(saved))
        num_steps = local_sgd.num_steps
    return {"error": error, "num_steps_kept": num_steps == 4}


def _channels_last_quantized(rank: int) -> dict:
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    weight = conv.weight
    assert weight.requires_grad and not weight.is_contiguous()
    with torch.no_grad():
        weight.copy_(torch.full_like(weight, 1.0))
    averager = QuantizedAverager([weight, conv.bias])
    averager.average()  # the anchor, in float32
    with torch.no_grad():
        weight.add_(torch.linspace(-1, 1, weight.numel()).view(weight.shape) * (rank + 1))
    before = weight.detach().clone()
    error = _error(averager.average)
    return {"error": error, "before": before, "after": weight.detach().clone()}


def _double_after_anchor(rank: int) -> str:
    params = [torch.nn.Parameter(torch.full((6,), float(rank))), torch.nn.Parameter(torch.zeros(3))]
    averager = QuantizedAverager(params, names=["fc.weight", "fc.bias"])
    averager.average()
    params[1].data = params[1].data.double()
    return _error(averager.average)


def _overflowing_change(rank: int) -> dict:
    """Anchor -1.6e38 on both ranks; rank 0 moves to +1.9e38 (a change of 3.5e38, past float32's
    largest), rank 1 stays: the exact mean, 1.5e37, is finite, the change is not."""
    p = torch.full((5,), -1.6e38)
    averager = QuantizedAverager([p], names=["w"])
    averager.average()
    if rank == 0:
        p.fill_(1.9e38)
    before = p.clone()
    error = _error(averager.average)
    return {"error": error, "untouched": torch.equal(before, p)}


def _overflowing_sum(rank: int) -> torch.Tensor:
    """Changes of 2e38 and 2.5e38 from an anchor of 0: their sum overflows float32, their mean does not."""
    p = torch.zeros(5)
    averager = QuantizedAverager([p])
    averager.average()
    p.fill_(2e38 if rank == 0 else 2.5e38)
    averager.average()
    return p.clone()


def _resized_parameter_quantized(rank: int) -> dict:
    params = [torch.nn.Parameter(torch.full((4,), float(rank))), torch.nn.Parameter(torch.full((3,), 10.0 * rank))]
    averager = QuantizedAverager(params)
    averager.average()
    # Same objects, a new shape for the first: the next sync must re-plan, not pack with old offsets.
    params[0].data = torch.full((6,), float(rank + 1))
    averager.average()
    after_resize = snapshot(params)
    with torch.no_grad():
        params[0].add_(torch.arange(6.0) * (rank + 1))
        params[1].add_(rank)
    before = snapshot(params)
    averager.average()
    return {"after_resize": after_resize, "before": before, "after": snapshot(params)}


def _empty(accelerator) -> dict:
    out = {"quantized": _error(lambda: QuantizedAverager([]).average())}
    out["float"] = _error(lambda: ParameterAverager([]).average())

    class NoParameters(torch.nn.Module):
        """DDP refuses a module without parameters; Accelerate's LocalSGD needs only `no_sync()`."""

        def no_sync(self):
            return contextlib.nullcontext()

    def run():
        with LocalSGD(accelerator=accelerator, model=NoParameters(), local_sgd_steps=2) as local_sgd:
            for _ in range(3):
                local_sgd.step()
        return local_sgd.sync_count

    out["local_sgd"] = _error(run)
    return out


def _dtype_punned_view() -> str:
    weight = torch.nn.Parameter(torch.ones(8))
    punned = torch.nn.Parameter(weight.data.view(torch.bfloat16))
    return _error(lambda: ParameterAverager([weight, punned], names=["weight", "weight_as_bf16"]))


def _diloco_exit_after_a_sync(accelerator, rank: int, steps: int) -> dict:
    model = _model(accelerator)
    moves = torch.Generator().manual_seed(rank)
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, outer_optimizer="diloco") as local_sgd:
        for _ in range(steps):
            _move_by_rank(model, rank, moves)
            local_sgd.step()
        before_exit = snapshot(model.parameters())
        synced_last = local_sgd.last_step_synced
        anchors = snapshot(local_sgd._controller.outer.anchors)
    return {
        "synced_last": synced_last,
        "before_exit": before_exit,
        "after_exit": snapshot(model.parameters()),
        "anchors": anchors,
        "sync_count": local_sgd.sync_count,
    }


def _last_step_synced_quantized(accelerator, rank: int) -> dict:
    model = _model(accelerator)
    moves = torch.Generator().manual_seed(rank)
    flags, params = [], []
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, sync_delay=1, wire="int8") as local_sgd:
        for _ in range(5):
            _move_by_rank(model, rank, moves)
            local_sgd.step()
            flags.append(local_sgd.last_step_synced)
            params.append(snapshot(model.parameters()))
    return {"flags": flags, "params": params}


def _replaced_while_in_flight(accelerator, rank: int) -> dict:
    model = _model(accelerator)
    moves = torch.Generator().manual_seed(rank)
    error = None
    try:
        with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, sync_delay=1) as local_sgd:
            for step in range(1, 4):
                _move_by_rank(model, rank, moves)
                if step == 3:  # the average started at step 2 is in flight
                    state = {k: v.clone() for k, v in model.module.state_dict().items()}
                    model.module.load_state_dict(state, assign=True)
                local_sgd.step()
    except RuntimeError as e:
        error = str(e)
    return {"error": error}


def local_mistakes():
    """Every case that must end in a clear error (or a correct result) and leave the group usable."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    results = {"overlapped misuse": _overlapped_misuse(rank)}
    results["load_state_dict inside with"] = _load_state_dict_inside_with(accelerator, rank)
    results["channels_last int8"] = _channels_last_quantized(rank)
    results["double after anchor"] = _double_after_anchor(rank)
    results["wire on one rank"] = _error(
        lambda: LocalSGD(
            accelerator=accelerator, model=_model(accelerator), local_sgd_steps=2, wire="int8" if rank == 0 else None
        ).__enter__()
    )
    results["overflowing change"] = _overflowing_change(rank)
    results["overflowing sum"] = _overflowing_sum(rank)
    results["resized parameter"] = _resized_parameter_quantized(rank)
    results["empty"] = _empty(accelerator)
    results["dtype punned"] = _dtype_punned_view()
    results["diloco exit after a sync"] = _diloco_exit_after_a_sync(accelerator, rank, 4)
    results["diloco exit after progress"] = _diloco_exit_after_a_sync(accelerator, rank, 5)
    results["last_step_synced int8"] = _last_step_synced_quantized(accelerator, rank)
    results["replaced while in flight"] = _replaced_while_in_flight(accelerator, rank)
    return results


def hierarchy_disagreement_then_stall():
    """4 ranks. First `hierarchy` on rank 0 only: every rank must raise at enter, none wait in new_group.
    Then a hierarchy={2: 1} run in which rank 3 stalls before its first step: its pair partner (rank 2)
    must give up within the group's timeout at the first level average, not after torch's 30 minutes."""
    accelerator = _accelerator()
    rank = dist.get_rank()
    model = _model(accelerator)
    start = time.monotonic()
    hierarchy = {2: 1} if rank == 0 else None
    disagreement = _error(
        lambda: LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, hierarchy=hierarchy).__enter__()
    )
    disagreement_seconds = time.monotonic() - start
    result = {"disagreement": disagreement, "disagreement_seconds": disagreement_seconds}
    stall_error = None
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4, hierarchy={2: 1}) as local_sgd:
        if rank == 3:
            time.sleep(3600)  # killed by the test once the others are done
        start = time.monotonic()
        try:
            local_sgd.step()
            local_sgd.step()
        except RuntimeError as error:
            stall_error = str(error)
        result.update(stall_error=stall_error, stall_seconds=time.monotonic() - start)
        save_result_and_leave(result)


def interrupted_quantized_sync():
    """Rank 0 is blocked in a quantized all_to_all that rank 1 never joins; Ctrl-C (SIGINT) arrives after
    1 s and must raise KeyboardInterrupt within about 0.1 s of it, not at the group timeout."""
    init_group()
    rank = dist.get_rank()
    averager = QuantizedAverager([torch.full((4096,), float(rank))])
    averager.average()  # the anchor, on both ranks
    if rank == 1:
        time.sleep(3600)  # killed by the test once rank 0 is done
    averager.params[0].add_(1.0)
    press_ctrl_c_after(1.0)
    start = time.monotonic()
    try:
        averager.average()
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    result = {"interrupted": interrupted, "seconds": time.monotonic() - start}
    save_result_and_leave(result)
