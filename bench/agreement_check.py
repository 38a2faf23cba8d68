"""What the cross-rank agreement check costs: one small collective per sync, and what goes into it.

    python bench/agreement_check.py                    # launches 2 ranks itself (CPU, gloo)
    python bench/agreement_check.py --ranks 3 --rounds 300
    torchrun --standalone --nproc-per-node 2 bench/agreement_check.py

Timed, interleaved within every round (each after a barrier; a round's time is the slowest rank's):
  small all_reduce (floor)     dist.all_reduce of 5 int64 with MAX: the collective the check sends
  check: 2000 tensors          ParameterAverager(tiny).verify_ranks_agree(): fingerprint of layout,
                               names, plan and settings, plus the collective
  check: + 2000 named buffers  the same with `agreement_tensors` (LocalSGD with sync_buffers=True)
  sync: tiny                   the whole average() of `tiny` (the check overlaps the first pack)
and, in fewer rounds (--big-rounds), on `wide` (26M fp32):
  sync: wide bf16 / fp16 wire  average() with comm_dtype; fp16 adds the |value| scan for the scale and
                               packs only after the check
  DiLoCo enter digest          verify_ranks_agree(equal_values=params): the byte digest, once per enter
Medians over rounds, in ms. Writes JSON to --out.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import SHAPES  # noqa: E402

from localsgd_ext import ParameterAverager  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="world size to launch (ignored under torchrun)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--big-rounds", type=int, default=11)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--smoke", action="store_true", help="miniature shapes and few rounds, for the smoke test")
    return parser.parse_args()


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() * 1e3


def measure(methods: dict, rounds: int) -> dict:
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def run_rank(args):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    tiny = list(SHAPES["tiny"](smoke=args.smoke).parameters())
    names = [f"tiny.{i}" for i in range(len(tiny))]
    plain = ParameterAverager(tiny, names=names)
    with_buffers = ParameterAverager(
        tiny,
        names=names,
        agreement_settings={"local_sgd_steps": 8},
        agreement_tensors=[(f"buffer.{i}", t) for i, t in enumerate(tiny)],
    )
    status = torch.zeros(5, dtype=torch.int64)
    small = measure(
        {
            "small all_reduce (floor)": lambda: dist.all_reduce(status, op=dist.ReduceOp.MAX),
            "check: 2000 tensors": plain.verify_ranks_agree,
            "check: + 2000 named buffers": with_buffers.verify_ranks_agree,
            "sync: tiny": plain.average,
        },
        args.rounds,
    )
    wide = list(SHAPES["wide"](smoke=args.smoke).parameters())
    bf16 = ParameterAverager(wide, comm_dtype=torch.bfloat16)
    fp16 = ParameterAverager(wide, comm_dtype=torch.float16)
    big = measure(
        {
            "sync: wide bf16 wire": bf16.average,
            "sync: wide fp16 wire": fp16.average,
            "DiLoCo enter digest (wide)": lambda: bf16.verify_ranks_agree(equal_values=wide),
        },
        args.big_rounds,
    )
    if rank == 0:
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "world_size": world,
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "big_rounds": args.big_rounds,
            "median_ms": {**small, **big},
        }
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"agreement_check_{world}ranks.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"\n{world} ranks, gloo, medians in ms:")
        for name, ms in report["median_ms"].items():
            print(f"  {name:<32} {ms:9.3f}")
    dist.destroy_process_group()


def main():
    args = parse_args()
    if "LOCAL_RANK" in os.environ:
        run_rank(args)
        return
    forwarded = ["--rounds", str(args.rounds), "--big-rounds", str(args.big_rounds), "--out", args.out]
    forwarded += ["--smoke"] if args.smoke else []
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.ranks}",
        os.path.abspath(__file__),
        *forwarded,
    ]
    print("$ " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


if __name__ == "__main__":
    main()
