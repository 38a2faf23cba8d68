"""A manual check for the fault-tolerance work: two replicas (processes) form a quorum through a real torchft
lighthouse, and our compiled engine averages over the Manager's reconfigurable gloo group (float and int8
wires), then commits. Needs torchft (pip install torchft==0.2.0 opentelemetry-api opentelemetry-sdk
opentelemetry-exporter-otlp-proto-http); prints each replica's averaged values and whether it committed.

    python scripts/torchft_quorum_check.py
"""

import multiprocessing
from datetime import timedelta


def replica(index: int, lighthouse: str, results) -> None:
    import torch

    from localsgd_ext import ParameterAverager, QuantizedAverager
    from localsgd_ext.fault_tolerance import single_process_replica_manager

    manager = single_process_replica_manager(
        str(index), lighthouse, lambda state: None, lambda: {}, timeout=timedelta(seconds=10)
    )
    try:
        manager.start_quorum()
        group = manager._pg.parent  # the quorum's c10d group, rebuilt at each reconfiguration
        floats = [torch.full((1000,), float(index + 1))]
        ParameterAverager(floats, process_group=group).average()
        quantized = [torch.linspace(-1, 1, 4096)]  # the same anchor on every replica
        averager = QuantizedAverager(quantized, process_group=group, wire="int8")
        averager.rebase_anchor()
        quantized[0].add_(0.01 * (index + 1))
        averager.average()
        committed = manager.should_commit()
        results.put((index, float(floats[0][0]), float(quantized[0][0]), committed, manager.num_participants()))
    finally:
        manager.shutdown(wait=False)


def main() -> None:
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=replica, args=(i, lighthouse.address(), results)) for i in range(2)]
    for process in processes:
        process.start()
    for _ in processes:
        index, mean, first, committed, participants = results.get(timeout=120)
        print(
            f"replica {index}: float mean {mean} (expected 1.5), int8 first element {first:.6f} (exact -0.985), "
            f"committed {committed}, {participants} participants"
        )
    for process in processes:
        process.join(30)
    lighthouse.shutdown()


if __name__ == "__main__":
    main()
