"""One LocalSGD sync per wire and layout, through the public API only (`LocalSGD(...).step()` with
local_sgd_steps=1, on DDP models prepared by Accelerate), against one flat all_reduce of the model's bytes.

    torchrun --standalone --nproc-per-node 2 bench/wires_public_api.py --shapes wide tiny --rounds 11

Only the public API, so the same script measures an older checkout too (PYTHONPATH=that checkout, with its
compiled module built in place): run them alternately and compare each run's ratios to its own floor.
Methods run interleaved within every round, each after a barrier; a method's time in a round is the
slowest rank's; the table gives medians over rounds. "extra MiB": the rise of the process's peak resident
memory over entering the block and the first (cold) sync (anchors, staging, flat buffers; max over ranks).
A configuration the checkout refuses is listed as refused.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from averaging_latency import PeakMemory, slowest_rank, timed  # noqa: E402
from models import SHAPES  # noqa: E402

import localsgd_ext  # noqa: E402
from localsgd_ext import LocalSGD  # noqa: E402

FLOOR = "flat all_reduce (floor)"
CONFIGS = {
    "fp32": {},
    "fp32 zero-copy": {"zero_copy": True},
    "bf16": {"wire": "bf16"},
    "int8": {"wire": "int8"},
    "fp8": {"wire": "fp8"},
    "int8 error feedback": {"wire": "int8", "error_feedback": True},
    "bf16 zero-copy": {"wire": "bf16", "zero_copy": True},
    "int8 zero-copy": {"wire": "int8", "zero_copy": True},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=["wide", "tiny", "transformer"], default=["wide", "tiny"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", default=None, help="JSON file for the results (rank 0 writes it)")
    return parser.parse_args()


def bench_shape(name, args, accelerator, memory):
    torch.manual_seed(0)
    base = SHAPES[name](smoke=False)
    nbytes = sum(p.numel() * p.element_size() for p in base.parameters())
    flat = torch.randn(nbytes // 4)
    steps, extra, refused, blocks = {}, {}, {}, []
    for config in args.configs:
        model = accelerator.prepare(copy.deepcopy(base))
        try:
            local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, **CONFIGS[config])
        except (ValueError, NotImplementedError) as error:
            refused[config] = f"{type(error).__name__}: {error}"
            continue
        blocks.append(local_sgd)

        def enter_and_first_sync(local_sgd=local_sgd):
            local_sgd.__enter__()
            local_sgd.step()

        measured = memory.extra_bytes(enter_and_first_sync)
        extra[config] = None if measured is None else slowest_rank(float(measured))
        steps[config] = local_sgd.step
    methods = dict(steps)
    methods[FLOOR] = lambda: dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    samples = {m: [] for m in methods}
    for round_index in range(args.warmup + args.rounds):
        for method, fn in methods.items():
            seconds = timed(fn, "cpu")
            if round_index >= args.warmup:
                samples[method].append(seconds)
    for local_sgd in blocks:
        local_sgd.__exit__(None, None, None)
    medians = {m: statistics.median(s) for m, s in samples.items()}
    return {
        "shape": name,
        "tensors": len(list(base.parameters())),
        "bytes": nbytes,
        "refused": refused,
        "methods": {
            m: {
                "median_ms": 1e3 * medians[m],
                "x_floor": medians[m] / medians[FLOOR],
                "peak_extra_bytes": extra.get(m),
                "samples_ms": [1e3 * s for s in samples[m]],
            }
            for m in methods
        },
    }


def main():
    from accelerate import Accelerator

    args = parse_args()
    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes < 2:
        raise SystemExit("run under torchrun with --nproc-per-node 2 or more")
    results = [bench_shape(name, args, accelerator, PeakMemory()) for name in args.shapes]
    if accelerator.is_main_process:
        print(
            f"\nlocalsgd_ext from {os.path.dirname(localsgd_ext.__file__)}; {accelerator.num_processes} ranks, gloo, "
            f"{torch.get_num_threads()} thread(s)/rank, median of {args.rounds} rounds (slowest rank)"
        )
        print(f"{'shape':<8}{'MiB':>7}  {'method':<26}{'median ms':>10}{'x floor':>9}{'extra MiB':>11}")
        for r in results:
            for method, m in r["methods"].items():
                extra_mib = "" if m["peak_extra_bytes"] is None else f"{m['peak_extra_bytes'] / 2**20:.0f}"
                print(
                    f"{r['shape']:<8}{r['bytes'] / 2**20:>7.1f}  {method:<26}{m['median_ms']:>10.2f}"
                    f"{m['x_floor']:>9.2f}{extra_mib:>11}"
                )
            for config, reason in r["refused"].items():
                print(f"{r['shape']:<8}{'':>7}  {config:<26} refused: {reason[:90]}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world_size": accelerator.num_processes, "results": results}, f, indent=1)
    dist.barrier()
    accelerator.end_training()


if __name__ == "__main__":
    main()
