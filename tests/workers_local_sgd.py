"""Rank-side bodies of the LocalSGD tests: the same seeded training run with Accelerate's LocalSGD and
with ours, inside one real Accelerator on gloo (run through multiprocess.run_ranks)."""

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD
from accelerate.utils import InitProcessGroupKwargs
from rank_setup import group_timeout
from torch.utils.data import DataLoader, TensorDataset

from localsgd_ext import LocalSGD

SCENARIOS = {
    "base": dict(local_sgd_steps=4, batches=12),
    "grad_accum_2": dict(local_sgd_steps=3, batches=12, grad_accum=2),
    "steps_not_dividing_batches": dict(local_sgd_steps=4, batches=10),
    "two_epochs_new_context": dict(local_sgd_steps=3, batches=7, epochs=2),
    "two_epochs_same_object": dict(local_sgd_steps=3, batches=7, epochs=2, reuse_object=True),
    "fp32_and_bf16": dict(local_sgd_steps=4, batches=12, bf16_head=True),
    "frozen_parameters": dict(local_sgd_steps=4, batches=12, freeze_first=True),
    "disabled": dict(local_sgd_steps=4, batches=12, enabled=False),
    "every_step": dict(local_sgd_steps=1, batches=6),
}

BATCH_SIZE = 4


class SmallNet(torch.nn.Module):
    def __init__(self, bf16_head: bool):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32))
        self.head = torch.nn.Linear(32, 4)
        self.head_dtype = torch.bfloat16 if bf16_head else torch.float32
        self.head.to(self.head_dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).to(self.head_dtype)).float()


def _accelerator(grad_accum: int, cpu: bool = True) -> Accelerator:
    """On CPU: gloo. With cpu=False on a GPU: NCCL (Accelerate picks it when LOCAL_RANK is set)."""
    return Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout())],
    )


def _train(accelerator, local_sgd_cls, scenario, check_ranks_agree: bool, **extra_kwargs):
    """One seeded run; returns final parameters, num_steps per epoch, and the sync points at which
    every rank held bit-identical parameters (when check_ranks_agree)."""
    torch.manual_seed(0)
    model = SmallNet(scenario.get("bf16_head", False))
    if scenario.get("freeze_first"):
        model.body[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    world = accelerator.num_processes
    n = scenario["batches"] * BATCH_SIZE * world
    data_gen = torch.Generator().manual_seed(1)
    features = torch.randn(n, 16, generator=data_gen)
    labels = torch.randint(0, 4, (n,), generator=data_gen)
    loader = DataLoader(TensorDataset(features, labels), batch_size=BATCH_SIZE, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.step = 0  # the gradient-accumulation counter would otherwise carry over between runs

    kwargs = dict(
        accelerator=accelerator,
        model=model,
        local_sgd_steps=scenario["local_sgd_steps"],
        enabled=scenario.get("enabled", True),
        **extra_kwargs,
    )
    agreed_syncs = []
    num_steps = []
    shared = local_sgd_cls(**kwargs) if scenario.get("reuse_object") else None
    for _ in range(scenario.get("epochs", 1)):
        with shared or local_sgd_cls(**kwargs) as local_sgd:
            for x, y in loader:
                with accelerator.accumulate(model):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    local_sgd.step()
                if check_ranks_agree and local_sgd.enabled and local_sgd.num_steps % local_sgd.local_sgd_steps == 0:
                    agreed_syncs.append((local_sgd.num_steps, _ranks_agree(model)))
        num_steps.append(local_sgd.num_steps)
        if check_ranks_agree and local_sgd.enabled:
            agreed_syncs.append(("exit", _ranks_agree(model)))
    params = [p.detach().to("cpu", copy=True) for p in accelerator.unwrap_model(model).parameters()]
    return params, num_steps, agreed_syncs, _ranks_agree(model)


def _ranks_agree(model) -> bool:
    """True when every rank holds bit-identical parameters (compared as raw bytes)."""
    flat = torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


OUR_MODES = {"copy": {}, "zero_copy": {"zero_copy": True}}


def compare_with_accelerate(names, cpu=True):
    """Runs each named scenario with Accelerate's LocalSGD and with ours in each mode (copy and
    zero-copy); returns per-scenario results, ours per mode."""
    results = {}
    for name in names:
        scenario = SCENARIOS[name]
        accelerator = _accelerator(scenario.get("grad_accum", 1), cpu)
        theirs, their_steps, _, their_final_agree = _train(accelerator, AccelerateLocalSGD, scenario, False)
        results[name] = {
            "theirs": theirs,
            "their_num_steps": their_steps,
            "their_final_agree": their_final_agree,
            "backend": dist.get_backend(),
            "modes": {},
        }
        for mode, extra_kwargs in OUR_MODES.items():
            ours, our_steps, agreed, our_final_agree = _train(accelerator, LocalSGD, scenario, True, **extra_kwargs)
            results[name]["modes"][mode] = {
                "ours": ours,
                "our_num_steps": our_steps,
                "agreed_syncs": agreed,
                "our_final_agree": our_final_agree,
            }
    return results


def parameters_stay_the_same_objects(zero_copy=False):
    """After syncs, the model's parameters are the same Parameter objects on the same device with the
    same dtype; in copy mode also with the same storage (zero-copy mode moves them once, on enter)."""
    accelerator = _accelerator(1)
    torch.manual_seed(0)
    model = accelerator.prepare(SmallNet(bf16_head=True))

    def identity():
        return [
            (id(p), p.device, p.dtype, p.shape) + (() if zero_copy else (p.untyped_storage().data_ptr(),))
            for p in model.parameters()
        ]

    before = identity()
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, zero_copy=zero_copy) as local_sgd:
        after_enter = [p.untyped_storage().data_ptr() for p in model.parameters()]
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(dist.get_rank())
            local_sgd.step()
    return {
        "same": before == identity(),
        "storage_kept_after_enter": after_enter == [p.untyped_storage().data_ptr() for p in model.parameters()],
        "sync_count": local_sgd.sync_count,
        "last": local_sgd.last_sync_seconds,
    }


def parameter_registered_between_syncs(zero_copy=False):
    """Accelerate walks model.parameters() at every sync, so a parameter registered mid-run is averaged
    from then on; ours re-plans for it."""
    accelerator = _accelerator(1)
    rank = dist.get_rank()
    model = torch.nn.Module()
    model.first = torch.nn.Parameter(torch.full((3,), float(rank)))
    # model.no_sync() is entered only by __enter__; syncing directly needs no DDP wrapper.
    local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1, zero_copy=zero_copy)
    local_sgd._sync_and_avg_model_params()
    model.second = torch.nn.Parameter(torch.full((2, 2), 4.0 * rank))
    with torch.no_grad():
        model.first.add_(rank)
    local_sgd._sync_and_avg_model_params()
    return {"first": model.first.detach().clone(), "second": model.second.detach().clone()}
