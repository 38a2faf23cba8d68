# An Accelerate script in the pattern of Accelerate's examples/by_feature/local_sgd.py (training
# function, argparse, Accelerator with gradient accumulation, LocalSGD around the epoch loop, evaluation
# gathered across processes), with a small local model and synthetic data in place of BERT and GLUE
# downloads. It imports Accelerate's LocalSGD and knows nothing of localsgd_ext: the zero-edit drop-in
# test runs it as is, with and without `-m localsgd_ext.patch`.
import argparse

import torch
from accelerate import Accelerator, DistributedType
from accelerate.local_sgd import LocalSGD
from accelerate.utils import set_seed
from torch.optim import AdamW
from torch.utils.data import DataLoader, TensorDataset

EVAL_BATCH_SIZE = 32


def get_dataloaders(accelerator: Accelerator, batch_size: int = 16):
    generator = torch.Generator().manual_seed(42)
    features = torch.randn(512, 20, generator=generator)
    labels = (features[:, :5].sum(dim=1) > 0).long()
    train = TensorDataset(features[:384], labels[:384])
    evaluation = TensorDataset(features[384:], labels[384:])
    train_dataloader = DataLoader(train, shuffle=True, batch_size=batch_size, drop_last=True)
    eval_dataloader = DataLoader(evaluation, shuffle=False, batch_size=EVAL_BATCH_SIZE, drop_last=False)
    return train_dataloader, eval_dataloader


def training_function(config, args):
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    if accelerator.distributed_type == DistributedType.XLA and args.gradient_accumulation_steps > 1:
        raise NotImplementedError("LocalSGD is not supported on TPUs yet")
    local_sgd_steps = int(args.local_sgd_steps)
    lr, num_epochs, seed, batch_size = config["lr"], int(config["num_epochs"]), int(config["seed"]), int(config["batch_size"])

    set_seed(seed)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    model = model.to(accelerator.device)
    optimizer = AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=0.1, total_iters=len(train_dataloader) * num_epochs
    )
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )

    for epoch in range(num_epochs):
        model.train()
        with LocalSGD(
            accelerator=accelerator, model=model, local_sgd_steps=local_sgd_steps, enabled=local_sgd_steps is not None
        ) as local_sgd:
            for step, (inputs, targets) in enumerate(train_dataloader):
                with accelerator.accumulate(model):
                    outputs = model(inputs)
                    loss = torch.nn.functional.cross_entropy(outputs, targets)
                    accelerator.backward(loss)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                    local_sgd.step()

        model.eval()
        correct = total = 0
        for inputs, targets in eval_dataloader:
            with torch.no_grad():
                predictions = model(inputs).argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, targets))
            correct += (predictions == references).sum().item()
            total += references.numel()
        accelerator.print(f"epoch {epoch}: accuracy {correct / total:.6f}")

    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    accelerator.print(f"parameter checksum {checksum:.12e}")
    # Unlike Accelerate's example: release what holds the process group (the DDP-wrapped model) before
    # end_training() destroys it. A group still referenced at exit makes gloo's threads abort now and
    # then ("terminate called without an active exception"), whichever LocalSGD ran.
    del local_sgd
    accelerator.free_memory(model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    del model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    accelerator.end_training()


def main():
    parser = argparse.ArgumentParser(description="Simple example of a training script with LocalSGD.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true", help="If passed, will train on the CPU.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--local_sgd_steps", type=int, default=8, help="Number of local SGD steps or None to disable local SGD")
    args = parser.parse_args()
    config = {"lr": 2e-2, "num_epochs": 3, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
