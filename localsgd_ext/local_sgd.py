"""`LocalSGD`: Accelerate's context manager, with the averaging done by the compiled engine."""

from __future__ import annotations

import numbers
import time
from typing import List, Optional

import torch
from accelerate import Accelerator, DistributedType

from .averager import ParameterAverager, _check_bool, _check_bucket_cap_mb

__all__ = ["LocalSGD"]

# Accelerate 1.15's list, in its order; getattr keeps older Accelerate versions importable.
_SUPPORTED_DISTRIBUTED_TYPES = tuple(
    getattr(DistributedType, name)
    for name in (
        "NO",
        "MULTI_CPU",
        "MULTI_GPU",
        "MULTI_XPU",
        "MULTI_MLU",
        "MULTI_HPU",
        "MULTI_SDAA",
        "MULTI_MUSA",
        "MULTI_NPU",
        "MULTI_NEURON",
    )
    if hasattr(DistributedType, name)
)


def _check_local_sgd_steps(local_sgd_steps, enabled):
    # Accelerate's own example passes local_sgd_steps=None together with enabled=False.
    if local_sgd_steps is None and not enabled:
        return None
    if isinstance(local_sgd_steps, bool) or not isinstance(local_sgd_steps, numbers.Integral):
        raise TypeError(
            f"local_sgd_steps must be an int >= 1 (None only with enabled=False), got {local_sgd_steps!r} "
            f"({type(local_sgd_steps).__name__})"
        )
    if local_sgd_steps < 1:
        raise ValueError(f"local_sgd_steps must be an int >= 1, got {local_sgd_steps}")
    return int(local_sgd_steps)


class LocalSGD:
    """
    A drop-in for `accelerate.local_sgd.LocalSGD`: runs `local_sgd_steps` updates independently on each
    process (gradient sync off through `model.no_sync()`), then averages the model's parameters across
    processes; also averages once more when the `with` block ends.

    The API and semantics are Accelerate 1.15's: the same constructor, attributes, `step()` counting and
    `DistributedType` checks, disabled under `DistributedType.NO`. The averaging itself runs in the
    compiled engine (`ParameterAverager`): bucketed, packed in one pass, one all_reduce per bucket,
    results bit-identical to Accelerate's on gloo. Parameters are updated in place, so they stay the
    same `Parameter` objects with the same storage (Accelerate rebinds `param.data` to a new tensor).

    Stricter than Accelerate: arguments are validated (`local_sgd_steps` an int >= 1, or None when
    disabled; `enabled` a bool; `model` an `nn.Module`; parameters dense, floating, not meta); on enter
    and at every sync, all ranks check they hold the same parameter layout and raise the same
    `RuntimeError` if not; and when the `with` block raises, its exception propagates without the
    final average (Accelerate averages anyway, which can hang when other ranks are not there to join).

    Differences, all additive: `accelerator`, `model` and `local_sgd_steps` are set even when disabled;
    no barrier precedes the averaging (the all_reduce already synchronizes); `sync_count` and
    `last_sync_seconds` report the averaging (host time of the last sync: on CUDA the time to queue it,
    since the sync, like any collective, returns before the GPU has finished).

    Args:
        accelerator (`Accelerator`):
            Accelerator object.
        model (`torch.nn.Module`):
            The model whose parameters we need to average.
        local_sgd_steps (`int`):
            A number of local SGD steps (before model parameters are synchronized).
        enabled (`bool`, defaults to `True`):
            Local SGD is disabled if this parameter set to `False`.
        bucket_cap_mb (`float`, defaults to 25):
            Keyword-only. Largest all_reduce bucket, in MiB.
        check_finite (`bool`, defaults to `False`):
            Keyword-only. Before each average, check the parameters for NaN and Inf; if any rank finds
            one, every rank raises a `RuntimeError` naming the rank and the parameter.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        local_sgd_steps: int,
        enabled: bool = True,
        *,
        bucket_cap_mb: float = 25,
        check_finite: bool = False,
    ):
        if accelerator.distributed_type not in _SUPPORTED_DISTRIBUTED_TYPES:
            raise NotImplementedError("LocalSGD is supported only for CPUs and GPUs (no DeepSpeed or MegatronLM)")
        _check_bool("enabled", enabled)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.enabled = enabled and accelerator.distributed_type != DistributedType.NO
        self.num_steps = 0
        self.accelerator = accelerator
        self.model = model
        self.local_sgd_steps = _check_local_sgd_steps(local_sgd_steps, enabled)
        self.bucket_cap_mb = _check_bucket_cap_mb(bucket_cap_mb)
        self.check_finite = _check_bool("check_finite", check_finite)
        self.sync_count = 0
        self.last_sync_seconds: Optional[float] = None
        self._averager: Optional[ParameterAverager] = None

    def __enter__(self):
        if self.enabled:
            # Refuse bad parameters, and ranks whose models differ, before any training happens.
            self._current_averager().verify_ranks_agree()
            self.model_sync_obj = self.model.no_sync()
            self.model_sync_obj.__enter__()

        return self

    def __exit__(self, type, value, tb):
        if self.enabled:
            try:
                if type is None:
                    # Average all models on exit; not after an exception, which other ranks may not share.
                    self._sync_and_avg_model_params()
            finally:
                self.model_sync_obj.__exit__(type, value, tb)

    def step(self):
        """
        This function makes a "step" and synchronizes model parameters if necessary.
        """
        self.num_steps += 1
        if not self.enabled:
            return

        if self.num_steps % self.local_sgd_steps == 0:
            self._sync_and_avg_model_params()

    def _current_averager(self) -> ParameterAverager:
        # Accelerate walks model.parameters() at every sync; so do we, and re-plan only if the set of
        # parameter objects changed (size/dtype/device changes are caught by the engine itself).
        params: List[torch.nn.Parameter] = list(self.model.parameters())
        averager = self._averager
        if averager is None or len(averager.params) != len(params) or any(
            a is not b for a, b in zip(averager.params, params)
        ):
            names = [name for name, _ in self.model.named_parameters()]
            averager = ParameterAverager(
                params, bucket_cap_mb=self.bucket_cap_mb, names=names, check_finite=self.check_finite
            )
            self._averager = averager
        return averager

    def _sync_and_avg_model_params(self):
        """
        Synchronize + Average model parameters across all processes
        """
        start = time.perf_counter()
        self._current_averager().average()
        self.last_sync_seconds = time.perf_counter() - start
        self.sync_count += 1
