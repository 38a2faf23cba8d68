"""Parameter-averaging latency: localsgd_ext against every peer and against the floor.

    python bench/averaging_latency.py                      # launches 2 and 4 ranks itself (CPU, gloo)
    python bench/averaging_latency.py --ranks 2 --shapes wide tiny --rounds 21
    python bench/averaging_latency.py --device cuda --ranks 2 4    # one GPU per rank, NCCL
    torchrun --standalone --nproc-per-node 2 bench/averaging_latency.py     # one world size, as launched

Shapes (bench/models.py): `wide` 200 tensors / 26M fp32; `tiny` 2000 tiny tensors; `transformer` BERT-base's
parameter list (199 tensors, 110M fp32); `mixed` bf16 Linear layers with fp32 LayerNorms.

Methods, interleaved within every round (so drift hits them alike), each after a barrier:
  localsgd_ext                 our ParameterAverager.average() (25 MiB buckets; also at 1, 4 and 100 MiB)
  localsgd_ext LocalSGD        what our LocalSGD.step() runs every K steps
  localsgd_ext zero-copy       ParameterAverager(zero_copy=True).average(), on its own copy of the model
  localsgd_ext LocalSGD zero-copy   LocalSGD(zero_copy=True)'s sync, on another copy
  localsgd_ext int8 wire       QuantizedAverager.average() on another copy (float32 shapes only): deltas from
                               the anchor, int8 per 1024 elements, all_to_all + all_gather (its first,
                               float32, sync is the cold one)
  accelerate LocalSGD          what Accelerate's LocalSGD.step() runs every K steps
  torch average_parameters     torch.distributed.algorithms.model_averaging.utils.average_parameters
  python cat buckets           25 MiB buckets by dtype: torch.cat, all_reduce(AVG), copy back, in Python
  flat all_reduce (floor)      one all_reduce(AVG) of an already-flat buffer of the same bytes
A method's time in a round is the slowest rank's; tables give the median over rounds and the ratio to
the floor. Peak extra memory: each method's first (cold) sync, as the rise of the process's peak
resident memory over what it held before (Linux /proc; max over ranks), after returning freed heap
memory to the OS; on CUDA, the rise of torch's peak allocated GPU memory. GPU times include the device
finishing (synchronized before and after each call). Writes JSON per world size, a combined JSON and a PNG
plot (x floor per shape) to --out.
"""

import argparse
import copy
import ctypes
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

from localsgd_ext import LocalSGD, ParameterAverager, QuantizedAverager  # noqa: E402

FLOOR = "flat all_reduce (floor)"
OURS = "localsgd_ext"
SWEEP_CAPS_MB = (1, 4, 100)  # besides the default 25


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes to launch (ignored under torchrun)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL, one GPU per rank")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench/out", help="folder for the JSON and PNG outputs")
    parser.add_argument("--smoke", action="store_true", help="miniature shapes, for the smoke test")
    parser.add_argument("--no-sweep", action="store_true", help="skip the bucket_cap_mb sweep")
    parser.add_argument("--replot", metavar="JSON", help="only draw the PNG (next to it) from a combined JSON written earlier")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------
# Rank side


def slowest_rank(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def device_sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    dist.barrier()
    device_sync(device)
    start = time.perf_counter()
    fn()
    device_sync(device)
    return slowest_rank(time.perf_counter() - start)


class PeakGpuMemory:
    """Peak memory torch allocated on this rank's GPU during a call, above what it held just before."""

    def extra_bytes(self, fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


class PeakMemory:
    """Peak resident memory of this process during a call, above what it held just before (Linux)."""

    def __init__(self):
        self.available = os.path.exists("/proc/self/clear_refs")
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} missing from /proc/self/status")

    def extra_bytes(self, fn):
        if not self.available:
            fn()
            return None
        if self.libc is not None:
            self.libc.malloc_trim(0)  # freed heap back to the OS, so reuse does not hide a method's needs
        before = self._status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        fn()
        return 1024 * max(0, self._status_kib("VmHWM") - before)


def python_cat_buckets(params, cap_bytes):
    """The usual pure-Python bucketed average, for comparison: per dtype, buckets of up to cap_bytes are
    flattened with torch.cat, averaged with one all_reduce, and copied back."""
    buckets, current, current_bytes, current_dtype = [], [], 0, None
    for p in sorted(params, key=lambda p: str(p.dtype)):  # stable: model order within a dtype
        nbytes = p.numel() * p.element_size()
        if current and (p.dtype != current_dtype or current_bytes + nbytes > cap_bytes):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += nbytes
        current_dtype = p.dtype
    if current:
        buckets.append(current)

    def average():
        with torch.no_grad():
            for bucket in buckets:
                flat = torch.cat([p.reshape(-1) for p in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.AVG)
                for p, chunk in zip(bucket, flat.split([p.numel() for p in bucket])):
                    p.copy_(chunk.view_as(p))

    return average


def lazy_zero_copy_average(params):
    averager = []

    def average():
        if not averager:
            averager.append(ParameterAverager(params, bucket_cap_mb=25, zero_copy=True))
        averager[0].average()

    return average


def bench_shape(name, args, accelerator, memory):
    from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    torch.manual_seed(dist.get_rank())
    model = SHAPES[name](smoke=args.smoke).to(accelerator.device)
    params = list(model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    flat = torch.randn(nbytes // 4, device=accelerator.device)
    # average_parameters rebinds every p.data to a slice of a fresh flat buffer: it gets its own copy,
    # so that it cannot change the storage the other methods work on.
    torch_copy = [p for p in copy.deepcopy(model).parameters()]
    # Zero-copy mode rebinds the parameters into its own flat buffers, and Accelerate's sync rebinds
    # `param.data` at every call: each zero-copy method gets a model of its own.
    zero_copy_params = list(copy.deepcopy(model).parameters())
    zero_copy_model = copy.deepcopy(model)
    int8_params = list(copy.deepcopy(model).parameters())

    engines = {OURS: ParameterAverager(params, bucket_cap_mb=25)}
    if not args.no_sweep:
        engines.update({f"{OURS} cap={cap}": ParameterAverager(params, bucket_cap_mb=cap) for cap in SWEEP_CAPS_MB})
    ours_local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1)
    ours_zero_copy_local_sgd = LocalSGD(accelerator=accelerator, model=zero_copy_model, local_sgd_steps=1, zero_copy=True)
    theirs = AccelerateLocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1)
    methods = {name_: engine.average for name_, engine in engines.items()}
    methods.update(
        {
            f"{OURS} LocalSGD": ours_local_sgd._sync_and_avg_model_params,
            # Built lazily, so that flattening counts in the cold sync's memory.
            f"{OURS} zero-copy": lazy_zero_copy_average(zero_copy_params),
            f"{OURS} LocalSGD zero-copy": ours_zero_copy_local_sgd._sync_and_avg_model_params,
            "accelerate LocalSGD": theirs._sync_and_avg_model_params,
            "torch average_parameters": lambda: average_parameters(iter(torch_copy), None),
            "python cat buckets": python_cat_buckets(params, 25 * 2**20),
            FLOOR: lambda: dist.all_reduce(flat, op=dist.ReduceOp.AVG),
        }
    )
    if all(p.dtype == torch.float32 for p in int8_params):
        methods[f"{OURS} int8 wire"] = QuantizedAverager(int8_params).average

    extra = {}
    for method, fn in methods.items():  # cold: each method's first sync
        dist.barrier()
        device_sync(args.device)
        measured = memory.extra_bytes(fn)
        extra[method] = None if measured is None else slowest_rank(float(measured))

    samples = {m: [] for m in methods}
    for round_index in range(args.warmup + args.rounds):
        for method, fn in methods.items():
            seconds = timed(fn, args.device)
            if round_index >= args.warmup:
                samples[method].append(seconds)
    medians = {m: statistics.median(s) for m, s in samples.items()}
    floor = medians[FLOOR]
    largest_bucket = max(b["numel"] * b["element_size"] for b in engines[OURS].buckets)
    return {
        "shape": name,
        "tensors": len(params),
        "numel": sum(p.numel() for p in params),
        "bytes": nbytes,
        "buckets": len(engines[OURS].buckets),
        "largest_bucket_bytes": largest_bucket,
        "staging_bytes": engines[OURS].staging_bytes,
        "methods": {
            m: {
                "median_ms": 1e3 * medians[m],
                "x_floor": medians[m] / floor,
                "peak_extra_bytes": extra[m],
                "samples_ms": [1e3 * s for s in samples[m]],
            }
            for m in methods
        },
    }


def run_rank(args):
    from accelerate import Accelerator

    # With LOCAL_RANK set (torchrun), Accelerate picks gloo with cpu=True and NCCL on a GPU.
    accelerator = Accelerator(cpu=args.device == "cpu")
    if accelerator.num_processes < 2:
        raise SystemExit("needs at least 2 processes: run without torchrun to launch them, or torchrun --nproc-per-node 2+")
    memory = PeakGpuMemory() if args.device == "cuda" else PeakMemory()
    results = [bench_shape(name, args, accelerator, memory) for name in args.shapes]
    report = {
        "world_size": accelerator.num_processes,
        "backend": dist.get_backend(),
        "threads_per_rank": torch.get_num_threads(),
        "rounds": args.rounds,
        "results": results,
    }
    if accelerator.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"averaging_latency_{accelerator.num_processes}ranks.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print_table(report)
        print(f"wrote {path}")
    accelerator.free_memory()
    accelerator.end_training()


# ---------------------------------------------------------------------------------------------------
# Launcher side: one torchrun per world size, then the combined table, JSON and plot


def print_table(report):
    print(
        f"\n{report['world_size']} ranks, {report['backend']}, {report['threads_per_rank']} thread(s)/rank, "
        f"median of {report['rounds']} rounds (slowest rank)"
    )
    print(f"{'shape':<12}{'tensors':>8}{'MiB':>8}  {'method':<33}{'median ms':>11}{'x floor':>9}{'x ours':>8}{'extra MiB':>11}")
    for r in report["results"]:
        ours_ms = r["methods"][OURS]["median_ms"]
        for method, m in r["methods"].items():
            extra = "" if m["peak_extra_bytes"] is None else f"{m['peak_extra_bytes'] / 2**20:.1f}"
            print(
                f"{r['shape']:<12}{r['tensors']:>8}{r['bytes'] / 2**20:>8.1f}  {method:<33}"
                f"{m['median_ms']:>11.2f}{m['x_floor']:>9.2f}{m['median_ms'] / ours_ms:>8.2f}{extra:>11}"
            )
        print(
            f"{'':<28}largest bucket {r['largest_bucket_bytes'] / 2**20:.1f} MiB, "
            f"staging held {r['staging_bytes'] / 2**20:.1f} MiB"
        )


# What each method on the figure is, in the words a reader needs (the legend names alone do not say).
METHOD_NOTES = {
    OURS: "engine: ParameterAverager.average() alone",
    f"{OURS} LocalSGD": "LocalSGD sync: the engine plus LocalSGD's own per-sync work",
    f"{OURS} zero-copy": "engine, zero-copy (parameters live in the flat buffers)",
    f"{OURS} LocalSGD zero-copy": "LocalSGD sync, zero-copy",
    f"{OURS} int8 wire": "engine, int8 wire (changes since the anchor, 1 byte each)",
    "accelerate LocalSGD": "Accelerate's LocalSGD sync (clone + all_reduce + divide per tensor)",
    "torch average_parameters": "torch.distributed model_averaging's average_parameters",
    "python cat buckets": "25 MiB buckets in Python: torch.cat, all_reduce, copy back",
    FLOOR: "floor: one all_reduce of an already-flat buffer of the same bytes",
}


def plot(reports, path):
    """Per world size, two panels: each method's median time as a multiple of the floor, and in
    milliseconds (both log scales), per model shape, labelled with its tensor count and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in reports[0]["results"][0]["methods"] if " cap=" not in m]
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, len(reports), figsize=(7 * len(reports), 8.4), squeeze=False)
    for column, report in enumerate(reports):
        results = report["results"]
        labels = [f"{r['shape']}\n{r['tensors']} tensors\n{r['bytes'] / 2**20:.1f} MiB" for r in results]
        width = 0.8 / len(methods)
        for row, (key, scale, ylabel) in enumerate(
            [("x_floor", 1.0, "time / one flat all_reduce (log)"), ("median_ms", 1.0, "median ms per sync (log)")]
        ):
            ax = axes[row][column]
            for i, method in enumerate(methods):
                values = [r["methods"][method][key] * scale if method in r["methods"] else float("nan") for r in results]
                ax.bar([s + i * width for s in range(len(results))], values, width, color=colours[method], label=method)
            ax.set_xticks([s + 0.4 - width / 2 for s in range(len(results))], labels, fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            if key == "x_floor":
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_title(
                    f"{report['world_size']} ranks, {report['backend']}, {report.get('threads_per_rank', 1)} thread/rank"
                )
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in methods]
    fig.legend(handles, [f"{m}: {METHOD_NOTES.get(m, m)}" for m in methods], loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.05 + 0.022 * ((len(methods) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)


def launch(args):
    script = os.path.abspath(__file__)
    forwarded = [
        "--shapes",
        *args.shapes,
        "--rounds",
        str(args.rounds),
        "--warmup",
        str(args.warmup),
        "--out",
        args.out,
        "--device",
        args.device,
    ]
    forwarded += ["--smoke"] if args.smoke else []
    forwarded += ["--no-sweep"] if args.no_sweep else []
    reports = []
    for world_size in args.ranks:
        if args.device == "cuda" and world_size > torch.cuda.device_count():
            print(f"skipping {world_size} ranks: {torch.cuda.device_count()} GPU(s) here, one per rank needed")
            continue
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
            script,
            *forwarded,
        ]
        print("$ " + " ".join(command[2:]), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(command, check=True, env=env)
        with open(os.path.join(args.out, f"averaging_latency_{world_size}ranks.json")) as f:
            reports.append(json.load(f))
    combined = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "command": " ".join([os.path.relpath(script)] + sys.argv[1:]),
        "device": args.device,
        "reports": reports,
    }
    if not reports:
        raise SystemExit("no world size could run")
    with open(os.path.join(args.out, "averaging_latency.json"), "w") as f:
        json.dump(combined, f, indent=1)
    png = os.path.join(args.out, "averaging_latency.png")
    plot(reports, png)
    print(f"\nwrote {os.path.join(args.out, 'averaging_latency.json')} and {png}")


def main():
    args = parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["reports"], os.path.splitext(args.replot)[0] + ".png")
        return
    if "LOCAL_RANK" in os.environ:
        run_rank(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
