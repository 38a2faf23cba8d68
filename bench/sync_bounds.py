"""What bounds a sync on this machine: each part of the float32 copy-mode sync and of the int8 wire's sync
timed on its own, beside the whole sync and one flat float32 all_reduce of the model (the floor),
interleaved within every round.

    torchrun --standalone --nproc-per-node 2 bench/sync_bounds.py                    # wide: 200 tensors, 26M fp32
    torchrun --standalone --nproc-per-node 2 bench/sync_bounds.py --shape tiny --rounds 31

The parts, both ranks at once as in a sync:
  - "exchange alone": the int8 wire's collectives with the sizes it sends (an all_to_all of every rank's
    codes and scales, then an all_gather of each rank's chunk of the mean), without computing anything;
  - "passes alone": the compiled passes a sync runs, over the whole model, without any collective
    (int8: `quantize_tensors_change`, `requantize_mean` on this rank's chunk, `apply_quantized_mean_to`;
    float32 copy mode: `pack_into` then `unpack_from`);
  - "one streamed copy": `unpack_from` of a model-sized buffer into the tensors (4 bytes read and 4
    written per element, the stores around the cache from 8 MiB): the unit of memory traffic. Any int8 sync that keeps
    an anchor reads the parameters and the anchor and writes both (16 bytes per element), i.e. at least
    two of these.
Besides wall time, each method's CPU time (this process, all its threads, user + system) says whether
the wire leaves a core idle: where one rank's process is busy for nearly all of a collective's wall time,
and there are as many cores as ranks, a pass cannot overlap the wire and its time adds to the sync's.
Rank 0 prints medians over rounds (wall time: the slowest rank's; CPU time: rank 0's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from averaging_latency import slowest_rank  # noqa: E402
from models import SHAPES  # noqa: E402

from localsgd_ext import ParameterAverager, QuantizedAverager, ops  # noqa: E402
from localsgd_ext.quantized_wire import DEFAULT_BLOCK_SIZE  # noqa: E402

# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def add_a_change(tensors):
    """A change for the int8 passes to quantize, not timed (an unchanged model quantizes to zeros and skips
    making codes)."""
    for t in tensors:
        t.add_(0.01)


def flat_offsets(tensors):
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += t.numel()
    return offsets, total


class Int8Parts:
    """The int8 wire's collectives and passes, separately, over a copy of the model's layout: one piece of
    `length` elements (the layout padded to whole blocks and to a whole number of chunks)."""

    def __init__(self, tensors, world_size: int, block_size: int = DEFAULT_BLOCK_SIZE):
        self.tensors = tensors
        self.offsets, total = flat_offsets(tensors)
        self.block_size = block_size
        unit = block_size * world_size
        self.length = -(-total // unit) * unit
        chunk = self.length // world_size
        blocks = self.length // block_size
        self.anchor = torch.zeros(self.length)
        ops.pack_into(tensors, self.offsets, self.anchor)
        self.codes = torch.zeros(self.length, dtype=torch.int8)
        self.scales = torch.ones(blocks)
        self.received_codes = torch.empty(world_size, chunk, dtype=torch.int8)
        self.received_scales = torch.empty(world_size, blocks // world_size)
        self.mean_codes = torch.zeros(chunk, dtype=torch.int8)
        self.mean_scales = torch.ones(blocks // world_size)
        self.all_codes = torch.empty(self.length, dtype=torch.int8)
        self.all_scales = torch.empty(blocks)

    def exchange(self):
        dist.all_to_all_single(self.received_codes, self.codes)
        dist.all_to_all_single(self.received_scales, self.scales)
        _all_gather_single(self.all_codes, self.mean_codes)
        _all_gather_single(self.all_scales, self.mean_scales)

    def passes(self):
        ops.quantize_tensors_change(self.tensors, self.offsets, 0, self.anchor, None, self.block_size, self.codes, self.scales)
        # The received rows, as if they held every rank's codes of this rank's chunk.
        self.received_codes.view(-1).copy_(self.codes.view(-1)[: self.received_codes.numel()])
        self.received_scales.view(-1).copy_(self.scales.view(-1)[: self.received_scales.numel()])
        ops.requantize_mean(self.received_codes, self.received_scales, self.block_size, self.mean_codes, self.mean_scales)
        ops.apply_quantized_mean_to(self.codes, self.scales, self.block_size, self.anchor, self.offsets, 0, self.tensors)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="wide", help="the model (bench/models.py)")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    parser.add_argument("--smoke", action="store_true", help="the shape's smallest form (bench/models.py), to test the script")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    world_size = dist.get_world_size()

    def model_tensors():
        return [p.detach() for p in SHAPES[args.shape](smoke=args.smoke).parameters()]

    numel = sum(t.numel() for t in model_tensors())
    flat = torch.randn(numel)
    copy_tensors = model_tensors()
    copy_offsets, _ = flat_offsets(copy_tensors)
    copy_buffer = torch.empty(numel)
    copy_averager = ParameterAverager(model_tensors())
    int8_tensors = model_tensors()
    int8_parts = Int8Parts(model_tensors(), world_size)
    int8_averager = QuantizedAverager(int8_tensors, wire="int8")
    int8_averager.rebase_anchor()

    methods = {
        "flat all_reduce (floor)": (lambda: dist.all_reduce(flat), None),
        "fp32 copy: passes alone (pack + unpack)": (
            lambda: (
                ops.pack_into(copy_tensors, copy_offsets, copy_buffer),
                ops.unpack_from(copy_buffer, copy_offsets, float(world_size), copy_tensors),
            ),
            None,
        ),
        "fp32 copy: sync": (copy_averager.average, None),
        "one streamed copy": (lambda: ops.unpack_from(copy_buffer, copy_offsets, 1.0, copy_tensors), None),
        "int8: exchange alone": (int8_parts.exchange, None),
        "int8: passes alone": (int8_parts.passes, lambda: add_a_change(int8_parts.tensors)),
        "int8: sync": (int8_averager.average, lambda: add_a_change(int8_tensors)),
    }
    walls = {name: [] for name in methods}
    cpus = {name: [] for name in methods}
    for round_index in range(args.rounds + 1):
        for name, (run, prepare) in methods.items():
            if prepare is not None:
                prepare()
            dist.barrier()
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            run()
            wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
            wall = slowest_rank(wall)
            if round_index > 0:  # the first round warms up
                walls[name].append(wall)
                cpus[name].append(cpu)

    if dist.get_rank() == 0:
        floor = statistics.median(walls["flat all_reduce (floor)"])
        print(
            f"{args.shape}: {numel * 4 / 2**20:.1f} MiB fp32, {world_size} ranks, gloo, "
            f"{torch.get_num_threads()} thread(s)/rank, {os.cpu_count()} cores, median of {args.rounds} rounds"
        )
        print(f"{'method':42s} {'wall ms':>8s} {'x floor':>8s} {'CPU ms':>8s} {'CPU/wall':>8s}")
        for name in methods:
            wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
            print(f"{name:42s} {wall * 1e3:8.2f} {wall / floor:8.2f} {cpu * 1e3:8.2f} {cpu / wall:8.2f}")
        for label, parts in (
            ("fp32 copy", ["flat all_reduce (floor)", "fp32 copy: passes alone (pack + unpack)"]),
            ("int8", ["int8: exchange alone", "int8: passes alone"]),
        ):
            total = sum(statistics.median(walls[p]) for p in parts)
            print(f"{label}: wire + passes, one after the other = {total * 1e3:.2f} ms = {total / floor:.2f} x floor")
        # With as many cores as ranks, a rank's wall time is at least its CPU time: the exchange's, plus
        # passes that move at least two streamed copies' worth of memory.
        least = statistics.median(cpus["int8: exchange alone"]) + 2 * statistics.median(walls["one streamed copy"])
        print(
            f"int8 with one core per rank: exchange CPU + two streamed copies = {least * 1e3:.2f} ms "
            f"= {least / floor:.2f} x floor"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
