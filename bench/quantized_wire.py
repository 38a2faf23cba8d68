"""The quantized wire's sync against one flat float32 all_reduce of the same model, in one piece and in
pieces of a bucket (`bucket_cap_mb`, whose exchanges overlap: one piece is averaged and re-quantized
while the next ones are on the wire), interleaved within every round.

    torchrun --standalone --nproc-per-node 2 bench/quantized_wire.py                 # wide: 200 tensors, 26M fp32
    torchrun --standalone --nproc-per-node 2 bench/quantized_wire.py --shape tiny --wire fp8

Each method's time in a round is this rank's after a barrier; rank 0 prints medians and the ratio to the
floor (the flat all_reduce)."""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import SHAPES  # noqa: E402

from localsgd_ext import QuantizedAverager  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="wide", help="the model (bench/models.py)")
    parser.add_argument("--wire", choices=["int8", "fp8"], default="int8")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--bucket-cap-mb", type=float, default=25, help="the pieces' size, in MiB of float32")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    methods = {}
    for label, cap in (("one piece", 1e6), (f"pieces of {args.bucket_cap_mb:g} MiB", args.bucket_cap_mb)):
        model = SHAPES[args.shape]()
        averager = QuantizedAverager(list(model.parameters()), wire=args.wire, bucket_cap_mb=cap)
        averager.average()  # the float32 sync that takes the anchor
        methods[label] = (model, averager)
    nbytes = sum(p.numel() * p.element_size() for p in methods["one piece"][0].parameters())
    flat = torch.zeros(nbytes // 4)
    seconds = {label: [] for label in [*methods, "flat all_reduce (floor)"]}
    for _ in range(args.rounds):
        for label, (model, averager) in methods.items():
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            dist.barrier()
            start = time.perf_counter()
            averager.average()
            seconds[label].append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        seconds["flat all_reduce (floor)"].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        floor = statistics.median(seconds["flat all_reduce (floor)"])
        print(
            f"{args.shape}, {args.wire} wire, {dist.get_world_size()} ranks, gloo, {torch.get_num_threads()} thread(s), "
            f"median of {args.rounds} interleaved rounds"
        )
        for label, times in seconds.items():
            median = statistics.median(times)
            print(f"  {label:26s} {1e3 * median:8.1f} ms  {median / floor:5.2f} x floor")
    del methods
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
