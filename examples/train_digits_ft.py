"""Fault-tolerant Local SGD on the digits MLP: one replica per process, joined by torchft's lighthouse
instead of torchrun, so that a replica can die and come back while the others train on.

    torchft_lighthouse --min_replicas 2 --join_timeout_ms 2000 &           # prints its address
    python examples/train_digits_ft.py --replica-id 0 --lighthouse http://HOST:29510 &
    python examples/train_digits_ft.py --replica-id 1 --lighthouse http://HOST:29510 &
    # kill -9 either one at any time, start it again with the same command: it is healed at its next sync

Each replica trains on its own shard of the training digits (`--replica-id` of `--replicas`), averages
every `--local-sgd-steps` steps in a quorum of the replicas alive (LocalSGD's `manager=`), and prints a
line per sync: its step, the quorum's size, whether the sync committed, and its loss. Needs the `ft`
extra (pip install 'localsgd_ext[ft]').
"""

import argparse
import time

import torch
from accelerate import Accelerator
from train_digits import digits_data, make_model

from localsgd_ext import LocalSGD
from localsgd_ext.fault_tolerance import single_process_replica_manager


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replica-id", type=int, required=True, help="this replica's number, 0 .. replicas - 1")
    parser.add_argument("--replicas", type=int, default=2, help="replicas the training data is split between")
    parser.add_argument("--lighthouse", required=True, help="the lighthouse's address (http://host:port)")
    parser.add_argument("--min-replicas", type=int, default=2, help="the fewest replicas a sync may commit with")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps to train (the cadence resumes on heal)")
    parser.add_argument("--local-sgd-steps", type=int, default=8, help="local steps between parameter averages")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--outer-optimizer", choices=["none", "diloco"], default="none")
    wires = ["fp32", "bf16", "fp16", "int8", "fp8", "int4"]
    parser.add_argument("--wire", choices=wires, default="fp32", help="what a sync sends")
    parser.add_argument("--error-feedback", action="store_true", help="keep what the quantized wire left out")
    parser.add_argument("--sync-delay", type=int, default=0, help="local steps a sync overlaps (committed when merged)")
    parser.add_argument("--merge", choices=["eager", "streaming"], default="eager", help="how an overlapped sync is merged")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step, to slow a demo down")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(0)  # the same initial model on every replica
    train, test = digits_data(0)
    x, y = train.tensors
    shard = slice(args.replica_id, None, args.replicas)
    x, y = x[shard], y[shard]
    accelerator = Accelerator(cpu=True)
    model = make_model(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    def state_dict():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(state):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    manager = single_process_replica_manager(
        f"digits_{args.replica_id}", args.lighthouse, load_state_dict, state_dict, min_replicas=args.min_replicas
    )
    outer = None if args.outer_optimizer == "none" else args.outer_optimizer
    generator = torch.Generator().manual_seed(args.replica_id)
    started = time.perf_counter()
    with LocalSGD(
        accelerator=accelerator,
        model=model,
        local_sgd_steps=args.local_sgd_steps,
        manager=manager,
        outer_optimizer=outer,
        wire=args.wire,
        error_feedback=args.error_feedback,
        sync_delay=args.sync_delay,
        merge=args.merge,
    ) as local_sgd:
        while local_sgd.num_steps < args.steps:
            batch = torch.randint(len(x), (args.batch_size,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            synced_before = local_sgd.sync_count
            local_sgd.step()
            # At each sync point, and at each step that completed a sync (with sync_delay, its merge).
            if local_sgd.num_steps % args.local_sgd_steps == 0 or local_sgd.sync_count > synced_before:
                print(
                    f"replica {args.replica_id} step {local_sgd.num_steps} quorum {manager.num_participants()} "
                    f"committed {local_sgd.sync_count > synced_before} loss {loss.item():.4f} "
                    f"t {time.perf_counter() - started:.2f}",
                    flush=True,
                )
            time.sleep(args.step_seconds)
    with torch.no_grad():
        test_x, test_y = test.tensors
        accuracy = (model(test_x).argmax(dim=1) == test_y).float().mean().item()
        final_loss = torch.nn.functional.cross_entropy(model(x), y).item()
    print(
        f"replica {args.replica_id} done: steps {local_sgd.num_steps} syncs {local_sgd.sync_count} "
        f"train loss {final_loss:.4f} test accuracy {accuracy:.4f} seconds {time.perf_counter() - started:.2f}",
        flush=True,
    )
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
