"""`sync_buffers=True`: a model's buffers at each sync. Floating-point ones (BatchNorm's running mean and
variance) are averaged like the parameters, by the compiled engine, and complex ones (rotary
embeddings' `freqs_cis`) as pairs of reals, through a real view of the same memory; integer and bool
ones (`num_batches_tracked`) cannot be averaged meaningfully, so every rank takes rank 0's, in one
broadcast per device. The buffers' layout is part of LocalSGD's agreement check, so this runs unchecked."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from .averager import ParameterAverager
from .options import AveragingOptions


class BufferSync:
    def __init__(self, named_buffers: List[tuple], options: AveragingOptions):
        averaged = [
            (name, torch.view_as_real(b) if b.is_complex() else b)
            for name, b in named_buffers
            if b.is_floating_point() or b.is_complex()
        ]
        self.integer = [b for _, b in named_buffers if not (b.is_floating_point() or b.is_complex())]
        self.averager = (
            ParameterAverager.with_options([b for _, b in averaged], options, names=[n for n, _ in averaged])
            if averaged
            else None
        )

    @torch.no_grad()
    def sync(self) -> None:
        if self.averager is not None:
            self.averager._average_unchecked()
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for b in self.integer:
            by_device.setdefault(b.device, []).append(b)
        for buffers in by_device.values():
            # One int64 message per device; every integer dtype fits in int64 exactly.
            flat = torch.cat([b.reshape(-1).to(torch.int64) for b in buffers])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
