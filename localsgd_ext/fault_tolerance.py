"""Averaging that survives a lost replica, on torchft's `Manager` (PyTorch's fault-tolerance library): each
sync runs in a quorum of the replicas alive now, averages through the compiled engine over the quorum's
process group, and commits only if every replica group agrees that it succeeded. torchft is an optional
dependency (`pip install localsgd_ext[ft]`); nothing here imports it."""

from __future__ import annotations

from typing import Any, Iterable, List, Optional

import torch
import torch.distributed as dist

from .averager import ParameterAverager
from .sharded import local_tensors

__all__ = ["ManagedAverager"]


class ManagedAverager:
    """
    Averages a fixed list of tensors across the replicas of a torchft `Manager`'s quorum, in place.

    Each `average()`: `manager.start_quorum()` (the lighthouse forms the quorum of the replicas alive now;
    a replica that is behind, e.g. restarted after a crash, is healed there from a healthy one through the
    state the Manager was given, as torchft does), then the average over the quorum's process group with
    the compiled engine (its buckets and checks; rebuilt when the quorum changed), then
    `manager.should_commit()`. If any replica group reports a failure (a peer lost during the collective,
    an error on this rank), the commit fails and this rank's tensors go back to their values before the
    sync: the local progress is kept and the next sync tries again, as torchft's own `LocalSGD` does. A
    replica healed in a quorum takes part in that quorum's average with the state it received.

    Args:
        params (`Iterable[torch.Tensor]`):
            The tensors to average (a replica group of one process: its whole model).
        manager (`torchft.Manager`):
            Created with `use_async_quorum=False` (the quorum must be ready before the average), and with
            the model's state registered (`load_state_dict`/`state_dict`) so that a rejoining replica heals.
        **averager_options:
            Passed to `ParameterAverager` (e.g. `bucket_cap_mb`, `check_finite`).
    """

    def __init__(self, params: Iterable[torch.Tensor], manager: Any, **averager_options: Any):
        self.params: List[torch.Tensor] = list(params)
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError(
                "manager must be created with use_async_quorum=False: the average needs the quorum's process "
                "group ready when it starts, got a Manager with use_async_quorum=True"
            )
        self.manager = manager
        self.averager_options = averager_options
        self._group: Optional[dist.ProcessGroup] = None
        self._averager: Optional[ParameterAverager] = None
        self.last_committed: Optional[bool] = None

    def _quorum_group(self) -> dist.ProcessGroup:
        """The quorum's c10d group. torchft rebuilds it at each reconfiguration behind its own wrapper, whose
        collectives run in Python; the engine takes the real group under it."""
        return self.manager._pg.parent

    @torch.no_grad()
    def average(self) -> bool:
        """One fault-tolerant sync (see the class docstring); whether it was committed."""
        self.manager.start_quorum()
        group = self._quorum_group()
        if group is not self._group or self._averager is None:
            self._averager = ParameterAverager(self.params, process_group=group, **self.averager_options)
            self._group = group
        tensors = local_tensors(self.params)
        before = [t.detach().clone() for t in tensors]
        try:
            self._averager.average()
            # The Manager may load a healthy replica's state into the tensors while it commits (a replica
            # healed at this step): the average is kept aside and written back once committed.
            result = [t.detach().clone() for t in tensors]
        except Exception as error:  # noqa: BLE001 - a failed average is reported, and the commit fails
            self.manager.report_error(error)
            result = None
        committed = bool(self.manager.should_commit()) and result is not None
        kept = result if committed and result is not None else before
        for tensor, values in zip(tensors, kept):
            tensor.copy_(values)
        self.last_committed = committed
        return committed
