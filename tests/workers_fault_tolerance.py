"""Rank-side bodies of the fault-tolerance tests: each rank is one replica group (one process) of a torchft
quorum formed by a real lighthouse the test runs; no torch.distributed default group."""

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from combination_reference import move
from rank_setup import snapshot

from localsgd_ext import ParameterAverager, QuantizedAverager
from localsgd_ext.fault_tolerance import ManagedAverager, single_process_replica_manager

SHAPES = [(40,), (3, 5)]
# What the harness sets for a torch.distributed job; a one-process replica group runs without them.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _manager(lighthouse: str, replica: int, params):
    def state_dict():
        return {"params": [p.clone() for p in params]}

    def load_state_dict(state):
        with torch.no_grad():
            for p, value in zip(params, state["params"]):
                p.copy_(value)

    return single_process_replica_manager(
        f"replica_{replica}", lighthouse, load_state_dict, state_dict, timeout=timedelta(seconds=20)
    )


def _then_fail(method):
    """An averager's `average` (or `finish_average`) that completes its collective, then fails on this rank."""

    def then_fail(self, *args, **kwargs):
        method(self, *args, **kwargs)
        raise RuntimeError("injected: this rank failed after the collective")

    return then_fail


def _fail_before_finishing(self, *args, **kwargs):
    """An averager's `finish_average` that fails on this rank before it takes the average in flight."""
    raise RuntimeError("injected: this rank failed while its average was in flight")


_average_then_fail = _then_fail(ParameterAverager.average)


_real_average = ParameterAverager.average


def replica_syncs(lighthouse: str, syncs: int, fail_at_sync: int, failing_replica: int):
    """`syncs` syncs through a ManagedAverager; before each, every tensor moves by this replica's own
    amounts. At sync `fail_at_sync` replica `failing_replica` fails right after the collective. Each sync's
    values before it, whether it committed, the values after it and the Manager's step."""
    replica = int(os.environ["RANK"])
    params = [torch.zeros(shape) for shape in SHAPES]
    manager = _manager(lighthouse, replica, params)
    averager = ManagedAverager(params, manager)
    records = []
    try:
        for sync in range(syncs):
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.add_(move(replica, sync, i, p.shape))
            before = snapshot(params)
            failing = sync == fail_at_sync and replica == failing_replica
            ParameterAverager.average = _average_then_fail if failing else _real_average
            try:
                committed = averager.average()
            finally:
                ParameterAverager.average = _real_average
            records.append({"before": before, "committed": committed, "after": snapshot(params), "step": manager.current_step()})
    finally:
        manager.shutdown(wait=False)
    return records


def replica_until_step(
    lighthouse: str,
    target_step: int,
    crashing_replica: int,
    crash_at_step: int,
    down_seconds: float,
    late_replica: int = -1,
    late_seconds: float = 0.0,
):
    """Syncs until the Manager's step reaches `target_step`, moving by this replica's own amounts before
    each sync (a pause after each, so that quorums keep forming while a replica is down). Replica
    `crashing_replica` crashes once its step reaches `crash_at_step`: its Manager stops, its tensors and
    step are lost; `down_seconds` later it starts again from zeros with a new Manager under the same
    replica id, and must be healed. The final values, and for the crashed replica the step it left at and
    the step it was healed to. Replica `late_replica` joins only `late_seconds` after the others started
    (an upscale), and records the step its first quorum healed it to."""
    import time

    replica = int(os.environ["RANK"])
    if replica == late_replica:
        time.sleep(late_seconds)
    params = [torch.zeros(shape) for shape in SHAPES]
    manager = _manager(lighthouse, replica, params)
    averager = ManagedAverager(params, manager)
    record = {"replica": replica}
    if replica == late_replica:
        averager.average()  # its first quorum heals it from one of the others
        record["joined_at"] = manager.current_step()
    sync = 0
    while manager.current_step() < target_step:
        with torch.no_grad():
            for i, p in enumerate(params):
                p.add_(move(replica, sync, i, p.shape))
        averager.average()
        sync += 1
        if replica == crashing_replica and "left_at" not in record and manager.current_step() >= crash_at_step:
            record["left_at"] = manager.current_step()
            manager.shutdown(wait=False)
            time.sleep(down_seconds)
            with torch.no_grad():
                for p in params:
                    p.zero_()
            manager = _manager(lighthouse, replica, params)
            averager = ManagedAverager(params, manager)
            averager.average()  # the first quorum heals it, then it takes part
            record["healed_to"] = manager.current_step()
        time.sleep(0.3)
    record["final"] = snapshot(params)
    record["step"] = manager.current_step()
    manager.shutdown(wait=False)
    return record


def local_sgd_replica(
    lighthouse: str,
    steps: int,
    options: dict,
    crash_at_step: int,
    down_seconds: float,
    fail_at_step: int = -1,
    failure: str = "collective",
    timing: Optional[dict] = None,
):
    """LocalSGD(manager=..., **options) on a replica group of one process (no torch.distributed group:
    Accelerate's NO), plain SGD on this replica's own data, K = 2. At `fail_at_step`, replica 1's sync
    fails on this rank: `failure="collective"` right after its collective (a delayed one: before its merge
    takes the average), `"reported"` elsewhere in the step (an error reported to the Manager before
    `step()`, so the sync completes and the vote is no). With `crash_at_step` >= 0, replica 1 crashes after
    that step: its Manager stops and its model, optimizer and LocalSGD are lost; `down_seconds` later it
    starts again from a fresh model under the same replica id and goes on until it reaches `steps`.
    `timing`: `{"step_seconds": s}` sleeps after each step; `{"join_after": s}` starts replica 2 that much
    later than the others (a replica joining mid-run). Each step's parameters before and after `step()`,
    whether it synced, and the final counts."""
    replica = int(os.environ["RANK"])
    # Each replica group is its own one-process job (the harness gets its variables back for the result).
    saved = {name: os.environ.pop(name) for name in LAUNCH_VARIABLES if name in os.environ}
    try:
        scenario = dict(crash_at_step=crash_at_step, down_seconds=down_seconds, fail_at_step=fail_at_step, failure=failure)
        return _local_sgd_replica(replica, lighthouse, steps, options, **scenario, timing=timing or {})
    finally:
        os.environ.update(saved)


def _local_sgd_replica(replica, lighthouse, steps, options, crash_at_step, down_seconds, fail_at_step, failure, timing):
    import time

    from accelerate import Accelerator

    from localsgd_ext import LocalSGD

    accelerator = Accelerator(cpu=True)
    if replica == 2:
        time.sleep(timing.get("join_after", 0.0))

    def fresh():
        torch.manual_seed(0)  # every replica starts from the same model
        model = torch.nn.Linear(6, 3)
        if options.get("sync_buffers"):
            model = torch.nn.Sequential(model, torch.nn.BatchNorm1d(3))  # running statistics to sync
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        manager = _manager(lighthouse, replica, list(model.parameters()) + list(model.buffers()))
        local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, manager=manager, **options)
        return model, optimizer, manager, local_sgd

    model, optimizer, manager, local_sgd = fresh()
    initial = snapshot(model.parameters())
    generator = torch.Generator().manual_seed(replica)
    records, crashed = [], False
    local_sgd.__enter__()
    while local_sgd.num_steps < steps:
        x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        before, buffers_before = snapshot(model.parameters()), snapshot(model.buffers())
        failing = replica == 1 and local_sgd.num_steps + 1 == fail_at_step
        averager_class = QuantizedAverager if "wire" in options else ParameterAverager
        method = "finish_average" if options.get("sync_delay") else "average"  # where the sync completes
        real = getattr(averager_class, method)
        if failing and failure == "reported":
            manager.report_error(RuntimeError("injected: reported elsewhere in this replica's step"))
        elif failing:
            setattr(averager_class, method, _fail_before_finishing if method == "finish_average" else _then_fail(real))
        try:
            local_sgd.step()
        finally:
            setattr(averager_class, method, real)
        records.append(
            {
                "step": local_sgd.num_steps,
                "before": before,
                "after": snapshot(model.parameters()),
                "buffers_before": buffers_before,
                "buffers_after": snapshot(model.buffers()),
                "synced": local_sgd.last_step_synced,
            }
        )
        time.sleep(timing.get("step_seconds", 0.0))
        if replica == 1 and not crashed and local_sgd.num_steps == crash_at_step:
            crashed = True
            manager.shutdown(wait=False)
            time.sleep(down_seconds)
            model, optimizer, manager, local_sgd = fresh()
            local_sgd.__enter__()
    local_sgd.__exit__(None, None, None)
    result = {
        "initial": initial,
        "records": records,
        "final": snapshot(model.parameters()),
        "num_steps": local_sgd.num_steps,
        "sync_count": local_sgd.sync_count,
        "enabled": local_sgd.enabled,
        "anchor": local_sgd.state_dict().get("wire_anchor"),
    }
    manager.shutdown(wait=False)
    return result


def ddp_replica_group(lighthouse: str, steps: int, fail_at_step: int, wrapper: str = "ddp"):
    """Two replica groups of two processes each (ranks 0-1 and 2-3), each its own DDP job (or with
    `wrapper="fsdp2"`, FSDP2 sharding the model over the group's two ranks) with its own store and process
    group, and a Manager per process (`replica_group_manager`); LocalSGD(manager=...) with K = 2, every
    process on its own data. At `fail_at_step`, rank 3 (replica group 1's second
    process) fails right after that step's collective: the group's commit fails on both its ranks.
    Each step's parameters before and after `step()`, whether it synced, and the final counts."""
    import datetime
    import types

    from accelerate import DistributedType

    from localsgd_ext import LocalSGD
    from localsgd_ext.fault_tolerance import replica_group_manager

    rank = int(os.environ["RANK"])
    replica, local = divmod(rank, 2)
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=datetime.timedelta(seconds=30)
    )
    # Each replica group's own store (torchft keeps the group's manager address in it), found through the harness's.
    own_store = None
    if local == 0:
        own_store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        shared.set(f"replica_{replica}/port", str(own_store.port))
    port = int(shared.get(f"replica_{replica}/port"))
    store = own_store or dist.TCPStore("localhost", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    group_store = dist.PrefixStore("ddp", store)
    dist.init_process_group("gloo", store=group_store, rank=local, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)  # every process starts from the same model
        module = torch.nn.Linear(6, 4)
        if wrapper == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(module, mesh=init_device_mesh("cpu", (2,)))  # each rank holds half of each tensor
        else:
            model = torch.nn.parallel.DistributedDataParallel(module)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        # This rank's part of each parameter: all of it under DDP, its shard under FSDP2 (which the same rank of
        # the other group holds too, and heals it with).
        params = [p.to_local() if wrapper == "fsdp2" else p for p in model.parameters()]

        def state_dict():
            return {"params": [p.detach().clone() for p in params]}

        def load_state_dict(state):
            with torch.no_grad():
                for p, value in zip(params, state["params"]):
                    p.copy_(value)

        manager = replica_group_manager(
            f"replica_{replica}",
            lighthouse,
            load_state_dict,
            state_dict,
            timeout=timedelta(seconds=20),
            store_addr="localhost",
            store_port=port,
            rank=local,
            world_size=2,
        )
        accelerator = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)  # no world of 4: two jobs
        local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=2, manager=manager)
        generator = torch.Generator().manual_seed(rank)
        records = []
        with local_sgd:
            while local_sgd.num_steps < steps:
                x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 4, generator=generator)
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                before = snapshot(params)
                failing = rank == 3 and local_sgd.num_steps + 1 == fail_at_step
                ParameterAverager.average = _average_then_fail if failing else _real_average
                try:
                    local_sgd.step()
                finally:
                    ParameterAverager.average = _real_average
                records.append(
                    {
                        "step": local_sgd.num_steps,
                        "before": before,
                        "after": snapshot(params),
                        "synced": local_sgd.last_step_synced,
                    }
                )
        result = {"records": records, "final": snapshot(params), "sync_count": local_sgd.sync_count}
        manager.shutdown(wait=False)
        return result
    finally:
        dist.destroy_process_group()


def lighthouse_lost(steps_before: int):
    """Two single-process replicas with LocalSGD (K = 2) and a lighthouse process (torchft_lighthouse) that
    rank 0 starts and kills (SIGKILL) after its step `steps_before`; the next sync's error (or its absence)
    on each replica."""
    import datetime
    import socket
    import subprocess
    import sys

    replica = int(os.environ["RANK"])
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=datetime.timedelta(seconds=30)
    )
    server = None
    if replica == 0:
        with socket.socket() as probe:  # a free port for the lighthouse, as torchrun picks one
            probe.bind(("localhost", 0))
            port = probe.getsockname()[1]
        binary = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
        server = subprocess.Popen([binary, "--min_replicas", "2", "--bind", f"[::]:{port}"], stderr=subprocess.DEVNULL)
        shared.set("lighthouse", f"http://localhost:{port}")
    lighthouse = shared.get("lighthouse").decode()
    saved = {name: os.environ.pop(name) for name in LAUNCH_VARIABLES if name in os.environ}
    try:
        return _until_the_lighthouse_is_lost(replica, lighthouse, server, steps_before)
    finally:
        os.environ.update(saved)


def _until_the_lighthouse_is_lost(replica, lighthouse, server, steps_before):
    import time

    from accelerate import Accelerator

    from localsgd_ext import LocalSGD

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    manager = single_process_replica_manager(
        f"replica_{replica}",
        lighthouse,
        lambda state: [p.data.copy_(v) for p, v in zip(params, state["params"])],
        lambda: {"params": [p.detach().clone() for p in params]},
        timeout=timedelta(seconds=3),
    )
    local_sgd = LocalSGD(accelerator=Accelerator(cpu=True), model=model, local_sgd_steps=2, manager=manager)
    result = {"error": None}
    started = time.perf_counter()
    try:
        with local_sgd:
            while local_sgd.num_steps < steps_before + 4:
                torch.nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 3)).backward()
                optimizer.step()
                optimizer.zero_grad()
                local_sgd.step()
                if local_sgd.num_steps == steps_before and server is not None:
                    time.sleep(0.5)  # both replicas are past this step's quorum
                    server.kill()
                    server.wait()
                    started = time.perf_counter()
                elif local_sgd.num_steps == steps_before:
                    started = time.perf_counter()
    except RuntimeError as error:
        result = {"error": str(error), "at_step": local_sgd.num_steps, "seconds": time.perf_counter() - started}
    finally:
        if server is not None and server.poll() is None:
            server.kill()
    manager.shutdown(wait=False)
    return result
