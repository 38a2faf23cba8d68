"""What entering zero-copy mode costs in memory, in a fresh process (no other allocations to blur it):
the rise of peak resident memory while the parameters are flattened, and what stays afterwards.

    python bench/zero_copy_memory.py --shape wide
"""

import argparse
import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import SHAPES  # noqa: E402

from localsgd_ext import ParameterAverager  # noqa: E402


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="wide")
    parser.add_argument("--bucket-cap-mb", type=float, default=25)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    params = list(SHAPES[args.shape](smoke=args.smoke).parameters())
    model_mib = sum(p.numel() * p.element_size() for p in params) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = status_mib("VmRSS")
    averager = ParameterAverager(params, bucket_cap_mb=args.bucket_cap_mb, zero_copy=True)
    peak = status_mib("VmHWM") - before
    after = status_mib("VmRSS") - before
    largest = max(b["numel"] * b["element_size"] for b in averager.buckets) / 2**20
    print(
        f"{args.shape}: model {model_mib:.1f} MiB, largest bucket {largest:.1f} MiB; flattening: peak +{peak:.1f} MiB, "
        f"afterwards +{after:.1f} MiB (flat buffers {averager.flat_bytes / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
