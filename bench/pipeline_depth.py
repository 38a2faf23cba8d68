"""Copy mode's pipeline depth: the engine with 1, 2 and 3 staging buffers in flight, and zero-copy mode,
against one flat all_reduce of the same bytes (AVG, the floor, and SUM). Run under torchrun:

    torchrun --standalone --nproc-per-node 2 bench/pipeline_depth.py --shape wide --rounds 15

Each figure is the median over rounds of the slowest rank's time; all variants interleaved per round.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import SHAPES  # noqa: E402

from localsgd_ext import _C  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="wide")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--bucket-cap-mb", type=float, default=25)
    parser.add_argument("--smoke", action="store_true", help="miniature shape, for the smoke test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group, cpu = dist.group.WORLD, torch.device("cpu")
    cap = int(args.bucket_cap_mb * 2**20)
    model = SHAPES[args.shape](smoke=args.smoke)
    params = list(model.parameters())
    variants = {}
    for depth in (1, 2, 3):
        engine = _C.BucketedAverager(params, cap, depth, False)
        # use_avg_op=False on gloo: SUM, with the division fused into the unpack (what "auto" picks).
        variants[f"copy, {depth} in flight"] = lambda e=engine: e.average(group, False, cpu, False)
    zero_copy = _C.BucketedAverager(list(copy.deepcopy(model).parameters()), cap, 1, True)
    variants["zero-copy"] = lambda: zero_copy.average(group, True, cpu, False)
    flat = torch.randn(sum(p.numel() for p in params))
    variants["flat all_reduce AVG (floor)"] = lambda: dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    variants["flat all_reduce SUM"] = lambda: dist.all_reduce(flat)

    samples = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, fn in variants.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_index:
                samples[name].append(elapsed.item())
    if dist.get_rank() == 0:
        floor = statistics.median(samples["flat all_reduce AVG (floor)"])
        print(f"{args.shape}, {dist.get_world_size()} ranks, median of {args.rounds} rounds (slowest rank)")
        for name, values in samples.items():
            median = statistics.median(values)
            print(f"  {name:<30}{1e3 * median:>9.2f} ms{median / floor:>7.2f}x floor")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
