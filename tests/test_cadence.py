"""LocalSGD's pure logic, in-process with a fake averager (as torchft tests its LocalSGD with
create_autospec(Manager)): when it syncs (local_sgd_steps, warmup_steps, the exit sync), what it hands
the averager, and how it treats no_sync(). What is collective is tested on real ranks elsewhere."""

import contextlib
import types
from unittest import mock

import pytest
import torch
from accelerate import DistributedType

import localsgd_ext.controller as controller_module
from localsgd_ext import AveragingOptions, LocalSGD, ParameterAverager
from localsgd_ext.fragments import fragment_bounds


class NoSyncModel(torch.nn.Module):
    """What LocalSGD needs of a DDP model: parameters, and no_sync() switching gradient sync off."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.require_backward_grad_sync = True

    @contextlib.contextmanager
    def no_sync(self):
        before, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = before


@pytest.fixture
def fake_averager(monkeypatch):
    """Replaces the engine: `with_options` returns autospec'd averagers that record the step of each
    average() call in `synced`."""
    record = types.SimpleNamespace(synced=[], fragments_synced=[], started=[], merged=[], drained=[], built=[], local_sgd=None)

    def build(params, options, **kwargs):
        averager = mock.create_autospec(ParameterAverager, instance=True)
        averager.params = list(params)
        fragment = len(record.built)

        def average():
            record.synced.append(record.local_sgd.num_steps)
            record.fragments_synced.append((record.local_sgd.num_steps, fragment))

        averager.average.side_effect = average
        averager.average_pending = False

        def in_flight(log, pending):
            def call(*args, **kwargs):
                log.append(record.local_sgd.num_steps)
                averager.average_pending = pending

            return call

        averager.start_average.side_effect = in_flight(record.started, True)
        averager.finish_average.side_effect = in_flight(record.merged, False)
        averager.drain_pending_average.side_effect = in_flight(record.drained, False)
        record.built.append((options, kwargs, averager))
        return averager

    fake_class = mock.create_autospec(ParameterAverager)
    fake_class.with_options.side_effect = build
    monkeypatch.setattr(controller_module, "ParameterAverager", fake_class)
    # The settings' agreement on enter is a collective (tested on real ranks): here it records what it got.
    record.agreed_settings = []
    monkeypatch.setattr(
        controller_module, "confirm_settings_agree", lambda group, settings, what: record.agreed_settings.append(dict(settings))
    )
    return record


def local_sgd_over(record, model=None, **kwargs):
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    record.local_sgd = LocalSGD(accelerator=accelerator, model=model or NoSyncModel(), **kwargs)
    return record.local_sgd


@pytest.mark.parametrize(
    "local_sgd_steps, warmup_steps, steps, expected",
    [
        (4, 0, 10, [4, 8]),  # Accelerate's cadence
        (4, 3, 12, [7, 11]),  # DDP's gradient all-reduce for 3 steps, then every 4 from there
        (2, 5, 6, []),
    ],
)
def test_warmup_is_ddps_gradient_sync_then_every_k(fake_averager, local_sgd_steps, warmup_steps, steps, expected):
    # Post-local SGD (torch's PostLocalSGDOptimizer): during warm-up the gradients are all-reduced and
    # nothing is averaged; gradient sync goes off at the end of warm-up.
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=local_sgd_steps, warmup_steps=warmup_steps)
    last_step_synced, gradient_sync = [], []
    with local_sgd:
        for _ in range(steps):
            gradient_sync.append(local_sgd.model.require_backward_grad_sync)  # what this step's backward does
            local_sgd.step()
            last_step_synced.append(local_sgd.last_step_synced)
    assert fake_averager.synced == expected + [steps]  # and once on exit
    assert local_sgd.sync_count == len(expected) + 1
    assert gradient_sync == [True] * min(warmup_steps, steps) + [False] * max(0, steps - warmup_steps)
    assert local_sgd.model.require_backward_grad_sync is True, "restored on exit"
    (agreed,) = fake_averager.agreed_settings  # once, on enter, with the cadence in it
    assert agreed["local_sgd_steps"] == local_sgd_steps and agreed["warmup_steps"] == warmup_steps
    # Under DDP's gradient sync every warm-up step leaves the ranks identical: a moment to checkpoint.
    warm = list(range(1, min(warmup_steps, steps) + 1))
    assert [step for step, synced in enumerate(last_step_synced, start=1) if synced] == warm + expected


class ShardedWithinReplicaModel(torch.nn.Module):
    """What LocalSGD sees of an FSDP2 root module: no no_sync(), so nothing syncs gradients across replicas."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def set_requires_all_reduce(self, requires_all_reduce: bool) -> None:
        pass


def test_without_ddp_warmup_averages_every_step_then_every_k(fake_averager):
    local_sgd = local_sgd_over(fake_averager, ShardedWithinReplicaModel(), local_sgd_steps=4, warmup_steps=3)
    with local_sgd:
        for _ in range(12):
            local_sgd.step()
    assert fake_averager.synced == [1, 2, 3, 7, 11, 12]


def test_an_exception_in_the_block_skips_the_exit_sync_and_restores_grad_sync(fake_averager):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=2)
    with pytest.raises(KeyError):
        with local_sgd:
            assert local_sgd.model.require_backward_grad_sync is False
            local_sgd.step()
            local_sgd.step()
            raise KeyError("bug")
    assert fake_averager.synced == [2]
    assert local_sgd.model.require_backward_grad_sync is True


def test_disabled_builds_no_averager_and_counts_steps(fake_averager):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=2, enabled=False)
    with local_sgd:
        for _ in range(5):
            local_sgd.step()
    assert fake_averager.built == [] and local_sgd.num_steps == 5 and local_sgd.sync_count == 0


def test_the_averager_gets_the_options_the_names_and_the_cadence_to_agree_on(fake_averager):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=3, warmup_steps=1, bucket_cap_mb=4, check_finite=True)
    with local_sgd:
        local_sgd.step()
    ((options, kwargs, averager),) = fake_averager.built
    assert options is local_sgd.options
    assert options == AveragingOptions(bucket_cap_mb=4, check_finite=True)
    assert kwargs["names"] == ["linear.weight", "linear.bias"]
    assert kwargs["agreement_settings"] == {
        "local_sgd_steps": 3,
        "warmup_steps": 1,
        "outer_optimizer": False,
        "sync_buffers": False,
        "sync_delay": 0,
        "num_fragments": 1,
        "wire": "fp32",
        "hierarchy": None,
        "merge": "eager",
        "fragment_update_alpha": 0.0,
    }
    averager.verify_ranks_agree.assert_called_once_with()


def test_the_averager_is_rebuilt_only_when_the_parameters_change(fake_averager):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=1)
    with local_sgd:
        local_sgd.step()
        local_sgd.step()
        local_sgd.model.extra = torch.nn.Linear(1, 1)  # registers two parameters
        local_sgd.step()
    assert len(fake_averager.built) == 2
    assert len(fake_averager.built[1][2].params) == 4


def test_a_resumed_run_keeps_the_cadence(fake_averager):
    first = local_sgd_over(fake_averager, local_sgd_steps=4)
    with first:
        for _ in range(6):
            first.step()
    resumed = local_sgd_over(fake_averager, local_sgd_steps=4)
    resumed.load_state_dict(first.state_dict())
    fake_averager.synced.clear()
    with resumed:
        for _ in range(3):
            resumed.step()
    assert fake_averager.synced == [8, 9]  # step 8 as if uninterrupted, then the exit


@pytest.mark.parametrize(
    "local_sgd_steps, sync_delay, warmup_steps, steps, started, merged, waited, checkpointable",
    [
        (4, 2, 0, 10, [4, 8], [6, 10], [10], [6, 10]),  # nothing in flight at the end: only the exit sync waits
        (4, 3, 0, 9, [4, 8], [7, 9], [9], [7]),  # the exit merges the average in flight, then syncs
        (4, 1, 2, 8, [6], [7], [8], [1, 2, 7]),  # warm-up: DDP's gradient sync, every step identical
    ],
)
def test_sync_delay_starts_at_each_sync_and_merges_sync_delay_steps_later(
    fake_averager, local_sgd_steps, sync_delay, warmup_steps, steps, started, merged, waited, checkpointable
):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=local_sgd_steps, sync_delay=sync_delay, warmup_steps=warmup_steps)
    synced_steps = []
    with local_sgd:
        for _ in range(steps):
            local_sgd.step()
            if local_sgd.last_step_synced:
                synced_steps.append(local_sgd.num_steps)
    assert (fake_averager.started, fake_averager.merged, fake_averager.synced) == (started, merged, waited)
    assert local_sgd.sync_count == len(merged) + len(waited)
    assert synced_steps == checkpointable  # last_step_synced: a sync completed, none in flight


def test_sync_delay_drains_on_an_exception_and_refuses_state_dict_in_flight(fake_averager):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=4, sync_delay=2)
    with pytest.raises(KeyError):
        with local_sgd:
            for _ in range(5):
                local_sgd.step()
            with pytest.raises(RuntimeError, match="while a delayed average .* is in flight"):
                local_sgd.state_dict()
            raise KeyError("bug")
    assert fake_averager.drained == [5] and fake_averager.merged == [] and fake_averager.synced == []


@pytest.mark.parametrize(
    "kwargs, exception, message",
    [
        (dict(sync_delay=4), ValueError, "sync_delay must be below local_sgd_steps .* got sync_delay=4 with local_sgd_steps=4"),
        (dict(sync_delay=2, num_fragments=2), ValueError, "sync_delay must be below local_sgd_steps / num_fragments"),
        (dict(sync_delay=-1), ValueError, "sync_delay must be an int >= 0, got -1"),
        (dict(sync_delay=1.0), TypeError, r"sync_delay must be an int >= 0, got 1.0 \(float\)"),
    ],
)
def test_sync_delay_refuses_what_it_cannot_do(fake_averager, kwargs, exception, message):
    with pytest.raises(exception, match=message):
        local_sgd_over(fake_averager, local_sgd_steps=4, **kwargs)


def test_a_manager_refuses_a_hierarchy_and_takes_every_other_option(fake_averager):
    manager = types.SimpleNamespace(_use_async_quorum=False)
    with pytest.raises(NotImplementedError, match=r"LocalSGD with manager= \(torchft\) does not support hierarchy yet"):
        local_sgd_over(fake_averager, local_sgd_steps=4, manager=manager, hierarchy={2: 2})
    for wire in ("fp32", "bf16", "fp16", "int8", "fp8", "int4"):
        quantized = wire.startswith(("int", "fp8"))
        local_sgd_over(
            fake_averager,
            local_sgd_steps=4,
            manager=manager,
            wire=wire,
            error_feedback=quantized,
            sync_delay=1,
            zero_copy=True,
            sync_buffers=True,
            outer_optimizer="diloco",
        )


class FourLayerModel(NoSyncModel):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def test_fragments_split_the_parameters_in_order_and_sync_in_turn(fake_averager):
    local_sgd = local_sgd_over(fake_averager, FourLayerModel(), local_sgd_steps=4, num_fragments=2, warmup_steps=1)
    with local_sgd:
        for _ in range(9):
            local_sgd.step()
    fragments = [averager.params for _, _, averager in fake_averager.built]
    assert [p for fragment in fragments for p in fragment] == list(local_sgd.model.parameters())
    assert [len(fragment) for fragment in fragments] == [4, 4]  # 2x2+2+8x8+8 | 64+8+16+2 elements
    assert [kwargs["names"][0] for _, kwargs, _ in fake_averager.built] == ["linear.weight", "layers.1.weight"]
    # After warm-up (step 1, DDP's), one fragment every 2 steps, in turn; the exit syncs both.
    assert fake_averager.fragments_synced == [(3, 0), (5, 1), (7, 0), (9, 1), (9, 0), (9, 1)]
    assert local_sgd.sync_count == 6


def test_fragments_with_sync_delay_keep_one_fragment_in_flight(fake_averager):
    local_sgd = local_sgd_over(fake_averager, FourLayerModel(), local_sgd_steps=6, num_fragments=3, sync_delay=1)
    with local_sgd:
        for _ in range(7):
            local_sgd.step()
    assert fake_averager.started == [2, 4, 6] and fake_averager.merged == [3, 5, 7]
    started_fragments = [
        [call for call in averager.method_calls if call[0] == "start_average"] for _, _, averager in fake_averager.built
    ]
    assert [len(calls) for calls in started_fragments] == [1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(local_sgd_steps=6, num_fragments=4),
            "local_sgd_steps must be a multiple of num_fragments .* got local_sgd_steps=6, num_fragments=4",
        ),
        (dict(local_sgd_steps=4, num_fragments=0), "num_fragments must be an int >= 1, got 0"),
    ],
)
def test_fragments_refuse_a_cadence_they_cannot_keep(fake_averager, kwargs, message):
    with pytest.raises(ValueError, match=message):
        local_sgd_over(fake_averager, **kwargs)


@pytest.mark.parametrize(
    "sizes, num_fragments, bounds",
    [
        ([10, 10, 10, 10], 2, [0, 2, 4]),
        ([100, 1, 1, 1], 2, [0, 1, 4]),  # the big one alone
        ([1, 1, 1, 100], 3, [0, 2, 3, 4]),  # every fragment keeps at least one parameter
        ([5, 5, 5], 1, [0, 3]),
        ([0, 0, 0], 3, [0, 1, 2, 3]),
    ],
)
def test_fragment_bounds_are_contiguous_and_balanced_by_bytes(sizes, num_fragments, bounds):
    assert fragment_bounds(sizes, num_fragments) == bounds


def test_fragment_bounds_refuse_more_fragments_than_parameters():
    with pytest.raises(ValueError, match=r"num_fragments must be at most the number of parameters \(2\), got num_fragments=3"):
        fragment_bounds([4, 4], 3)


@pytest.mark.parametrize(
    "kwargs, exception, message",
    [
        (
            dict(wire="int2"),
            ValueError,
            r"wire must be None or one of \('fp32', 'bf16', 'fp16', 'int8', 'fp8', 'int4'\), got 'int2'",
        ),
        (dict(error_feedback=True), ValueError, 'error_feedback and wire_block_size need wire="int8", "fp8" or "int4"'),
        (dict(wire="int4", wire_block_size=7), ValueError, 'wire="int4" packs two codes .* must be even, got 7'),
        (dict(wire="bf16", error_feedback=True), ValueError, "with wire='bf16'"),
        (
            dict(wire="int8", comm_dtype=torch.bfloat16),
            ValueError,
            "wire='int8' replaces the float wire: it needs comm_dtype=None",
        ),
        (dict(wire="fp16", comm_dtype=torch.bfloat16), ValueError, "wire='fp16' and comm_dtype=torch.bfloat16 disagree"),
        (dict(wire="int8", wire_block_size=0), ValueError, "wire_block_size must be an int >= 1, got 0"),
        (dict(wire="int8", error_feedback="yes"), TypeError, "error_feedback must be a bool"),
    ],
)
def test_the_quantized_wires_refuse_what_they_cannot_do(fake_averager, kwargs, exception, message):
    with pytest.raises(exception, match=message):
        local_sgd_over(fake_averager, local_sgd_steps=4, **kwargs)


@pytest.mark.parametrize(
    "kwargs, wire, comm_dtype",
    [
        (dict(), "fp32", None),
        (dict(wire="fp32"), "fp32", None),
        (dict(wire="bf16"), "bf16", torch.bfloat16),
        (dict(comm_dtype=torch.bfloat16), "bf16", torch.bfloat16),  # comm_dtype, the alias
        (dict(wire="fp16", comm_dtype=torch.float16), "fp16", torch.float16),
    ],
)
def test_wire_names_every_float_wire_and_comm_dtype_is_its_alias(fake_averager, kwargs, wire, comm_dtype):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=4, **kwargs)
    assert local_sgd.wire == wire and local_sgd.comm_dtype == comm_dtype
    with local_sgd:
        pass
    (options, _, _), *_ = fake_averager.built
    assert options.comm_dtype == comm_dtype, "the engine gets the float wire as its comm_dtype"
    assert local_sgd_over(fake_averager, local_sgd_steps=4, wire="int8").wire == "int8"


def test_the_quantized_averager_refuses_tensors_it_cannot_quantize():
    from localsgd_ext import QuantizedAverager

    with pytest.raises(TypeError, match=r"the int8 wire averages float32 tensors; params\[1\] \(params\[1\]\) is torch.bfloat16"):
        QuantizedAverager([torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="block_size must be at most 1048576, got 2097152"):
        QuantizedAverager([torch.zeros(3)], block_size=1 << 21)
    with pytest.raises(ValueError, match="wire must be one of \\('int8', 'fp8', 'int4'\\), got 'fp4'"):
        QuantizedAverager([torch.zeros(3)], wire="fp4")
    with pytest.raises(ValueError, match="the int4 wire packs two codes per byte: block_size must be even, got 5"):
        QuantizedAverager([torch.zeros(3)], wire="int4", block_size=5)


def test_hierarchy_and_zero_copy_compose_with_every_option():
    # Built only (the values are test_combinations.py's): nothing is refused.
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    for options in (
        dict(num_fragments=2),
        dict(sync_delay=1),
        dict(wire="int8"),
        dict(outer_optimizer="diloco"),
        dict(zero_copy=True),
    ):
        LocalSGD(accelerator=accelerator, model=NoSyncModel(), local_sgd_steps=4, hierarchy={2: 2}, **options)


@pytest.mark.parametrize(
    "options, in_place, flat_layout",
    [
        (dict(), True, False),  # every sync in place: the fragment's own engine keeps the layout
        (dict(wire="bf16"), False, True),  # casts: staged from the flat buffers a layout-only engine keeps
        (dict(wire="int8"), False, True),
        (dict(sync_delay=1), False, True),  # snapshots
    ],
)
def test_zero_copy_keeps_the_parameters_flat_whatever_the_sync_stages(fake_averager, options, in_place, flat_layout):
    local_sgd = local_sgd_over(fake_averager, local_sgd_steps=4, zero_copy=True, **options)
    assert local_sgd.zero_copy is True and local_sgd.config.flat_layout is flat_layout
    assert local_sgd.options.zero_copy is in_place
    assert local_sgd.config.settings_to_agree_on()["zero_copy"] is True, "the ranks agree on what was asked"
