"""`sync_buffers=True`: a model's buffers at each sync. Floating-point ones (BatchNorm's running mean and
variance) are averaged like the parameters, by the compiled engine, and complex ones (rotary
embeddings' `freqs_cis`) as pairs of reals, through a real view of the same memory; integer and bool
ones (`num_batches_tracked`) cannot be averaged meaningfully, so every rank takes rank 0's, in one
broadcast per device. The buffers' layout is part of LocalSGD's agreement check, so this runs unchecked."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .averager import ParameterAverager
from .options import AveragingOptions


class BufferSync:
    """The buffers of a model, synced over `process_group` (default: the world; a torchft quorum's group,
    which torch.distributed did not create, is used through its own methods)."""

    def __init__(self, named_buffers: List[tuple], options: AveragingOptions, process_group: Optional[dist.ProcessGroup] = None):
        averaged = [
            (name, torch.view_as_real(b) if b.is_complex() else b)
            for name, b in named_buffers
            if b.is_floating_point() or b.is_complex()
        ]
        self.tensors = [b for _, b in named_buffers]
        self.integer = [b for _, b in named_buffers if not (b.is_floating_point() or b.is_complex())]
        self.process_group = process_group
        self.averager = (
            ParameterAverager.with_options(
                [b for _, b in averaged], options, names=[n for n, _ in averaged], process_group=process_group
            )
            if averaged
            else None
        )

    @torch.no_grad()
    def sync(self) -> None:
        if self.averager is not None:
            self.averager.average_without_check()
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for b in self.integer:
            by_device.setdefault(b.device, []).append(b)
        for buffers in by_device.values():
            # One int64 message per device; every integer dtype fits in int64 exactly.
            flat = torch.cat([b.reshape(-1).to(torch.int64) for b in buffers])
            if self.process_group is None:
                dist.broadcast(flat, src=0)
            else:
                options = dist.BroadcastOptions()
                options.rootRank = 0
                self.process_group.broadcast([flat], options).wait()
            offset = 0
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
