"""Streaming DiLoCo, ours against torchft 0.2.0's `DiLoCo` (the reference implementation), step by step.

Every rank trains two copies of the same model on the same batches with the same inner optimizer: one under
torchft's `DiLoCo` (its own code for the timing, the pseudo-gradients, the outer step and the merge), one
under our `LocalSGD(merge=..., fragment_update_alpha=...)`, and records the largest difference between the
two after every step. torchft's `Manager` is replaced by `HealthyQuorum`, which does what a Manager does for
a fixed quorum of every rank: `allreduce` sums over the group and divides by the number of participants
(as `Manager.allreduce` does), `should_commit` says yes and counts the step. Fragments: the model's two
Linear layers, of equal bytes (ours splits the parameters into the same two groups). torchft has no
"no outer optimizer": it is compared as outer SGD with lr 1 against our plain averaging.

    pip install torchft==0.2.0 opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 bench/streaming_vs_torchft.py \\
        --out bench/results/streaming_vs_torchft.json
"""

import argparse
import functools
import itertools
import json
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torchft.local_sgd import DiLoCo
from torchft.work import _DummyWork

from localsgd_ext import LocalSGD

STEPS = 24
SYNC_EVERY = 4


class HealthyQuorum:
    """The part of torchft's Manager that DiLoCo uses, for a quorum of every rank that never changes."""

    _use_async_quorum = False

    def __init__(self):
        self._step = 0

    def start_quorum(self):
        pass

    def current_step(self):
        return self._step

    def should_commit(self):
        self._step += 1
        return True

    def allreduce(self, tensor, should_quantize=False):
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
        return _DummyWork(tensor)

    def allow_state_dict_read(self):
        pass

    def disallow_state_dict_read(self):
        pass

    def register_state_dict_fn(self, *args):
        pass


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


def batch(rank, step):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)


def inner_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def train(model, optimizer, rank, after_step):
    states = []
    for step in range(1, STEPS + 1):
        x, y = batch(rank, step)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step()
        states.append([p.detach().clone() for p in model.parameters()])
    return states


def run_torchft(rank, fragments, delay, alpha, outer):
    model = build_model()
    optimizer = inner_optimizer(model.parameters())
    pieces = [model[0], model[2]] if fragments == 2 else [model]
    # One outer optimizer per fragment, as torchft asks; without ours, outer SGD with lr 1 is plain averaging.
    settings = dict(lr=0.7, momentum=0.9, nesterov=True) if outer else dict(lr=1.0)
    outer_optimizers = [torch.optim.SGD(piece.parameters(), **settings) for piece in pieces]
    with DiLoCo(
        HealthyQuorum(),
        pieces,
        optimizer,
        outer_optimizers,
        sync_every=SYNC_EVERY,
        fragment_sync_delay=delay,
        fragment_update_alpha=alpha,
    ):
        return train(model, optimizer, rank, lambda: None)


def run_ours(accelerator, rank, fragments, delay, alpha, outer, merge):
    model = accelerator.prepare(build_model())
    optimizer = inner_optimizer(model.parameters())
    outer_optimizer = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True) if outer else None
    local_sgd = LocalSGD(
        accelerator=accelerator,
        model=model,
        local_sgd_steps=SYNC_EVERY,
        num_fragments=fragments,
        sync_delay=delay,
        outer_optimizer=outer_optimizer,
        merge=merge,
        fragment_update_alpha=alpha if merge == "streaming" else 0.0,
    )
    with local_sgd:
        # No exit sync recorded: torchft has none, the states are taken after every step.
        return train(model, optimizer, rank, local_sgd.step)


def largest_gap(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    rank = dist.get_rank()
    rows = []
    for fragments, delay, alpha, outer in itertools.product((1, 2), (0, 1), (0.0, 0.5, 1.0), (False, True)):
        reference = run_torchft(rank, fragments, delay, alpha, outer)
        row = {"fragments": fragments, "sync_delay": delay, "alpha": alpha, "outer": outer}
        for merge in ("streaming", "eager"):
            if merge == "eager" and alpha != 0.0:
                continue
            ours = run_ours(accelerator, rank, fragments, delay, alpha, outer, merge)
            gap = torch.tensor([max(largest_gap(a, b) for a, b in zip(ours, reference))])
            dist.all_reduce(gap, op=dist.ReduceOp.MAX)
            row[merge] = float(gap)
        rows.append(row)
        if rank == 0:
            eager = f"{row['eager']:.2e}" if "eager" in row else "-"
            print(
                f"P={fragments} tau={delay} alpha={alpha} outer={'diloco' if outer else 'none (torchft: SGD lr 1)'}: "
                f"largest gap over {STEPS} steps, streaming {row['streaming']:.2e}, eager {eager}",
                flush=True,
            )
    if rank == 0 and args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"steps": STEPS, "sync_every": SYNC_EVERY, "world_size": dist.get_world_size(), "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
