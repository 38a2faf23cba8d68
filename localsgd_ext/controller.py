"""`SyncController`: carries out the schedule's actions (localsgd_ext/schedule.py) over one averager per
fragment and one per level below the world, and owns what happens around an average: the outer step
(DiLoCo), the buffers, the delayed sync in flight, and the counts `LocalSGD` reports."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from . import _C
from .averager import ParameterAverager, _lost_rank_errors
from .averager_interface import Averager
from .buffers import BufferSync
from .config import LocalSGDConfig
from .consistency import confirm_across_world, confirm_settings_agree, fail_together, world_group
from .diloco import OuterStep
from .fault_tolerance import Commit, Quorum, Rollback
from .fragments import fragment_bounds
from .hierarchy import Hierarchy
from .options import AveragingOptions, check_int_at_least
from .quantized_wire import QuantizedAverager
from .schedule import Action, Advance, EndWarmUp, LevelAverage, Merge, Sync
from .sharded import is_sharded, local_tensors
from .split_averager import SplitAverager, layout_digest, split_by_codec

__all__ = ["SyncController"]


class SyncController:
    """The averagers of one model and the state between its syncs.

    Args:
        model (`torch.nn.Module`): whose `parameters()` (and buffers, with `sync_buffers`) are averaged;
            re-read whenever the module tree changes.
        config (`LocalSGDConfig`): the options, already checked.
        process_group (`ProcessGroup`, *optional*): the replicas to average over (default: the world).
        quorum (`Quorum`, *optional*): a torchft Manager's quorum (fault_tolerance.py): every world sync then
            runs in a quorum of the replicas alive, over its process group, and commits or rolls back.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: LocalSGDConfig,
        process_group: Optional[dist.ProcessGroup],
        quorum: Optional[Quorum] = None,
    ):
        self.model = model
        self.config = config
        self.process_group = process_group
        self.quorum = quorum
        factory = config.outer_optimizer_factory
        self.outer = None if factory is None else OuterStep(factory, config.outer_anchor_device)
        self.hierarchy = None
        if config.hierarchy is not None and config.local_sgd_steps is not None:
            self.hierarchy = Hierarchy(config.hierarchy, config.local_sgd_steps)
        self.level_sync_counts: Dict[int, int] = dict.fromkeys(config.hierarchy or {}, 0)
        self.sync_count = 0
        self.last_sync_seconds: Optional[float] = None
        self.last_step_synced = False
        # False after a sync in a quorum whose commit failed (this rank rolled back).
        self.last_sync_committed = True
        # One averager per fragment, over model.parameters()[fragment_starts[i]:fragment_starts[i + 1]].
        self.averagers: List[Averager] = []
        self.fragment_starts: List[int] = []
        # Each level's averager over all the parameters, in its subgroup.
        self.level_averagers: Dict[int, ParameterAverager] = {}
        # With `config.flat_layout`: per fragment, a zero-copy engine that only keeps the parameters in its
        # flat buffers (the fragment's averager stages from them, as copy mode does).
        self.flat_layouts: List[ParameterAverager] = []
        # Per fragment, the step at which its last waited-for sync completed (None: not since enter).
        self.synced_at_step: List[Optional[int]] = []
        # The fragment whose delayed sync is in flight, or None.
        self.delayed_fragment: Optional[int] = None
        self._buffer_sync: Optional[BufferSync] = None
        self._module_tree: Optional[_C.ModuleTreeSnapshot] = None
        # Under a quorum with a quantized wire: the anchor (one tensor per parameter) that the averagers built
        # at the next quorum start from: the parameters on enter, or what a healthy replica sent (a heal).
        self._anchor_to_load: Optional[List[Optional[torch.Tensor]]] = None
        # Under a quorum: the commit of the overlapped sync in flight, decided at its merge.
        self._pending_commit: Optional[Commit] = None

    @property
    def group(self) -> dist.ProcessGroup:
        return self.process_group or world_group()

    # --- Before training -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """On enter, on every rank: first the settings' agreement (a rank configured differently, e.g. with a
        hierarchy on one rank only, would otherwise wait alone inside new_group, or send mismatched
        messages), then `_prepare_averagers()`; a refusal there reaches every rank of a sharded model (FSDP
        ties each replica's ranks together, so the other replicas' ranks are waiting too). Under a quorum
        there is no group yet: each sync's averagers check the settings over it."""
        if self.quorum is not None:
            self._prepare_averagers()
            return
        with _lost_rank_errors(self.group):
            confirm_settings_agree(self.group, self.config.settings_to_agree_on(), "created or averaged")
        outcome = None
        try:
            self._prepare_averagers()
        except Exception as error:  # noqa: BLE001 - every rank must hear of it; re-raised below
            outcome = error
        if self.process_group is not None and is_sharded(list(self.model.parameters())):
            confirm_across_world(self.process_group, outcome)
        elif outcome is not None:
            raise outcome

    def _prepare_averagers(self) -> None:
        """The levels' subgroups (a collective), the averagers, and the checks that refuse bad parameters and
        ranks whose models differ before any training. Under a quorum the averagers are built, and checked,
        at each quorum; the anchors (the outer step's, the quantized wire's) are taken here, from the
        parameters as they are (every replica starts from the same model)."""
        if self.quorum is not None:
            params = list(self.model.parameters())
            if self.outer is not None:
                self.outer.take_anchor(params)
            if self.config.quantized:
                self._anchor_to_load = [p.detach().clone() for p in local_tensors(params)]
            return
        if self.hierarchy is not None:
            self.hierarchy.build_groups(self.process_group)
        averagers = self._averagers_or_fail_together()
        if self.outer is not None:
            self.outer.take_anchor([p for averager in averagers for p in averager.params])
        # The averagers over all ranks first: a rank that could not build them joins their check as failed.
        for averager, first in zip(averagers, self.fragment_starts):
            if self.outer is not None:
                averager.verify_ranks_agree(equal_values=self.outer.anchor_slice(first, len(averager.params)))
            if self.config.quantized:
                averager.verify_ranks_agree(equal_values=averager.params)
            elif self.outer is None:
                averager.verify_ranks_agree()
            # The changes the quantized wire sends are measured from here, checked equal on every rank.
            averager.rebase_anchor()
        for level_averager in self.level_averagers.values():
            level_averager.verify_ranks_agree()

    def _current_averagers(self) -> List[Averager]:
        # Accelerate averages whatever model.parameters() lists at each sync. Walking the module tree in
        # Python costs ~1.4 ms per 1000 modules; the compiled snapshot answers "would it still list the
        # same objects?" in microseconds, and the walk runs again only when something was registered,
        # replaced or removed. (A tensor re-pointed inside a Parameter is the engine's to catch.)
        averagers = self.averagers
        if averagers and self._module_tree is not None and self._module_tree.unchanged():
            return averagers
        params: List[torch.nn.Parameter] = list(self.model.parameters())
        current = [p for averager in averagers for p in averager.params]
        if not averagers or len(current) != len(params) or any(a is not b for a, b in zip(current, params)):
            self._build_averagers(params)
            averagers = self.averagers
        if self.config.sync_buffers:
            named_buffers = list(self.model.named_buffers())
            # Over the world, as Accelerate's processes share one model's buffers; under a torchft quorum (no
            # world) over the quorum's group.
            self._buffer_sync = BufferSync(
                named_buffers,
                AveragingOptions(bucket_cap_mb=self.config.bucket_cap_mb),
                process_group=self.process_group if self.quorum is not None else None,
            )
            # Checked with the last fragment's parameters, in the same collective: the buffers' sync
            # runs unchecked, with that fragment's (or every fragment's) sync.
            averagers[-1].agreement_tensors = named_buffers
        self._module_tree = _C.ModuleTreeSnapshot(list(self.model.modules()))
        return averagers

    def _build_averagers(self, params: List[torch.nn.Parameter]) -> None:
        config = self.config
        names = [name for name, _ in self.model.named_parameters()]
        bounds = fragment_bounds([p.numel() * p.element_size() for p in params], config.num_fragments)
        settings = config.agreement_settings()
        # Dropped first: in zero-copy mode their flat buffers are freed once the new ones hold the values.
        self.averagers, self.flat_layouts, self.level_averagers = [], [], {}
        if config.flat_layout:
            in_place = AveragingOptions(bucket_cap_mb=config.bucket_cap_mb, zero_copy=True)
            self.flat_layouts = [
                ParameterAverager.with_options(
                    params[start:end],
                    in_place,
                    names=names[start:end],
                    process_group=self.process_group,
                    sharded_model=self.model,
                )
                for start, end in zip(bounds, bounds[1:])
            ]
        for start, end in zip(bounds, bounds[1:]):
            averager: Averager
            if config.quantized:
                averager = self._quantized_averager(params[start:end], names[start:end], settings)
            else:
                averager = ParameterAverager.with_options(
                    params[start:end],
                    config.averaging,
                    names=names[start:end],
                    agreement_settings=settings,
                    process_group=self.process_group,
                    sharded_model=self.model,
                )
            self.averagers.append(averager)
        self.fragment_starts = bounds[:-1]
        self.synced_at_step = [None] * len(self.averagers)
        if self.hierarchy is not None:
            # Plain float32 averages in copy mode: a fast link needs no narrow wire, and under zero_copy they
            # read and write the views the world's engine keeps flat.
            plain = AveragingOptions(bucket_cap_mb=config.bucket_cap_mb, check_finite=config.check_finite)
            self.level_averagers = {
                size: ParameterAverager.with_options(
                    params, plain, process_group=group, names=names, agreement_settings={**settings, "level": size}
                )
                for size, group in self.hierarchy.groups.items()
            }

    def _quantized_averager(self, params: List[torch.nn.Parameter], names: List[str], settings: dict) -> Averager:
        """The quantized wire over a fragment: one `QuantizedAverager` when every parameter is float32 on one
        device; else a `SplitAverager` with one per device for the float32 parameters, and the float wire
        for the others (as the bf16 wire leaves other dtypes as they are)."""
        config = self.config

        def quantized(part_params, part_names, part_settings):
            return QuantizedAverager.with_options(
                part_params,
                config.averaging,
                wire=config.wire_name,
                block_size=config.wire_block_size,
                error_feedback=config.error_feedback,
                names=part_names,
                agreement_settings=part_settings,
                process_group=self.process_group,
            )

        parts = split_by_codec(params)
        if len(parts) == 1 and parts[0][0] is not None:
            return quantized(params, names, settings)
        split_settings = {**settings, "split": layout_digest(params, names)}
        built: List[tuple] = []
        for device, positions in parts:
            part_params, part_names = [params[i] for i in positions], [names[i] for i in positions]
            if device is None:
                part = ParameterAverager.with_options(
                    part_params,
                    config.averaging,
                    names=part_names,
                    agreement_settings=split_settings,
                    process_group=self.process_group,
                    sharded_model=self.model,
                )
            else:
                part = quantized(part_params, part_names, split_settings)
            built.append((positions, part))
        return SplitAverager(list(params), list(names), built)

    def _averagers_or_fail_together(self) -> List[Averager]:
        """The current averagers; if this rank cannot build them (a parameter refused), the other ranks,
        waiting in the agreement check, are told, and this rank raises its own error."""
        try:
            return self._current_averagers()
        except Exception as error:
            fail_together(self.group, error)
            raise  # unreachable: fail_together raises

    # --- Running the schedule ----------------------------------------------------------------------------

    def is_whole_average(self, action: Action, step: int) -> bool:
        """A waited sync of every fragment: what Accelerate's `_sync_and_avg_model_params` does, so the
        adapter runs it through that method (subclasses wrap it). Not the exit sync with an outer
        optimizer, which skips a fragment whose outer step just ran, nor a sync that merges by lerp."""
        return (
            isinstance(action, Sync)
            and self.quorum is None
            and not action.delayed
            and len(action.fragments) == self.config.num_fragments
            and not (action.final and self.outer is not None)
            and not self._merges_by_lerp(action, step)
        )

    def _merges_by_lerp(self, action: Sync, step: int) -> bool:
        """A waited sync that keeps a share of local progress: the streaming merge with
        fragment_update_alpha > 0, at a step of the schedule (not warm-up's averages, not the exit, which
        leave every rank the same values as Accelerate's)."""
        alpha = self.config.streaming_alpha
        schedule = self.config.schedule
        return bool(alpha) and not action.delayed and not action.final and schedule is not None and step > schedule.warmup_steps

    def run_step(self, actions: Sequence[Action], step: int, whole_average: Callable[[], None]) -> None:
        """The actions due after the `step`-th `step()`, in order."""
        schedule = self.config.schedule
        # Under DDP's gradient all-reduce (warm-up) every step leaves the ranks identical.
        self.last_step_synced = schedule is not None and step <= schedule.warmup_steps and not schedule.warmup_by_averaging
        for action in actions:
            if isinstance(action, Sync):
                self._run_sync(action, step, whole_average)
                self.last_step_synced = self.delayed_fragment is None and self.last_sync_committed
            else:
                self._run(action, step)

    def finish(self, actions: Sequence[Action], step: int, whole_average: Callable[[], None]) -> None:
        """The exit's actions: merge what is in flight, then the final sync."""
        for action in actions:
            if isinstance(action, Merge):
                self._finish_delayed_sync(step)
            elif isinstance(action, Sync):
                self._run_sync(action, step, whole_average)

    def _run_sync(self, action: Sync, step: int, whole_average: Callable[[], None]) -> None:
        if self.is_whole_average(action, step):
            whole_average()
        elif action.final:
            # With the outer step, only what changed since its last sync; plain averaging averages all.
            self.sync(step, fragments=self._fragments_changed_since_sync(step) if self.outer is not None else None)
        elif self._merges_by_lerp(action, step):
            # Streaming with no delay: started and merged at once, so that the merge keeps its share of the
            # values the sync started from.
            self.sync(step, fragments=list(action.fragments), delayed=True, merge_now=True)
        else:
            self.sync(step, fragments=list(action.fragments), delayed=action.delayed)

    def _run(self, action: Action, step: int) -> None:
        if isinstance(action, Merge):
            if self.delayed_fragment is not None:
                self._finish_delayed_sync(step)
                self.last_step_synced = self.last_sync_committed
        elif isinstance(action, Advance):
            # A quantized wire's second half (its all_gather) goes on the wire midway, at the same step everywhere.
            if self.delayed_fragment is not None:
                try:
                    self.averagers[self.delayed_fragment].advance_average()
                except Exception as error:
                    if self._pending_commit is None:
                        raise
                    self._pending_commit.fail(error)  # in a quorum: voted down at the merge
        elif isinstance(action, LevelAverage):
            self._average_level(action.group_size)
        elif isinstance(action, EndWarmUp):
            self._rebase_anchors()

    def _rebase_anchors(self) -> None:
        """The anchors (the outer step's, the quantized wire's) from the parameters as they are, which DDP
        kept identical on every rank through warm-up: the first outer step and the first quantized change
        then measure local progress only."""
        averagers = self._averagers_or_fail_together()
        if self.outer is not None:
            self.outer.rebase([p for averager in averagers for p in averager.params])
        for averager in averagers:
            averager.rebase_anchor()

    def abort(self) -> None:
        """After an exception in the loop: a delayed sync was started on every rank, so it completes; wait
        for it rather than leave it on the wire."""
        if self.delayed_fragment is not None:
            self.averagers[self.delayed_fragment].drain_pending_average()
            self.delayed_fragment = None

    def sync(self, step: int, fragments: Optional[List[int]] = None, delayed: bool = False, merge_now: bool = False) -> None:
        """Syncs the fragments listed (all by default), each waited for or, with `delayed`, started (and
        with `merge_now` merged at once, by the configured merge)."""
        if self.quorum is not None and delayed:
            assert fragments is not None and len(fragments) == 1, "one delayed sync at a time"
            self._start_in_quorum(step, fragments[0], merge_now)
            return
        if self.quorum is not None:
            self._sync_in_quorum(step, fragments)
            return
        start = time.perf_counter()
        averagers = self._averagers_or_fail_together()
        if fragments is None:
            fragments = list(range(len(averagers)))
        for fragment in fragments:
            averager = averagers[fragment]
            self._keep_flat(fragment)
            if delayed:
                averager.start_average()
            else:
                averager.average()
            if averager.average_pending:
                # Counted in sync_count when it is merged (_finish_delayed_sync).
                self.delayed_fragment = fragment
                if merge_now:
                    self._finish_delayed_sync(step)
                continue
            # Waited for: a plain sync, or a quantized wire's first (it has no anchor to send changes from yet).
            if self.outer is not None:
                self.outer.apply(averager.params, first=self.fragment_starts[fragment])
                averager.rebase_anchor()  # a quantized wire measures the next changes from here
            self.synced_at_step[fragment] = step
            self.sync_count += 1
        buffers = self._buffers_synced_with(fragments[-1]) if fragments else None
        if buffers is not None:
            buffers.sync()
        self.last_sync_seconds = time.perf_counter() - start

    def _average_fragment(self, averagers: List[Averager], fragment: int) -> None:
        self._keep_flat(fragment)
        averagers[fragment].average()

    def _buffers_synced_with(self, fragment: int) -> Optional[BufferSync]:
        """The buffers' sync, which rides with the last fragment's (`sync_buffers`)."""
        return self._buffer_sync if fragment == len(self.averagers) - 1 else None

    def _keep_flat(self, fragment: int) -> None:
        """With zero-copy under an averager that stages (a narrow wire, `sync_delay`): the fragment's
        parameters flattened again if something re-pointed one since."""
        if self.flat_layouts:
            self.flat_layouts[fragment].keep_flat()

    def _enter_quorum(self) -> List[Averager]:
        """Forms this sync's quorum (a replica that is behind is healed in it) and returns the averagers over
        its group: rebuilt when the group changed, with the quantized wire's anchor carried over, or loaded
        from the replica that healed this one."""
        assert self.quorum is not None
        if self.quorum.start():
            self.process_group = self.quorum.group
            if self._anchor_to_load is None and self.config.quantized:
                self._anchor_to_load = self.anchor_values()
            self.averagers = []  # rebuilt over the quorum's group
        averagers = self._averagers_or_fail_together()
        if self._anchor_to_load is not None:
            anchor, self._anchor_to_load = self._anchor_to_load, None
            for averager, first in zip(averagers, self.fragment_starts):
                averager.rebase_anchor(anchor[first : first + len(averager.params)])
        return averagers

    def _sync_in_quorum(self, step: int, fragments: Optional[List[int]]) -> None:
        """A waited sync in a torchft quorum: the fragments are averaged and committed together, and only a
        committed sync takes the outer step and counts (`_conclude_in_quorum`)."""
        start = time.perf_counter()
        averagers = self._enter_quorum()
        assert self.quorum is not None
        chosen = list(range(len(averagers))) if fragments is None else fragments
        tensors = [t for f in chosen for t in local_tensors(averagers[f].params) + averagers[f].state_tensors()]
        buffers = self._buffers_synced_with(chosen[-1]) if chosen else None
        tensors += buffers.tensors if buffers is not None else []

        def average() -> None:
            # Every collective of the sync runs even after one failed on this rank, so that the other
            # replicas are not left waiting in the next one until their timeout; the first error is raised
            # once they are done (and the commit fails).
            failure: Optional[Exception] = None
            collectives: List[Callable[[], None]] = [functools.partial(self._average_fragment, averagers, f) for f in chosen]
            collectives += [buffers.sync] if buffers is not None else []
            for collective in collectives:
                try:
                    collective()
                except Exception as error:  # noqa: BLE001 - raised below, after the other collectives
                    failure = failure or error
            if failure is not None:
                raise failure

        committed = self.quorum.run(tensors, average)
        for fragment in chosen:
            self._conclude_in_quorum(step, fragment, committed, merged=False)
        self.last_sync_seconds = time.perf_counter() - start

    def _conclude_in_quorum(self, step: int, fragment: int, committed: bool, merged: bool) -> None:
        """After a quorum's commit: a committed fragment takes the outer step (unless the merge did) and
        counts (a merge that kept local progress leaves the ranks different: not a sync of the fragment's
        values for the exit to skip). One that was not is back at its values before the sync (as torchft's
        LocalSGD keeps them), and with an outer step goes back to its anchor, the last committed outer step's
        result, as torchft's DiLoCo does. Either way a replica that did not commit is behind the ones that
        did, and is healed from them at the next quorum."""
        self.last_sync_committed = committed
        averager, first = self.averagers[fragment], self.fragment_starts[fragment]
        if committed:
            if self.outer is not None and not merged:
                self.outer.apply(averager.params, first=first)
                averager.rebase_anchor()
            if not merged or self.config.streaming_alpha == 0.0:
                self.synced_at_step[fragment] = step
            self.sync_count += 1
        elif self.outer is not None:
            self.outer.restore(averager.params, first)

    def _start_in_quorum(self, step: int, fragment: int, merge_now: bool) -> None:
        """An overlapped sync in a torchft quorum: the quorum is formed and the average started now; its
        commit is decided when it is merged (`_finish_delayed_in_quorum`). A start that fails is reported
        and voted down at once: nothing was sent, nothing changes."""
        start = time.perf_counter()
        averager = self._enter_quorum()[fragment]
        assert self.quorum is not None
        commit = self.quorum.commit()
        try:
            self._keep_flat(fragment)
            averager.start_average()
        except Exception as error:  # noqa: BLE001 - a failed sync is reported, and this replica votes no
            commit.fail(error)
            averager.drain_pending_average()
            self.last_sync_committed = commit()
            return
        self._pending_commit = commit
        self.delayed_fragment = fragment
        self.last_sync_seconds = time.perf_counter() - start
        if merge_now:
            self._finish_delayed_sync(step)

    def _finish_delayed_in_quorum(self, step: int, fragment: int, averager: Averager) -> None:
        """The merge of an overlapped sync started in a quorum, committed as torchft's Streaming DiLoCo does:
        the average is waited for, then `should_commit()`, and only if it is yes the outer step; a sync not
        committed leaves this rank as it was before the merge (its local steps kept), or with an outer step
        at its anchor."""
        commit, self._pending_commit = self._pending_commit, None
        assert commit is not None
        outer, first = self.outer, self.fragment_starts[fragment]
        buffers = self._buffers_synced_with(fragment)
        before = Rollback(local_tensors(averager.params) + averager.state_tensors() + (buffers.tensors if buffers else []))

        def commit_then_outer_step(means: List[torch.Tensor], positions: Optional[Sequence[int]] = None) -> None:
            if commit() and outer is not None:
                outer.apply(means, first, positions)

        try:
            if buffers is not None:
                buffers.sync()  # in the sync's quorum, before its commit
            averager.finish_average(outer_step=commit_then_outer_step, fragment_update_alpha=self.config.streaming_alpha)
        except Exception as error:  # noqa: BLE001 - a failed sync is reported, and this replica votes no
            if commit.decision is not None:
                raise  # after the vote: this rank's own failure, not a lost replica
            commit.fail(error)
            averager.drain_pending_average()
        committed = commit()
        if not committed:
            before.restore()
        self._conclude_in_quorum(step, fragment, committed, merged=True)

    # --- State ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The sync count and the outer step's state (None without one); under a quorum with a quantized wire,
        the wire's anchor too (what a replica that heals measures its changes from)."""
        if self.delayed_fragment is not None:
            raise RuntimeError(
                "state_dict() while a delayed average (sync_delay) is in flight would lose it; save at a step where "
                "last_step_synced is True"
            )
        state: Dict[str, Any] = {
            "sync_count": self.sync_count,
            "outer": None if self.outer is None else self.outer.state_dict(),
        }
        if self.quorum is not None and self.config.quantized:
            state["wire_anchor"] = self.anchor_values()
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores what `state_dict()` returned (checked first: nothing changes when it is refused)."""
        missing = {"sync_count", "outer"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}; it must come from LocalSGD.state_dict()")
        sync_count = check_int_at_least("state_dict['sync_count']", state_dict["sync_count"], 0)
        if (state_dict["outer"] is None) != (self.outer is None):
            raise ValueError(
                "state_dict was saved with outer_optimizer "
                + ("set" if state_dict["outer"] is not None else "None")
                + ", but this LocalSGD has outer_optimizer "
                + ("None" if self.outer is None else "set")
            )
        self.sync_count = sync_count
        if self.outer is not None:
            self.outer.load_state_dict(state_dict["outer"], list(self.model.parameters()))
        if state_dict.get("wire_anchor") is not None and self.quorum is not None and self.config.quantized:
            self._anchor_to_load = list(state_dict["wire_anchor"])

    def anchor_values(self) -> List[Optional[torch.Tensor]]:
        """The quantized wire's anchor, one tensor per parameter (None on the float wire, or before the first
        sync under a quorum): what a replica that heals needs to measure its next change from."""
        if not self.averagers:
            return list(self._anchor_to_load or [None] * len(list(self.model.parameters())))
        return [value for averager in self.averagers for value in averager.anchor_values()]

    def _average_level(self, group_size: int) -> None:
        """One level's average, within this rank's subgroup of `group_size` ranks."""
        start = time.perf_counter()
        # Rebuilds the level averagers too when the parameters changed. Not through fail_together: that
        # is a world collective, and only this subgroup is syncing now.
        self._current_averagers()
        self.level_averagers[group_size].average()
        self.level_sync_counts[group_size] += 1
        self.last_sync_seconds = time.perf_counter() - start

    def _fragments_changed_since_sync(self, step: int) -> List[int]:
        """The exit sync's fragments with an outer optimizer: a fragment whose sync completed at the last
        `step()` has nothing to contribute (its pseudo-gradient would be zero, and momentum would still move
        it). Plain averaging averages every fragment, as Accelerate does."""
        every = range(len(self._averagers_or_fail_together()))
        return [f for f in every if self.synced_at_step[f] != step]

    def _check_delayed_params_still_the_models(self, averager: Averager) -> None:
        """The delayed merge writes into the objects snapshotted at its start; if the model holds others now
        (`load_state_dict(assign=True)`, a module replaced), the merge would be lost for the model."""
        if self._module_tree is not None and self._module_tree.unchanged():
            return
        held = set(map(id, self.model.parameters()))
        replaced = [name for name, p in zip(averager.names, averager.params) if id(p) not in held]
        if replaced:
            averager.drain_pending_average()
            raise RuntimeError(
                f"LocalSGD: the model's parameters were replaced (first {replaced[0]}; e.g. by "
                "load_state_dict(assign=True) or a module swapped in) while a delayed average (sync_delay) was in "
                "flight, so its correction cannot be merged into what the model holds now. Replace parameters only "
                "at a step where last_step_synced is True, or load without assign=True (which copies into them)."
            )

    def _finish_delayed_sync(self, step: int) -> None:
        fragment, self.delayed_fragment = self.delayed_fragment, None
        if fragment is None:
            return
        averager = self.averagers[fragment]
        self._check_delayed_params_still_the_models(averager)
        if self.quorum is not None:
            self._finish_delayed_in_quorum(step, fragment, averager)
            return
        outer = self.outer
        if outer is not None:
            # The outer step runs on the mean of the snapshots; local progress since is kept on top of it.
            first = self.fragment_starts[fragment]

            def outer_step(means: List[torch.Tensor], positions: Optional[Sequence[int]] = None) -> None:
                outer.apply(means, first, positions)

            averager.finish_average(outer_step=outer_step, fragment_update_alpha=self.config.streaming_alpha)
        else:
            averager.finish_average(fragment_update_alpha=self.config.streaming_alpha)
        if self.config.streaming_alpha == 0.0:
            # The streaming merge with alpha 0 leaves every rank the sync's result: nothing changed since.
            self.synced_at_step[fragment] = step
        self.sync_count += 1
