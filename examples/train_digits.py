"""Local SGD training of a small MLP on scikit-learn's bundled digits data set (no download), with
Accelerate and localsgd_ext's LocalSGD, on CPU ranks joined by gloo.

    torchrun --standalone --nproc-per-node 2 examples/train_digits.py
    torchrun --standalone --nproc-per-node 4 examples/train_digits.py --hierarchy 2:2   # pairs every 2 steps

Rank 0 shows a progress bar with the loss and the latest parameter-averaging time, then a line per
epoch (training loss, test accuracy) and a summary of the averaging latency.
"""

import argparse
import statistics
import time

import torch
from accelerate import Accelerator
from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from localsgd_ext import LocalSGD


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training digits")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size per process")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9, cosine schedule)")
    parser.add_argument("--hidden", type=int, default=512, help="width of the MLP's two hidden layers")
    parser.add_argument("--local-sgd-steps", type=int, default=8, help="local steps between parameter averages")
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step (Accelerate's)"
    )
    parser.add_argument("--bucket-cap-mb", type=float, default=25, help="largest all_reduce bucket, in MiB")
    parser.add_argument(
        "--zero-copy", action="store_true", help="keep the parameters in flat buffers, so a sync is only the all_reduce"
    )
    parser.add_argument(
        "--wire",
        choices=["fp32", "bf16", "fp16", "int8", "fp8", "int4"],
        default="fp32",
        help="what travels: the parameters (fp32, or cast to bf16/fp16), or each rank's change quantized (int8, fp8, int4)",
    )
    parser.add_argument("--sync-delay", type=int, default=0, help="overlap each sync with this many local steps")
    parser.add_argument("--fragments", type=int, default=1, help="Streaming DiLoCo's fragments, synced in turn")
    parser.add_argument(
        "--outer-optimizer",
        choices=["none", "diloco"],
        default="none",
        help="DiLoCo's outer step on the averaged change (Nesterov SGD, lr 0.7, momentum 0.9)",
    )
    parser.add_argument(
        "--implementation",
        choices=["localsgd_ext", "accelerate"],
        default="localsgd_ext",
        help="whose LocalSGD averages the parameters (to compare the two)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hierarchy",
        nargs="+",
        default=[],
        metavar="SIZE:PERIOD",
        help="hierarchical averaging: groups of SIZE consecutive ranks (a node) also average every PERIOD steps",
    )
    parser.add_argument("--save-params", metavar="PATH", help="rank 0 saves the final parameters here (torch.save)")
    args = parser.parse_args()
    try:
        args.hierarchy = {int(size): int(period) for size, period in (level.split(":") for level in args.hierarchy)}
    except ValueError:
        parser.error(f"--hierarchy takes SIZE:PERIOD pairs of ints, got {args.hierarchy}")
    args.options = local_sgd_options(args)
    if args.options and args.implementation == "accelerate":
        parser.error(f"Accelerate's LocalSGD has none of {sorted(args.options)}; drop them or use --implementation localsgd_ext")
    return args


def local_sgd_options(args) -> dict:
    """Our LocalSGD's keyword options, from the flags that differ from their defaults."""
    options = {}
    if args.hierarchy:
        options["hierarchy"] = args.hierarchy
    if args.zero_copy:
        options["zero_copy"] = True
    if args.wire != "fp32":
        options["wire"] = args.wire
    if args.sync_delay:
        options["sync_delay"] = args.sync_delay
    if args.fragments != 1:
        options["num_fragments"] = args.fragments
    if args.outer_optimizer != "none":
        options["outer_optimizer"] = args.outer_optimizer
    return options


def digits_data(seed: int):
    digits = load_digits()
    features = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_x, test_x, train_y, test_y = train_test_split(features, labels, test_size=0.2, random_state=seed, stratify=labels)
    return TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)


def make_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


@torch.no_grad()
def accuracy(model, dataset) -> float:
    x, y = dataset.tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


class TimedAccelerateLocalSGD(AccelerateLocalSGD):
    """Accelerate's LocalSGD, timing each averaging the way ours reports it."""

    last_sync_seconds = None

    def _sync_and_avg_model_params(self):
        start = time.perf_counter()
        super()._sync_and_avg_model_params()
        self.last_sync_seconds = time.perf_counter() - start


def synced_so_far(local_sgd, args) -> int:
    """Syncs completed so far: ours counts them (fragments and delayed merges included); Accelerate's syncs
    every local_sgd_steps steps while enabled."""
    if hasattr(local_sgd, "sync_count"):
        return local_sgd.sync_count
    return local_sgd.num_steps // args.local_sgd_steps if local_sgd.enabled else 0


def main():
    args = parse_args()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.gradient_accumulation_steps)
    torch.manual_seed(args.seed)
    train_set, test_set = digits_data(args.seed)
    model = make_model(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    steps_per_epoch = len(train_loader) // accelerator.num_processes + 1
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"{accelerator.num_processes} processes ({accelerator.distributed_type}), {args.implementation} LocalSGD, "
        f"local_sgd_steps={args.local_sgd_steps}, {n_params:,} parameters in "
        f"{len(list(model.parameters()))} tensors, {len(train_set)} training digits"
    )
    if accelerator.num_processes == 1:
        accelerator.print("one process: Local SGD has nothing to average (launch several with torchrun --nproc-per-node N)")
    local_sgd_cls = LocalSGD if args.implementation == "localsgd_ext" else TimedAccelerateLocalSGD
    sync_seconds = []  # every sync of the run, for the summary
    level_seconds = {size: [] for size in args.hierarchy}
    for epoch in range(args.epochs):
        model.train()
        losses = []
        epoch_sync_seconds = []
        progress = tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_main_process, leave=False
        )
        with local_sgd_cls(
            accelerator=accelerator, model=model, local_sgd_steps=args.local_sgd_steps, enabled=True, **args.options
        ) as local_sgd:
            for x, y in progress:
                with accelerator.accumulate(model):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    level_counts = dict(getattr(local_sgd, "level_sync_counts", {}))
                    syncs_before = synced_so_far(local_sgd, args)
                    local_sgd.step()
                for size, count in getattr(local_sgd, "level_sync_counts", {}).items():
                    if count > level_counts[size]:
                        level_seconds[size].append(local_sgd.last_sync_seconds)
                losses.append(loss.item())
                if synced_so_far(local_sgd, args) > syncs_before and local_sgd.last_sync_seconds is not None:
                    epoch_sync_seconds.append(local_sgd.last_sync_seconds)
                    progress.set_postfix(loss=f"{loss.item():.3f}", sync_ms=f"{1e3 * epoch_sync_seconds[-1]:.2f}", refresh=False)
        if local_sgd.last_sync_seconds is not None and accelerator.num_processes > 1:
            epoch_sync_seconds.append(local_sgd.last_sync_seconds)  # the averaging at the end of the block
        sync_seconds += epoch_sync_seconds
        model.eval()
        # Every rank holds the same parameters after the closing average, so any rank can evaluate.
        test_accuracy = accuracy(accelerator.unwrap_model(model), test_set)
        mean_loss = torch.tensor(statistics.fmean(losses))
        mean_loss = accelerator.reduce(mean_loss, reduction="mean").item()
        averaging = (
            f"averaging median {1e3 * statistics.median(epoch_sync_seconds):.2f} ms over {len(epoch_sync_seconds)} syncs"
            if epoch_sync_seconds
            else "nothing averaged"
        )
        accelerator.print(f"epoch {epoch + 1}: train loss {mean_loss:.4f}  test accuracy {100 * test_accuracy:.1f}%  {averaging}")

    ms = sorted(1e3 * s for s in sync_seconds)
    if ms:
        accelerator.print(
            f"done: test accuracy {100 * test_accuracy:.1f}%; parameter averaging ({args.implementation}) per sync: "
            f"median {statistics.median(ms):.2f} ms, min {ms[0]:.2f} ms, max {ms[-1]:.2f} ms over {len(ms)} syncs"
        )
    else:
        accelerator.print(f"done: test accuracy {100 * test_accuracy:.1f}%; nothing averaged (one process)")
    for size, seconds in level_seconds.items():
        if seconds:
            accelerator.print(
                f"level of {size} ranks: median {1e3 * statistics.median(seconds):.2f} ms over {len(seconds)} averages"
            )
    if args.save_params and accelerator.is_main_process:
        torch.save([p.detach().clone() for p in accelerator.unwrap_model(model).parameters()], args.save_params)
    # Release what holds the process group (the DDP-wrapped model) before destroying it, so no gloo
    # thread outlives it at interpreter exit.
    del local_sgd
    accelerator.free_memory(model, optimizer, train_loader, scheduler)
    del model, optimizer, train_loader, scheduler
    accelerator.end_training()


if __name__ == "__main__":
    main()
