"""Helpers used inside rank processes."""

import datetime
import os
import signal
import threading

import torch
import torch.distributed as dist


def group_timeout() -> datetime.timedelta:
    """How long a collective may wait here before failing (set by multiprocess.run_ranks)."""
    return datetime.timedelta(seconds=int(os.environ.get("LOCALSGD_TEST_GROUP_TIMEOUT", "30")))


def init_group(device: str = "cpu") -> None:
    """gloo for CPU tensors; NCCL on this rank's GPU for CUDA tensors."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=group_timeout())
    else:
        dist.init_process_group("gloo", timeout=group_timeout())


def snapshot(tensors):
    """Copies on the CPU (what a rank returns must load in the parent)."""
    return [t.detach().to("cpu", copy=True) for t in tensors]


def step_with_rank_moves(model, local_sgd, steps: int, moves):
    """Each step, moves every parameter by this rank's own random amounts (no optimizer: the values tell
    what was averaged when), then calls `local_sgd.step()`. Returns the parameters before and after each
    `step()`."""
    before, after = [], []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=moves))
        before.append(snapshot(model.parameters()))
        local_sgd.step()
        after.append(snapshot(model.parameters()))
    return before, after


def save_result_and_leave(result) -> None:
    """For a rank whose group is broken on purpose (a peer stalled or never joined): saves what it returns,
    as rank_main would, and exits at once, without the teardown that would wait for the lost peer."""
    torch.save(result, os.path.join(os.environ["LOCALSGD_TEST_OUT_DIR"], f"rank{dist.get_rank()}.pt"))
    os._exit(0)


def press_ctrl_c_after(seconds: float) -> None:
    """SIGINT to this process after `seconds`, raised as KeyboardInterrupt. Python's handler is installed
    first: a process started in the background by a shell without job control (`cmd &` in a script)
    inherits SIGINT ignored, and the signal would then do nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT)).start()
