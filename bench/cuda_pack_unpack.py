"""The CUDA path on one GPU: fused pack/unpack bandwidth, kernel launches per sync, and a LocalSGD sync
of ours against Accelerate's, with NCCL at world size 1.

    python bench/cuda_pack_unpack.py [--bucket-mb 1 4 16 64 256] [--rounds 21] [--json PATH]
    python bench/cuda_pack_unpack.py --device cpu     # the same measurements on the CPU (gloo)

1. Bandwidth: a bucket of `--tensors` parameter-sized tensors (fp32, sizes drawn at random, laid out by
   our planner) is packed into its flat buffer and unpacked back (as a copy, and with the division of a
   SUM average fused in). Each is timed against torch's device-to-device copy of the same bytes
   (`flat_dst.copy_(flat_src)`), and against the generic per-tensor ATen kernels. Bytes moved count
   reads plus writes. Goal: pack + unpack at >= 80% of the copy's bandwidth from 4 MB buckets up.
2. Launches: the CUDA kernels and memcpys one sync issues (torch profiler), ours vs Accelerate's.
3. Sync time: `LocalSGD._sync_and_avg_model_params()` (what `step()` runs every K steps), ours vs
   Accelerate's, plus our bare engine and one all_reduce of an already-flat buffer, on the models of
   bench/averaging_latency.py. Timed to completion (device synchronized). With one GPU the world size
   is 1: the collective is NCCL's copy, so this measures everything around the wire.

Times are medians over rounds, methods interleaved within each round. A table goes to stdout, all
figures to JSON.
"""

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import SHAPES  # noqa: E402  (the same models as the CPU benchmark)

from localsgd_ext import _C, LocalSGD, ParameterAverager, ops  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--tensors", type=int, default=200, help="tensors per bucket in the bandwidth test")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls-per-round", type=int, default=20, help="bandwidth test: calls timed together")
    parser.add_argument("--json", default="bench/out/cuda_pack_unpack.json")
    return parser.parse_args()


class Timer:
    """Seconds per call of `fn`, measured over `calls` back-to-back calls: CUDA events on the GPU
    (device time, no host sync inside), perf_counter on the CPU."""

    def __init__(self, device: str):
        self.device = device

    def per_call(self, fn, calls: int) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    def to_completion(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def interleaved_medians(methods, rounds, measure):
    samples = {name: [] for name in methods}
    for round_index in range(rounds + 2):  # two warm-up rounds
        for name, fn in methods.items():
            seconds = measure(fn)
            if round_index >= 2:
                samples[name].append(seconds)
    return {name: statistics.median(s) for name, s in samples.items()}


def bucket_of_tensors(total_bytes, count, device, seed):
    """`count` fp32 tensors of random sizes adding up to about `total_bytes`, and their planned layout."""
    rng = random.Random(seed)
    weights = [rng.uniform(0.2, 1.8) for _ in range(count)]
    total_elems = int(total_bytes) // 4
    sizes = [max(1, int(total_elems * w / sum(weights))) for w in weights]
    tensors = [torch.randn(n, device=device) for n in sizes]
    plan = _C.plan_buckets([(0, n, 4) for n in sizes], 1 << 62, _C.BUCKET_ALIGNMENT_BYTES)
    assert len(plan) == 1
    return tensors, plan[0]["offsets"], plan[0]["numel"]


def bench_bandwidth(args, timer):
    rows = []
    for mb in args.bucket_mb:
        tensors, offsets, numel = bucket_of_tensors(mb * 2**20, args.tensors, args.device, seed=int(mb * 10))
        nbytes = sum(t.numel() for t in tensors) * 4
        buffer = torch.zeros(numel, device=args.device)
        flat_src = torch.randn(nbytes // 4, device=args.device)
        flat_dst = torch.empty_like(flat_src)
        wire = torch.zeros(numel, device=args.device, dtype=torch.bfloat16)  # comm_dtype=torch.bfloat16
        flat_wire = torch.empty(nbytes // 4, device=args.device, dtype=torch.bfloat16)
        methods = {
            "pack (fused)": lambda: ops.pack_into(tensors, offsets, buffer),
            "unpack (fused)": lambda: ops.unpack_from(buffer, offsets, 1.0, tensors),
            "unpack / 2 (fused)": lambda: ops.unpack_from(buffer, offsets, 2.0, tensors),
            "pack (per-tensor ATen)": lambda: _C._pack_into_generic(tensors, offsets, buffer),
            "unpack (per-tensor ATen)": lambda: _C._unpack_from_generic(buffer, offsets, 1.0, tensors),
            "torch copy_ (same bytes)": lambda: flat_dst.copy_(flat_src),
            "pack fp32 -> bf16 (fused cast)": lambda: ops.pack_into(tensors, offsets, wire),
            "unpack bf16 -> fp32 / 2 (fused cast)": lambda: ops.unpack_from(wire, offsets, 2.0, tensors),
            "pack fp32 -> bf16 (per-tensor ATen)": lambda: _C._pack_into_generic(tensors, offsets, wire),
            "torch cast copy_ fp32 -> bf16 (same elements)": lambda: flat_wire.copy_(flat_src),
        }
        medians = interleaved_medians(methods, args.rounds, lambda fn: timer.per_call(fn, args.calls_per_round))
        copy = medians["torch copy_ (same bytes)"]
        row = {
            "bucket_mb": mb,
            "tensors": len(tensors),
            "bytes": nbytes,
            "methods": {
                name: {"median_us": 1e6 * s, "gb_per_s": 2 * nbytes / s / 1e9, "of_copy_bandwidth": copy / s}
                for name, s in medians.items()
            },
        }
        pack_unpack = medians["pack (fused)"] + medians["unpack (fused)"]
        row["pack_plus_unpack_of_copy_bandwidth"] = 2 * copy / pack_unpack
        # Casts move 6 bytes per element, not 8: measured against torch's own cast of the same elements.
        torch_cast = medians["torch cast copy_ fp32 -> bf16 (same elements)"]
        row["cast_pack_of_torch_cast"] = torch_cast / medians["pack fp32 -> bf16 (fused cast)"]
        row["cast_unpack_of_torch_cast"] = torch_cast / medians["unpack bf16 -> fp32 / 2 (fused cast)"]
        rows.append(row)
    return rows


def count_launches(fn):
    """CUDA kernels (by name) and memcpys one call of `fn` issues."""
    fn()  # warm-up: lazy module loading, allocator, NCCL communicator
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, memcpys = {}, 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if "emcpy" in event.name or "emset" in event.name:
            memcpys += 1
            continue
        name = (
            "ours: multi_tensor_copy_kernel"
            if "multi_tensor_copy_kernel" in event.name
            else ("nccl" if "nccl" in event.name.lower() else event.name[:60])
        )
        kernels[name] = kernels.get(name, 0) + 1
    return {"kernels": sum(kernels.values()), "by_kernel": kernels, "memcpys": memcpys}


def bench_syncs(args, timer, accelerator):
    from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD

    rows = []
    for shape in args.shapes:
        torch.manual_seed(0)
        model = accelerator.prepare(SHAPES[shape]())
        params = list(model.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in params)
        flat = torch.randn(nbytes // 4, device=args.device)
        engine = ParameterAverager(params)
        ours = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1)
        theirs = AccelerateLocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1)
        methods = {
            "localsgd_ext LocalSGD": ours._sync_and_avg_model_params,
            "accelerate LocalSGD": theirs._sync_and_avg_model_params,
            "localsgd_ext (bare engine)": engine.average,
            "flat all_reduce": lambda: dist.all_reduce(flat, op=dist.ReduceOp.AVG),
        }
        medians = interleaved_medians(methods, args.rounds, timer.to_completion)
        row = {
            "shape": shape,
            "tensors": len(params),
            "bytes": nbytes,
            "buckets": len(engine.buckets),
            "methods": {name: {"median_ms": 1e3 * s} for name, s in medians.items()},
            "accelerate_over_ours": medians["accelerate LocalSGD"] / medians["localsgd_ext LocalSGD"],
        }
        if args.device == "cuda":
            row["launches"] = {
                "localsgd_ext LocalSGD": count_launches(ours._sync_and_avg_model_params),
                "accelerate LocalSGD": count_launches(theirs._sync_and_avg_model_params),
            }
        rows.append(row)
    return rows


def init_world_of_one(device):
    """A one-process group the way torchrun would set it up, unless already under a launcher."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    from accelerate import Accelerator

    # With LOCAL_RANK set, Accelerate picks NCCL on a GPU and gloo with cpu=True.
    return Accelerator(cpu=device == "cpu")


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main():
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; `--device cpu` runs the same measurements on the CPU")
    if args.device == "cuda" and not _C.CUDA_KERNELS_BUILT:
        raise SystemExit("localsgd_ext was built without its CUDA kernels (see setup.py: LOCALSGD_EXT_FORCE_CUDA=1)")
    accelerator = init_world_of_one(args.device)
    timer = Timer(args.device)
    bandwidth = bench_bandwidth(args, timer)
    syncs = bench_syncs(args, timer, accelerator)

    print(
        f"\n{machine(args.device)}; backend {dist.get_backend()}, world size {dist.get_world_size()}; "
        f"median of {args.rounds} rounds"
    )
    print("\nPack/unpack of one bucket (fp32) vs torch's copy of the same bytes; GB/s counts reads + writes")
    print("(the casts' GB/s and 'of copy' are against fp32 bytes; see 'of torch's cast' for them)")
    print(f"{'bucket MB':>9}{'tensors':>8}  {'method':<46}{'median us':>11}{'GB/s':>9}{'of copy':>9}")
    for row in bandwidth:
        for name, m in row["methods"].items():
            print(
                f"{row['bucket_mb']:>9g}{row['tensors']:>8}  {name:<46}{m['median_us']:>11.1f}"
                f"{m['gb_per_s']:>9.1f}{m['of_copy_bandwidth']:>9.0%}"
            )
        print(f"{'':>17}  {'pack + unpack (fused)':<46}{'':>20}{row['pack_plus_unpack_of_copy_bandwidth']:>9.0%}")
        print(
            f"{'':>17}  {'cast pack, unpack, of torch cast':<46}{'':>11}"
            f"{row['cast_pack_of_torch_cast']:>9.0%}{row['cast_unpack_of_torch_cast']:>9.0%}"
        )
    print("\nOne LocalSGD sync, timed to completion")
    print(f"{'shape':<6}{'tensors':>8}{'MiB':>8}{'buckets':>8}  {'method':<28}{'median ms':>10}  launches")
    for row in syncs:
        for name, m in row["methods"].items():
            launches = row.get("launches", {}).get(name)
            described = f"{launches['kernels']} kernels, {launches['memcpys']} memcpys" if launches else ""
            print(
                f"{row['shape']:<6}{row['tensors']:>8}{row['bytes'] / 2**20:>8.1f}{row['buckets']:>8}  "
                f"{name:<28}{m['median_ms']:>10.3f}  {described}"
            )
        print(f"{'':<30}  Accelerate / ours: {row['accelerate_over_ours']:.1f}x")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "machine": machine(args.device),
                "device": args.device,
                "rounds": args.rounds,
                "bandwidth": bandwidth,
                "syncs": syncs,
            },
            f,
            indent=1,
        )
    print(f"\nwrote {args.json}")
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main()
