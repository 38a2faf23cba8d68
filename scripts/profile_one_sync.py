"""One process's view of a sync, for a machine with one GPU (NCCL at world size 1) or for a CPU (gloo):
the engine's average() against one flat all_reduce of the same bytes and against Accelerate's algorithm
(clone, all_reduce and divide per parameter), medians over interleaved rounds, then a torch.profiler
table of one engine sync of a BERT-base-shaped model.

    python scripts/profile_one_sync.py                 # CUDA if there is a GPU, else CPU
    python scripts/profile_one_sync.py --device cpu --rounds 3 --smoke

Run by scripts/gpu_check.sh; the world-size-1 numbers bound the engine's own overhead (packing, the
agreement check, unpacking) against the wire, which at one rank is the collective's own cost."""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from models import SHAPES  # noqa: E402

from localsgd_ext import ParameterAverager  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["transformer", "tiny"])
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per shape")
    parser.add_argument("--smoke", action="store_true", help="miniature shapes (a quick check of the script)")
    return parser.parse_args()


def timed(call, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def accelerates_sync(params, world_size: int) -> None:
    """Accelerate 1.15's LocalSGD._sync_and_avg_model_params, without its barrier."""
    for p in params:
        averaged = p.data.clone()
        dist.all_reduce(averaged, op=dist.ReduceOp.SUM)
        averaged /= world_size
        p.data = averaged


def main():
    args = parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    for name in args.shapes:
        model = SHAPES[name](smoke=args.smoke).to(args.device)
        params = list(model.parameters())
        theirs = [p.detach().clone() for p in params]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        flat = torch.zeros(nbytes // 4, device=args.device)
        averager = ParameterAverager(params)
        floor_op = dist.ReduceOp.AVG if args.device == "cuda" else dist.ReduceOp.SUM  # gloo has AVG as SUM + a pass
        methods = {
            "engine average()": averager.average,
            "Accelerate's algorithm": lambda: accelerates_sync(theirs, 1),
            "flat all_reduce (floor)": lambda: dist.all_reduce(flat, op=floor_op),
        }
        for call in methods.values():  # warm-up: staging allocations, NCCL's first-use setup
            timed(call, args.device)
        seconds = {label: [] for label in methods}
        for _ in range(args.rounds):
            for label, call in methods.items():
                seconds[label].append(timed(call, args.device))
        floor = statistics.median(seconds["flat all_reduce (floor)"])
        print(f"\n{name}: {len(params)} tensors, {nbytes / 2**20:.1f} MiB, {args.device}, world size 1, {args.rounds} rounds")
        for label, times in seconds.items():
            median = statistics.median(times)
            print(f"  {label:26s} {1e3 * median:9.3f} ms   {median / floor:6.2f} x floor")
    model = SHAPES["transformer"](smoke=args.smoke).to(args.device)
    averager = ParameterAverager(model.parameters())
    averager.average()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        averager.average()
        if args.device == "cuda":
            torch.cuda.synchronize()
    sort_by = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(f"\nprofile of one engine sync (transformer shapes), by {sort_by}:")
    print(profile.key_averages().table(sort_by=sort_by, row_limit=15))
    del averager, model
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
