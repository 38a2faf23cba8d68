"""`LocalSGD`: Accelerate's context manager, with the averaging done by the compiled engine."""

from __future__ import annotations

import contextlib
import logging
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType

from .config import LocalSGDConfig, check_local_sgd_steps
from .controller import SyncController
from .fault_tolerance import Quorum
from .options import check_int_at_least
from .quantized_wire import DEFAULT_BLOCK_SIZE
from .schedule import EndWarmUp
from .sharded import REPLICATE_DIM_NAMES, replica_group_from_mesh

__all__ = ["LocalSGD"]

logger = logging.getLogger(__name__)
_disabled_notice_given = False

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


def _check_enabled(enabled) -> bool:
    # Accelerate reads it as a truth value; 0 and 1 (e.g. from a config file or an environment variable)
    # mean what they say, anything else is refused as a likely mistake.
    if not isinstance(enabled, bool) and isinstance(enabled, int) and enabled in (0, 1):
        return bool(enabled)
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool (or 0 or 1), got {enabled!r} ({type(enabled).__name__})")
    return enabled


def _say_once_why_disabled(accelerator) -> None:
    """Accelerate disables Local SGD silently under DistributedType.NO (one process); say so, once."""
    global _disabled_notice_given
    if _disabled_notice_given:
        return
    _disabled_notice_given = True
    message = (
        "LocalSGD is disabled: Accelerate runs a single process here (distributed_type=%s), so there is nothing to "
        "average. To average across processes, launch several: torchrun --nproc-per-node N script.py, or accelerate "
        "launch --multi_gpu --num_processes N (also for CPUs, with --cpu)."
    )
    try:
        # Accelerate's logger (it logs on the main process only) needs its state, which a duck-typed
        # accelerator may not have created.
        from accelerate.logging import get_logger

        get_logger(__name__).warning(message, accelerator.distributed_type)
    except (ImportError, RuntimeError):
        logger.warning(message, accelerator.distributed_type)


def _accelerate_replicate_mesh(accelerator):
    """Accelerate's FSDP2 mesh when its ParallelismConfig has replicas (`dp_replicate_size` > 1)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    mesh = getattr(accelerator, "torch_device_mesh", None)
    names = () if mesh is None else tuple(mesh.mesh_dim_names or ())
    if not any(name in names and mesh[name].size() > 1 for name in REPLICATE_DIM_NAMES):
        return None
    return mesh


def _replica_group(accelerator, manager, process_group, device_mesh, mesh_dim, enabled) -> Optional[dist.ProcessGroup]:
    """The group LocalSGD averages over: the one given (or cut from a device mesh, Accelerate's FSDP2 mesh by
    default); None for the world, or under a torchft manager (its quorum's group, formed at each sync)."""
    if manager is not None:
        if process_group is not None or device_mesh is not None:
            raise ValueError(
                "manager= averages over its quorum's process group: pass no process_group or device_mesh, got "
                f"process_group={process_group!r}, device_mesh={device_mesh!r}"
            )
        return None
    if device_mesh is not None and process_group is not None:
        raise ValueError(
            f"pass process_group or device_mesh, not both: got process_group={process_group!r}, device_mesh={device_mesh!r}"
        )
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}")
    if mesh_dim is not None and device_mesh is None:
        raise ValueError(f"mesh_dim needs device_mesh, got mesh_dim={mesh_dim!r} with device_mesh=None")
    if device_mesh is None and process_group is None and enabled:
        device_mesh = _accelerate_replicate_mesh(accelerator)
    if device_mesh is not None:
        process_group = replica_group_from_mesh(device_mesh, mesh_dim)
    return process_group


def _gradient_sync_off(model, fault_tolerant: bool):
    """DDP's `no_sync()`. An FSDP2 root module (no `no_sync`) sharded within one replica sends no
    gradient across replicas to switch off (its own HSDP, which would, is refused by the averager), and
    neither does a torchft replica group: its DDP (or FSDP2) syncs gradients within the group, as it
    should, and the replicas are averaged over the Manager's quorum."""
    if fault_tolerant or (not hasattr(model, "no_sync") and hasattr(model, "set_requires_all_reduce")):
        return contextlib.nullcontext()
    return model.no_sync()


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

    Stricter than Accelerate: arguments are validated (`accelerator` an `Accelerator`,
    `local_sgd_steps` an int >= 1, or None when disabled; `enabled` a bool; `model` an `nn.Module`;
    parameters dense, floating, not meta, not expanded); on enter and at every sync, all ranks check in
    one small collective that they agree on everything that decides what goes on the wire (parameter
    names and layout, bucket plan, options, sync cadence, buffers when synced) and raise the same
    `RanksDisagreeError` if not; a rank that fails to prepare raises its own error and the others name
    it; the `with` block cannot be nested on one object; and when the block raises, its exception
    propagates without the final average (Accelerate averages anyway, which can hang when other ranks
    are not there to join). Ctrl-C during a sync on CPU takes effect within about 0.1 s.

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
        zero_copy (`bool`, defaults to `False`):
            Keyword-only. On enter, move the parameters into persistent flat buffers (one per bucket)
            and rebind them as views there, so that a sync is only the in-place all_reduce. The
            parameters stay the same objects (optimizer, DDP, `state_dict()` keep working); about one
            bucket of extra memory while flattening, none afterwards. A parameter re-pointed later
            (`model.to(...)`, `param.data = ...`) or replaced (`load_state_dict(assign=True)`) is
            detected at the next sync and the parameters are flattened again before averaging. FSDP2
            shards: their local tensors move, and FSDP2's own all-gather input is pointed at them
            (each sharded dimension must divide by the shard count; no CPU offload). With a sync that
            stages (a narrow or quantized `wire`, `sync_delay`) the parameters stay flat and that sync
            stages from the flat buffers, as copy mode does; `hierarchy`'s levels too.
        comm_dtype (`torch.dtype`, *optional*):
            Keyword-only. `torch.bfloat16` or `torch.float16`: float32 parameters travel in that dtype
            (half the bytes), cast inside the compiled pack and unpack; the sum is widened to float32
            and divided there. See `ParameterAverager` for the error bound.
        outer_optimizer (`None`, `"diloco"` or a callable, defaults to `None`):
            Keyword-only. DiLoCo's outer step: at each sync, the difference between the anchor (the
            parameters after the previous sync) and the parameters' average is a pseudo-gradient; the
            optimizer built by `outer_optimizer(anchor_tensors)` steps the anchor with it, and the
            result becomes the parameters on every rank. `"diloco"`: the paper's SGD(lr=0.7,
            momentum=0.9, nesterov=True). The anchor is taken on enter (the parameters must be equal
            on every rank then, as DDP makes them: checked on enter, by a digest of their bytes, and
            refused with a `RanksDisagreeError` naming the first parameter that differs). `None`:
            plain averaging.
        outer_anchor_device (`str`, defaults to `"device"`):
            Keyword-only. Where the anchor and the outer optimizer's state live: `"device"` (each
            parameter's device) or `"cpu"` (saves accelerator memory; costs a copy each way per sync).
        sync_buffers (`bool`, defaults to `False`):
            Keyword-only. At each sync also average the floating-point buffers (e.g. BatchNorm's
            running statistics; complex ones as pairs of reals) and give every rank rank 0's integer
            and bool buffers (`num_batches_tracked`). The buffers' names, shapes and dtypes join the
            ranks' agreement check.
        warmup_steps (`int`, defaults to 0):
            Keyword-only. Post-local SGD (torch's `PostLocalSGDOptimizer`, Lin et al.): for the first
            `warmup_steps` steps gradient sync stays on (DDP all-reduces the gradients, so every rank's
            parameters and optimizer state stay identical) and nothing is averaged; then `no_sync()` is
            entered and the parameters are averaged every `local_sgd_steps` steps counted from there.
            The anchors (outer step, quantized wire) are taken at the end of warm-up. A model with no
            `no_sync()` (FSDP2 sharded within each replica: nothing syncs its gradients across
            replicas) warms up by averaging the parameters after every step instead.
        sync_delay (`int`, defaults to 0):
            Keyword-only. Overlap each sync with the next `sync_delay` local steps (0: wait, as
            Accelerate does). At a sync step the parameters are snapshotted and their average started,
            and `step()` returns at once; `sync_delay` steps later each rank adds the averaged
            correction `mean(snapshot) - snapshot` to its parameters, keeping what it learned
            meanwhile. This is not the same as waiting: until the exit sync (which waits, as today) the
            ranks differ by their last `sync_delay` steps of local progress. Warm-up syncs wait. Must be
            below `local_sgd_steps / num_fragments` (one average in flight at a time); `comm_dtype`
            None or bfloat16. With an `outer_optimizer` the outer step runs at the merge,
            on the snapshots' mean, and each rank adds `result - snapshot`. This timing and rule are
            `merge="eager"`; `merge="streaming"` times and merges as Streaming DiLoCo does. Extra
            memory: two copies of the parameters (of one fragment).
        merge (`str`, defaults to `"eager"`):
            Keyword-only. How a sync's result meets what each rank learned while it travelled.
            `"eager"`: as `sync_delay` describes (started at the fragment's boundary, merged
            `sync_delay` steps later as `t + (result - snapshot)`: no local step is lost). `"streaming"`:
            Streaming DiLoCo as torchft 0.2.0 and the paper do it: the sync starts `sync_delay` steps
            before the fragment's boundary and is merged at it as `t = lerp(result, t,
            fragment_update_alpha)`, where `result` is the snapshots' mean (after the outer step, if any);
            the anchor becomes `result`. With alpha 0 (torchft's default) the local steps taken while the
            sync travelled are dropped, and every rank leaves the merge with the same values.
        fragment_update_alpha (`float`, defaults to 0.0):
            Keyword-only, with `merge="streaming"`: the share of each rank's own values kept at a merge,
            0 to 1 (torchft's `fragment_update_alpha`). Warm-up's averages and the exit sync average
            plainly, as Accelerate does.
        num_fragments (`int`, defaults to 1):
            Keyword-only. Streaming DiLoCo's fragments: the parameters are split, in the model's order,
            into `num_fragments` contiguous groups of about equal bytes; each group syncs every
            `local_sgd_steps` steps, in turn, one every `local_sgd_steps / num_fragments` steps (which must
            be a whole number), so each sync moves, and stages, one fragment. Warm-up steps and the exit
            sync average every fragment. `sync_count` counts fragment syncs. 1: Accelerate's behaviour.
        wire (`str`, *optional*):
            Keyword-only. What travels. The float wires send the parameters: `"fp32"` (the default, as
            they are), `"bf16"` or `"fp16"` (float32 parameters cast inside the compiled pack, as
            `comm_dtype`, its alias, does). `"int8"`: each sync sends every rank's change since the previous sync,
            quantized to int8 with one float32 scale per `wire_block_size` elements, about a quarter of
            the bytes of float32 (see `QuantizedAverager` for the reduction, which cannot overflow, and the
            error bound). `"fp8"`: the same with float8 e4m3 codes (same bytes; error relative to each
            value instead of to its block's largest). `"int4"`: int4 codes (-7..7) two per byte, half the
            bytes of int8, 18x coarser (an even `wire_block_size`). The anchor the changes are measured from is taken
            on enter (the parameters must then be equal on every rank, as DDP makes them: checked).
            The codec reads float32: other dtypes travel on the float wire, as they are. None:
            `"fp32"`, or what `comm_dtype` says. The attribute `wire` holds the name.
        error_feedback (`bool`, defaults to `False`):
            Keyword-only, with `wire` set: each rank keeps what quantization left out of its change and
            adds it to the next one.
        wire_block_size (`int`, defaults to 1024):
            Keyword-only, with `wire` set: elements per scale.
        hierarchy (`Mapping[int, int]`, *optional*):
            Keyword-only. Hierarchical averaging: `{group_size: period}`, e.g. `{4: 2}` also averages
            each group of 4 consecutive ranks (a node of 4 GPUs, under torchrun's rank order) every 2
            steps, between the world averages every `local_sgd_steps` steps. Group sizes divide the world
            size; at a step where several levels are due only the largest averages, and at the world's
            steps only the world. Its subgroups are created on enter (a collective, after the ranks
            agree on the settings), each with the timeout of the group it is carved from.
            `level_sync_counts` counts each level's averages. With replicas given (`process_group`,
            `device_mesh`), a level groups consecutive replicas instead (e.g. the replicas on one node)
            and its sizes divide the number of replicas. The levels average the parameters plainly, in
            float32 (a fast link needs no narrow wire); the world's sync carries the other options
            (fragments, `sync_delay`, `wire`, the outer optimizer), for which a level average is local
            progress. With zero-copy the levels average the flat buffers' views in copy mode.
        manager (`torchft.Manager`, *optional*):
            Keyword-only. Fault tolerance on torchft (PyTorch's fault-tolerance library; `pip install
            localsgd_ext[ft]`): each replica group (one process, or a group of processes whose DDP or
            FSDP2 keeps syncing gradients within the group) is one torchft replica; every sync runs in a
            quorum of the replicas alive now (`start_quorum`), averages over the quorum's process group
            (each rank with the same rank of the other groups) with the compiled engine, and commits
            (`should_commit`, decided per group), or this group goes back to its values before the sync
            (with an outer optimizer, to its anchor, as torchft's DiLoCo) and is healed from the replicas
            that committed at the next sync. A replica that restarts is healed in its first quorum from a
            healthy one: its model and optimizer through the state the Manager was given, and this
            object's step count, sync count, outer step and quantized wire's anchor (registered with the
            Manager on enter). Created with `use_async_quorum=False` (`fault_tolerance.replica_group_manager`
            and `single_process_replica_manager` make one). Warm-up averages (no gradient crosses
            replica groups). Works
            with every wire (error feedback included), fragments, the outer optimizer and `sync_delay`
            (the quorum formed when a sync starts, its commit decided when it is merged, as torchft's
            Streaming DiLoCo does), zero-copy and `sync_buffers`; not yet with `hierarchy` (refused).
            Accelerate's `DistributedType.NO` (one process) does not disable it.
        process_group (`torch.distributed.ProcessGroup`, *optional*):
            Keyword-only. The ranks to average over (default: all). Sharded models: FSDP2 within each
            replica, `fully_shard(model, mesh=mesh["shard"])`, and `process_group=mesh.get_group("replicate")`,
            the ranks holding the same shard in the other replicas; each rank's shard is then averaged with
            theirs (torchft's and torchtitan's layout for DiLoCo).
        device_mesh (`torch.distributed.device_mesh.DeviceMesh`, *optional*):
            Keyword-only, instead of `process_group`: average along `mesh_dim` of this mesh. Under
            Accelerate's FSDP2 with `ParallelismConfig(dp_replicate_size=R, dp_shard_size=S)` it defaults
            to `accelerator.torch_device_mesh`, with the model `fully_shard`-ed over its `"dp_shard"`
            dimension before `accelerator.prepare()`.
        mesh_dim (`str` or `int`, *optional*):
            Keyword-only. The dimension of `device_mesh` across replicas (default: the one named
            `"dp_replicate"` or `"replicate"`).
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
        zero_copy: bool = False,
        comm_dtype: Optional[torch.dtype] = None,
        outer_optimizer=None,
        outer_anchor_device: str = "device",
        sync_buffers: bool = False,
        warmup_steps: int = 0,
        sync_delay: int = 0,
        num_fragments: int = 1,
        wire: Optional[str] = None,
        error_feedback: bool = False,
        wire_block_size: int = DEFAULT_BLOCK_SIZE,
        hierarchy: Optional[Mapping[int, int]] = None,
        merge: str = "eager",
        fragment_update_alpha: float = 0.0,
        manager=None,
        process_group: Optional[dist.ProcessGroup] = None,
        device_mesh=None,
        mesh_dim: Optional[Union[str, int]] = None,
    ):
        # Duck-typed as Accelerate is (it reads only `distributed_type`), but None or a string gets a clear error.
        if not isinstance(accelerator, Accelerator) and not hasattr(accelerator, "distributed_type"):
            raise TypeError(f"accelerator must be an accelerate.Accelerator, got {accelerator!r} ({type(accelerator).__name__})")
        if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
            raise NotImplementedError(
                "LocalSGD with Accelerate's FSDP supports FSDP2 only (fsdp_version=2), sharding each replica on its "
                "own: FSDP1's flat parameters have no per-replica shard to average"
            )
        if accelerator.distributed_type not in _SUPPORTED_DISTRIBUTED_TYPES + (DistributedType.FSDP,):
            raise NotImplementedError("LocalSGD is supported only for CPUs and GPUs (no DeepSpeed or MegatronLM)")
        enabled = _check_enabled(enabled)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # A torchft replica group of one process runs without a torch.distributed group: Accelerate's NO.
        self.enabled = enabled and (manager is not None or accelerator.distributed_type != DistributedType.NO)
        if enabled and not self.enabled:
            _say_once_why_disabled(accelerator)
        self.num_steps = 0
        self.accelerator = accelerator
        self.model = model
        self.local_sgd_steps = check_local_sgd_steps(local_sgd_steps, enabled)
        self.config = LocalSGDConfig(
            self.local_sgd_steps,
            bucket_cap_mb=bucket_cap_mb,
            check_finite=check_finite,
            zero_copy=zero_copy,
            comm_dtype=comm_dtype,
            outer_optimizer=outer_optimizer,
            outer_anchor_device=outer_anchor_device,
            sync_buffers=sync_buffers,
            warmup_steps=warmup_steps,
            sync_delay=sync_delay,
            num_fragments=num_fragments,
            wire=wire,
            error_feedback=error_feedback,
            wire_block_size=wire_block_size,
            hierarchy=hierarchy,
            merge=merge,
            fragment_update_alpha=fragment_update_alpha,
            fault_tolerant=manager is not None,
            # Warm-up is DDP's gradient all-reduce (post-local SGD) where DDP is; an FSDP2 model sharded
            # within each replica, and a torchft replica group, sync no gradient across replicas, so they
            # warm up by averaging.
            warmup_by_averaging=manager is not None or not hasattr(model, "no_sync"),
        )
        self.manager = manager
        self.process_group = _replica_group(accelerator, manager, process_group, device_mesh, mesh_dim, self.enabled)
        quorum = None if manager is None else Quorum(manager)
        self._controller = SyncController(model, self.config, self.process_group, quorum)
        self._state_registered = False
        self._entered = False
        self._gradient_sync_is_off = False

    # The options, as attributes of their own (read-only); `config` holds them all.
    options = property(lambda self: self.config.averaging)
    bucket_cap_mb = property(lambda self: self.config.bucket_cap_mb)
    check_finite = property(lambda self: self.config.check_finite)
    zero_copy = property(lambda self: self.config.zero_copy)
    comm_dtype = property(lambda self: self.config.comm_dtype)
    outer_anchor_device = property(lambda self: self.config.outer_anchor_device)
    sync_buffers = property(lambda self: self.config.sync_buffers)
    warmup_steps = property(lambda self: self.config.warmup_steps)
    sync_delay = property(lambda self: self.config.sync_delay)
    num_fragments = property(lambda self: self.config.num_fragments)
    wire = property(lambda self: self.config.wire)
    error_feedback = property(lambda self: self.config.error_feedback)
    wire_block_size = property(lambda self: self.config.wire_block_size)
    level_sync_counts = property(lambda self: self._controller.level_sync_counts)

    # What the averaging reports; writable, as Accelerate subclasses that time the sync set them.
    sync_count = property(
        lambda self: self._controller.sync_count, lambda self, value: setattr(self._controller, "sync_count", value)
    )
    last_sync_seconds = property(
        lambda self: self._controller.last_sync_seconds,
        lambda self, value: setattr(self._controller, "last_sync_seconds", value),
    )

    def __enter__(self):
        if self._entered:
            raise RuntimeError(
                "this LocalSGD is already inside its `with` block: nesting it would sync twice and switch "
                "gradient sync back on at the inner exit. Enter each LocalSGD object once at a time."
            )
        if self.enabled:
            self._controller.prepare()
            if self.manager is not None and not self._state_registered:
                # A replica that rejoins is healed with the step count, the sync count, the outer step and the anchor.
                self.manager.register_state_dict_fn("localsgd_ext.LocalSGD", self.load_state_dict_while_healing, self.state_dict)
                self._state_registered = True
            self.model_sync_obj = _gradient_sync_off(self.model, self.manager is not None)
            self._gradient_sync_is_off = False
            if self.num_steps >= self.warmup_steps or self.config.warmup_by_averaging:
                self._switch_gradient_sync_off()
        self._entered = True
        return self

    def _switch_gradient_sync_off(self) -> None:
        self.model_sync_obj.__enter__()
        self._gradient_sync_is_off = True

    def __exit__(self, type, value, tb):
        self._entered = False
        if self.enabled:
            try:
                if type is None:
                    # Average all models on exit; not after an exception, which other ranks may not share.
                    actions = self.config.schedule.exit_actions(self.num_steps)
                    self._controller.finish(actions, self.num_steps, self._sync_and_avg_model_params)
            finally:
                if type is not None:
                    self._controller.abort()
                if self._gradient_sync_is_off:
                    self.model_sync_obj.__exit__(type, value, tb)

    def step(self):
        """
        This function makes a "step" and synchronizes model parameters if necessary.
        """
        self.num_steps += 1
        if not self.enabled:
            return
        actions = self.config.schedule.actions(self.num_steps)
        if EndWarmUp() in actions:
            self._switch_gradient_sync_off()
        self._controller.run_step(actions, self.num_steps, self._sync_and_avg_model_params)

    def _sync_and_avg_model_params(self):
        """
        Synchronize + Average model parameters across all processes
        """
        self._controller.sync(self.num_steps)

    @property
    def last_step_synced(self) -> bool:
        """Whether the last `step()` completed a sync and left none in flight: the moment to checkpoint
        (Accelerate's `save_state()` writes rank 0's model only). Without `sync_delay` every rank then
        holds the same parameters; with it, the step that merged a delayed average, or that completed a
        sync it waited for (warm-up, a quantized wire's first). With fragments, the ranks agree then on
        the fragment just synced only. With a `manager`, false at a sync whose commit failed (this replica
        rolled back, and is healed at the next)."""
        return self.enabled and self._controller.last_step_synced

    def state_dict(self) -> dict:
        """What a resumed run needs to continue as if uninterrupted: the step count (so the sync cadence
        carries on), the sync count, and the DiLoCo anchor with its outer optimizer's state. Register
        the object with `accelerator.register_for_checkpointing(local_sgd)` before `load_state()`.
        Not while a delayed average (`sync_delay`) is in flight: save where `last_step_synced` is true.
        A quantized wire's anchor and residual are not saved: after a resume the loaded parameters are
        the anchor (taken on enter), and error feedback starts from zero. With a `manager`, the quantized
        wire's anchor is in it (`"wire_anchor"`): a replica that heals measures its changes from it."""
        return {"num_steps": self.num_steps, **self._controller.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores what `state_dict()` returned; call it before entering the `with` block."""
        if self._entered:
            raise RuntimeError(
                "LocalSGD.load_state_dict() inside its `with` block would change the step count and the anchor under "
                "a running sync cadence (and lose an average in flight); call it before entering the block"
            )
        self._load_state(state_dict)

    def load_state_dict_while_healing(self, state_dict: dict) -> None:
        """What the torchft Manager calls in a quorum that heals this replica (it is behind, e.g. restarted):
        the healthy replica's step count, sync count, outer step and quantized wire's anchor, so that the
        cadence, the outer optimizer and the wire carry on as theirs. Inside the `with` block, at a sync (no
        average is ever in flight with a manager)."""
        self._load_state(state_dict)

    def _load_state(self, state_dict: dict) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict from LocalSGD.state_dict(), got {type(state_dict).__name__}")
        if "num_steps" not in state_dict:
            raise ValueError("state_dict is missing ['num_steps']; it must come from LocalSGD.state_dict()")
        num_steps = check_int_at_least("state_dict['num_steps']", state_dict["num_steps"], 0)
        self._controller.load_state_dict(state_dict)
        self.num_steps = num_steps
