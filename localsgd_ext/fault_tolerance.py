"""Averaging that survives a lost replica, on torchft's `Manager` (PyTorch's fault-tolerance library): each
sync runs in a quorum of the replicas alive now, averages through the compiled engine over the quorum's
process group, and is committed, or rolled back on a replica whose sync failed (that replica is healed at
the next quorum). torchft is an optional dependency (`pip install localsgd_ext[ft]`); only
`replica_group_manager` imports it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Iterable, List, Optional

import torch
import torch.distributed as dist

from .averager import ParameterAverager
from .sharded import local_tensors

__all__ = ["Commit", "ManagedAverager", "Quorum", "Rollback", "replica_group_manager", "single_process_replica_manager"]


class Quorum:
    """A torchft Manager around one sync: `start()` forms the quorum of the replicas alive now (a replica
    that is behind, e.g. restarted after a crash, is healed there from a healthy one through the state the
    Manager was given, as torchft does) and holds its process group in `group`; `run()` averages and
    commits, or rolls back.

    Args:
        manager (`torchft.Manager`):
            Created with `use_async_quorum=False` (the quorum must be ready before the average).
    """

    def __init__(self, manager: Any):
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError(
                "manager must be created with use_async_quorum=False: the average needs the quorum's process "
                "group ready when it starts, got a Manager with use_async_quorum=True"
            )
        self.manager = manager
        self.group: Optional[dist.ProcessGroup] = None

    def start(self) -> bool:
        """Forms the quorum; whether its process group is a new one (the averagers must be rebuilt over it).
        torchft rebuilds the group at each reconfiguration behind its own wrapper, whose collectives run in
        Python; the engine takes the real c10d group under it."""
        try:
            self.manager.start_quorum()
        except Exception as error:
            raise RuntimeError(
                "LocalSGD: no torchft quorum could be formed for this sync: the lighthouse is unreachable, fewer "
                "replicas than the Manager's min_replica_size joined within its quorum timeout, or healing this "
                "replica in it failed (see the cause). Restart the lighthouse (and any replica that stopped): a "
                f"replica that rejoins is healed from the others' state. Cause: {error}"
            ) from error
        group = self.manager._pg.parent
        changed = group is not self.group
        self.group = group
        return changed

    def commit(self) -> "Commit":
        """This quorum's commit, to be decided once the average it started has completed."""
        return Commit(self.manager)

    def run(self, tensors: List[torch.Tensor], average: Callable[[], None]) -> bool:
        """`average()` (in place, over `tensors`), then the commit, which torchft decides per replica group
        (every rank of this group must report success). Committed: the tensors hold the average. Not (a peer
        lost during the collective, an error on this rank): they go back to their values before the sync, so
        the local progress is kept, as torchft's own `LocalSGD` does; the replicas that committed are ahead,
        and this one is healed from them at the next quorum. The Manager may load a healthy replica's state into
        them while it commits: the average is kept aside and written back."""
        before = Rollback(tensors)
        commit = self.commit()
        result: Optional[Rollback] = None
        try:
            average()
            result = Rollback(tensors)
        except Exception as error:  # noqa: BLE001 - a failed average is reported, and the commit fails
            commit.fail(error)
        committed = commit() and result is not None
        (result if committed and result is not None else before).restore()
        return committed


class Rollback:
    """Tensors' values kept aside, to be put back into them: the state before a sync whose commit may fail."""

    def __init__(self, tensors: List[torch.Tensor]):
        self.tensors = tensors
        self.values = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, values in zip(self.tensors, self.values):
            tensor.copy_(values)


class Commit:
    """torchft's two-phase commit of one quorum's sync, decided once (`should_commit()` at the first call):
    an overlapped sync started in the quorum asks it when its average has arrived, steps later. An error
    reported before (`fail`) makes this replica's vote a no."""

    def __init__(self, manager: Any):
        self.manager = manager
        self.failed = False
        self.decision: Optional[bool] = None

    def fail(self, error: BaseException) -> None:
        """Reports `error` to the Manager (before the decision; a later one is this rank's to raise)."""
        if self.decision is None:
            self.manager.report_error(error)
            self.failed = True

    def __call__(self) -> bool:
        if self.decision is None:
            self.decision = bool(self.manager.should_commit()) and not self.failed
        return self.decision


class ManagedAverager:
    """
    Averages a fixed list of tensors across the replicas of a torchft `Manager`'s quorum, in place: each
    `average()` forms the quorum, averages over its process group with the compiled engine (its buckets and
    checks; rebuilt when the quorum changed) and commits, or rolls this rank back (see `Quorum`). A replica
    healed in a quorum takes part in that quorum's average with the state it received.

    Args:
        params (`Iterable[torch.Tensor]`):
            The tensors to average (a replica group of one process: its whole model).
        manager (`torchft.Manager`):
            Created with `use_async_quorum=False`, and with the model's state registered
            (`load_state_dict`/`state_dict`) so that a rejoining replica heals.
        **averager_options:
            Passed to `ParameterAverager` (e.g. `bucket_cap_mb`, `check_finite`).
    """

    def __init__(self, params: Iterable[torch.Tensor], manager: Any, **averager_options: Any):
        self.params: List[torch.Tensor] = list(params)
        self.quorum = Quorum(manager)
        self.manager = manager
        self.averager_options = averager_options
        self._averager: Optional[ParameterAverager] = None
        self.last_committed: Optional[bool] = None

    def average(self) -> bool:
        """One fault-tolerant sync; whether it was committed."""
        if self.quorum.start() or self._averager is None:
            self._averager = ParameterAverager(self.params, process_group=self.quorum.group, **self.averager_options)
        averager = self._averager
        self.last_committed = self.quorum.run(local_tensors(self.params), averager.average)
        return self.last_committed


def replica_group_manager(
    replica_id: str,
    lighthouse: Optional[str],
    load_state_dict: Callable[[Any], None],
    state_dict: Callable[[], Any],
    min_replicas: int = 2,
    timeout: timedelta = timedelta(seconds=60),
    init_sync: bool = False,
    store_addr: Optional[str] = None,
    store_port: Optional[int] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Any:
    """A torchft `Manager` for this process of a replica group of `world_size` processes (e.g. a DDP or FSDP2
    group started by torchrun): a gloo process group for the quorum (each rank of the group averages with
    the same rank of the other groups), the quorum ready before each sync (`use_async_quorum=False`).

    Args:
        replica_id (`str`): the replica group's name, the same after a restart (so that it is healed, not new),
            ending in its number (torchft numbers the quorum's ranks from it), e.g. `"replica_3"`.
        lighthouse (`str`): the lighthouse's address, e.g. `"http://host:29510"`; None: `TORCHFT_LIGHTHOUSE`.
        load_state_dict, state_dict (`Callable`): the model's and optimizer's state, sent to and loaded by a
            replica that heals.
        min_replicas (`int`, defaults to 2): the fewest replica groups a sync may commit with.
        timeout (`timedelta`, defaults to 60 s): for the quorum, the commit and the collectives.
        init_sync (`bool`, defaults to `False`): torchft's option to copy one replica's state to the others in
            the first quorum. Off: the first quorum is LocalSGD's first sync, after `local_sgd_steps` local
            steps, and copying would throw the other replicas' steps away. Start every replica from the
            same model instead (the same seed), as DDP does.
        store_addr, store_port (*optional*): a TCPStore of this replica group alone (torchft keeps the group's
            manager address in it); default `MASTER_ADDR`/`MASTER_PORT`, torchrun's.
        rank, world_size (`int`, *optional*): this process's rank in the replica group and the group's size;
            default `RANK`/`WORLD_SIZE`.
    """
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    return Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        min_replica_size=min_replicas,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=replica_id,
        store_addr=store_addr,
        store_port=store_port,
        rank=rank,
        world_size=world_size,
        lighthouse_addr=lighthouse,
        port=0,
        timeout=timeout,
        quorum_timeout=timeout,
        use_async_quorum=False,
        init_sync=init_sync,
    )


def single_process_replica_manager(
    replica_id: str,
    lighthouse: str,
    load_state_dict: Callable[[Any], None],
    state_dict: Callable[[], Any],
    min_replicas: int = 2,
    timeout: timedelta = timedelta(seconds=60),
    init_sync: bool = False,
) -> Any:
    """`replica_group_manager` for a replica group of one process, with its own store on this host (kept
    alive with the Manager); the arguments are the same."""
    store = dist.TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False)
    manager = replica_group_manager(
        replica_id,
        lighthouse,
        load_state_dict,
        state_dict,
        min_replicas=min_replicas,
        timeout=timeout,
        init_sync=init_sync,
        store_addr="localhost",
        store_port=store.port,
        rank=0,
        world_size=1,
    )
    manager.localsgd_store = store  # the Manager connects to it for as long as it lives
    return manager
