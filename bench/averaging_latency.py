"""Parameter-averaging latency: localsgd_ext (its LocalSGD sync and the bare ParameterAverager) vs
Accelerate's LocalSGD sync vs one flat all_reduce.

    torchrun --standalone --nproc-per-node 2 bench/averaging_latency.py [--shapes wide tiny] [--rounds 15]

Each round times every method once, in turn (interleaved, so drift hits them alike), after a barrier.
A method's time in a round is the slowest rank's; the table gives the median over rounds and the
ratio to the floor: one all_reduce of an already-flat buffer holding the same bytes. Results are also
written as JSON (--json).
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD

from localsgd_ext import LocalSGD, ParameterAverager

SHAPES = {
    # 200 tensors, 26.06M fp32 (99.4 MiB): 100 x Linear(510, 510).
    "wide": lambda: torch.nn.Sequential(*[torch.nn.Linear(510, 510) for _ in range(100)]),
    # 2000 tensors, 0.6M fp32: 1000 x Linear(24, 24).
    "tiny": lambda: torch.nn.Sequential(*[torch.nn.Linear(24, 24) for _ in range(1000)]),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-cap-mb", type=float, default=25)
    parser.add_argument("--json", default="bench/out/averaging_latency.json")
    return parser.parse_args()


def slowest_rank(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return slowest_rank(time.perf_counter() - start)


def bench_shape(name, args, accelerator):
    torch.manual_seed(dist.get_rank())
    model = SHAPES[name]()
    params = list(model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    flat = torch.randn(nbytes // 4)

    ours = ParameterAverager(params, bucket_cap_mb=args.bucket_cap_mb)
    ours_local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, bucket_cap_mb=args.bucket_cap_mb)
    theirs = AccelerateLocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1)
    # What LocalSGD.step() runs every local_sgd_steps steps, for both implementations.
    methods = {
        "localsgd_ext": ours.average,
        "localsgd_ext LocalSGD": ours_local_sgd._sync_and_avg_model_params,
        "accelerate LocalSGD": theirs._sync_and_avg_model_params,
        "flat all_reduce (floor)": lambda: dist.all_reduce(flat, op=dist.ReduceOp.AVG),
    }
    samples = {m: [] for m in methods}
    for round_index in range(args.warmup + args.rounds):
        for method, fn in methods.items():
            seconds = timed(fn)
            if round_index >= args.warmup:
                samples[method].append(seconds)
    medians = {m: statistics.median(s) for m, s in samples.items()}
    floor = medians["flat all_reduce (floor)"]
    return {
        "shape": name,
        "tensors": len(params),
        "numel": sum(p.numel() for p in params),
        "bytes": nbytes,
        "buckets": len(ours.buckets),
        "methods": {
            m: {"median_ms": 1e3 * medians[m], "x_floor": medians[m] / floor, "samples_ms": [1e3 * s for s in samples[m]]}
            for m in methods
        },
    }


def main():
    args = parse_args()
    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes < 2:
        raise SystemExit("run under torchrun with at least 2 processes, e.g. torchrun --standalone --nproc-per-node 2 ...")
    results = [bench_shape(name, args, accelerator) for name in args.shapes]
    if accelerator.is_main_process:
        print(
            f"\n{accelerator.num_processes} ranks, gloo, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)/rank, {platform.processor() or platform.machine()}, "
            f"median of {args.rounds} rounds (slowest rank), bucket_cap_mb={args.bucket_cap_mb}"
        )
        print(f"{'shape':<8}{'tensors':>8}{'MiB':>8}  {'method':<26}{'median ms':>11}{'x floor':>9}{'x ours':>8}")
        for r in results:
            ours_ms = r["methods"]["localsgd_ext"]["median_ms"]
            for method, m in r["methods"].items():
                print(
                    f"{r['shape']:<8}{r['tensors']:>8}{r['bytes'] / 2**20:>8.1f}  {method:<26}"
                    f"{m['median_ms']:>11.2f}{m['x_floor']:>9.2f}{m['median_ms'] / ours_ms:>8.2f}"
                )
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"world_size": accelerator.num_processes, "torch": torch.__version__, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
