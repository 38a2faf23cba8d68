"""In-process checks of the Python API: argument errors, single-process behaviour, Accelerate's checks."""

import types

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType

from localsgd_ext import _C, LocalSGD, ParameterAverager


@pytest.fixture(scope="module")
def single_process_accelerator():
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.NO
    return accelerator


@pytest.mark.parametrize(
    "kwargs, exception, message",
    [
        (dict(bucket_cap_mb=0), ValueError, "bucket_cap_mb must be a positive finite number, got 0"),
        (dict(bucket_cap_mb=-2.5), ValueError, r"bucket_cap_mb must be a positive finite number, got -2.5"),
        (dict(bucket_cap_mb=float("inf")), ValueError, "got inf"),
        (dict(bucket_cap_mb=float("nan")), ValueError, "got nan"),
        (dict(bucket_cap_mb=True), TypeError, "bucket_cap_mb must be a positive number, got True"),
        (dict(bucket_cap_mb="25"), TypeError, "bucket_cap_mb must be a positive number, got '25'"),
        (dict(reduce_op="mean"), ValueError, r"reduce_op must be one of \('auto', 'avg', 'sum'\), got 'mean'"),
        (dict(process_group="world"), TypeError, "process_group must be a torch.distributed.ProcessGroup or None, got 'world'"),
        (dict(check_finite=1), TypeError, "check_finite must be a bool, got 1"),
        (dict(names=["a", "b"]), ValueError, "names must have one entry per tensor: got 2 names for 1 tensors"),
        (dict(sharded_model="model"), TypeError, "sharded_model must be a torch.nn.Module or None, got 'model'"),
    ],
)
def test_averager_rejects_bad_options(kwargs, exception, message):
    with pytest.raises(exception, match=message):
        ParameterAverager([torch.zeros(3)], **kwargs)


@pytest.mark.parametrize(
    "params, exception, message",
    [
        (torch.zeros(3), TypeError, "params must be an iterable of tensors"),
        ([torch.zeros(3), [1.0]], TypeError, r"params\[1\] must be a torch.Tensor, got list"),
        ([torch.zeros(3, dtype=torch.int64)], TypeError, r"params\[0\] must have a floating-point dtype .* got torch.int64"),
        ([torch.zeros(3, device="meta")], ValueError, r"params\[0\] is on the meta device"),
        (
            [torch.zeros(3).to_sparse()],
            ValueError,
            r"params\[0\] must be a dense \(strided\) tensor, got layout torch.sparse_coo",
        ),
    ],
)
def test_averager_rejects_bad_params(params, exception, message):
    with pytest.raises(exception, match=message):
        ParameterAverager(params)


def test_averager_rejects_a_tensor_listed_twice():
    t = torch.zeros(3)
    with pytest.raises(ValueError, match=r"params\[2\] appears more than once"):
        ParameterAverager([t, torch.zeros(2), t])


def test_average_without_a_process_group_says_what_to_do():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        ParameterAverager([torch.zeros(3)]).average()


def test_an_empty_parameter_list_plans_nothing():
    assert ParameterAverager([]).buckets == []


def test_local_sgd_is_disabled_without_distribution(single_process_accelerator):
    model = torch.nn.Linear(3, 2)  # a plain module: no no_sync() needed when disabled
    before = [p.detach().clone() for p in model.parameters()]
    with LocalSGD(accelerator=single_process_accelerator, model=model, local_sgd_steps=2) as local_sgd:
        assert local_sgd.enabled is False
        for _ in range(5):
            local_sgd.step()
    assert local_sgd.num_steps == 5
    assert local_sgd.sync_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (local_sgd.accelerator, local_sgd.model, local_sgd.local_sgd_steps) == (single_process_accelerator, model, 2)


def test_local_sgd_rejects_a_bad_bucket_cap(single_process_accelerator):
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive finite number, got 0"):
        LocalSGD(single_process_accelerator, torch.nn.Linear(2, 2), 4, bucket_cap_mb=0)


@pytest.mark.parametrize("distributed_type", [DistributedType.DEEPSPEED, DistributedType.XLA])
def test_local_sgd_refuses_what_accelerate_refuses(distributed_type):
    # On a CPU-only machine a real Accelerator is only ever NO or MULTI_CPU (Accelerate 1.15 turns FSDP
    # and ParallelismConfig down on CPU), so the other types are reached through an object that carries
    # just the attributes LocalSGD reads.
    accelerator = types.SimpleNamespace(distributed_type=distributed_type)
    with pytest.raises(NotImplementedError, match=r"LocalSGD is supported only for CPUs and GPUs \(no DeepSpeed or MegatronLM\)"):
        LocalSGD(accelerator=accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4)


def test_accelerate_fsdp1_is_refused_and_fsdp2_accepted():
    fsdp1 = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(NotImplementedError, match=r"FSDP2 only \(fsdp_version=2\)"):
        LocalSGD(accelerator=fsdp1, model=torch.nn.Linear(2, 2), local_sgd_steps=4)
    fsdp2 = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, torch_device_mesh=None)
    local_sgd = LocalSGD(accelerator=fsdp2, model=torch.nn.Linear(2, 2), local_sgd_steps=4)
    assert local_sgd.enabled and local_sgd.process_group is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(device_mesh="replicate"),
            TypeError,
            r"device_mesh must be a torch.distributed.device_mesh.DeviceMesh or None, got 'replicate'",
        ),
        (dict(mesh_dim="replicate"), ValueError, r"mesh_dim needs device_mesh, got mesh_dim='replicate' with device_mesh=None"),
        (dict(device_mesh="m", process_group="g"), ValueError, r"pass process_group or device_mesh, not both"),
    ],
)
def test_bad_replica_arguments_are_refused_by_name(single_process_accelerator, kwargs, error, message):
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(error, match=message):
        LocalSGD(accelerator=accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bucket_cap_bytes=0), "bucket_cap_bytes must be positive, got 0"),
        (dict(bucket_cap_bytes=1024, buffers_in_flight=0), "buffers_in_flight must be between 1 and 3, got 0"),
        (dict(bucket_cap_bytes=1024, buffers_in_flight=4), "buffers_in_flight must be between 1 and 3, got 4"),
    ],
)
def test_engine_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _C.BucketedAverager([torch.zeros(3)], **kwargs)


def test_engine_refuses_none_as_group_instead_of_crashing():
    engine = _C.BucketedAverager([torch.zeros(3)], 1024)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        engine.average(None, True, torch.device("cpu"), False)


def test_engine_refuses_what_the_python_layer_refuses():
    with pytest.raises(TypeError, match=r"tensors\[0\] must have a floating-point dtype to be averaged, got Long"):
        _C.BucketedAverager([torch.zeros(3, dtype=torch.int64)], 1024)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on the meta device"):
        _C.BucketedAverager([torch.zeros(3), torch.zeros(3, device="meta")], 1024)


LOCAL_SGD_BAD_ARGUMENTS = [
    # (description, constructor arguments, exception, message)
    (
        "steps bool",
        dict(local_sgd_steps=True),
        TypeError,
        r"local_sgd_steps must be an int >= 1 \(or a whole float such as 8.0; None only with enabled=False\), got True \(bool\)",
    ),
    ("steps fractional", dict(local_sgd_steps=8.5), TypeError, r"local_sgd_steps must be an int >= 1 .*got 8.5 \(float\)"),
    ("steps str", dict(local_sgd_steps="8"), TypeError, r"got '8' \(str\)"),
    ("steps zero", dict(local_sgd_steps=0), ValueError, "local_sgd_steps must be an int >= 1, got 0"),
    ("steps negative", dict(local_sgd_steps=-3), ValueError, "got -3"),
    ("steps None while enabled", dict(local_sgd_steps=None), TypeError, r"None only with enabled=False\), got None"),
    ("enabled not bool", dict(enabled="yes"), TypeError, r"enabled must be a bool \(or 0 or 1\), got 'yes' \(str\)"),
    ("enabled 2", dict(enabled=2), TypeError, r"enabled must be a bool \(or 0 or 1\), got 2 \(int\)"),
    (
        "model not a module",
        dict(model=[torch.nn.Parameter(torch.zeros(2))]),
        TypeError,
        "model must be a torch.nn.Module, got list",
    ),
    ("bucket cap", dict(bucket_cap_mb=0), ValueError, "bucket_cap_mb must be a positive finite number, got 0"),
    ("check_finite", dict(check_finite="no"), TypeError, "check_finite must be a bool, got 'no'"),
    ("zero_copy", dict(zero_copy=1), TypeError, "zero_copy must be a bool, got 1"),
    ("sync_buffers", dict(sync_buffers=None), TypeError, "sync_buffers must be a bool, got None"),
    ("warmup negative", dict(warmup_steps=-1), ValueError, "warmup_steps must be an int >= 0, got -1"),
    ("warmup float", dict(warmup_steps=2.5), TypeError, r"warmup_steps must be an int >= 0, got 2.5 \(float\)"),
    (
        "outer unknown name",
        dict(outer_optimizer="adam"),
        ValueError,
        "outer_optimizer must be None, \"diloco\" or a callable, got 'adam'",
    ),
    (
        "outer an optimizer instance",
        dict(outer_optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)),
        TypeError,
        'outer_optimizer must be None, "diloco", or a callable that builds an optimizer',
    ),
    (
        "anchor device",
        dict(outer_optimizer="diloco", outer_anchor_device="gpu"),
        ValueError,
        r"outer_anchor_device must be one of \('device', 'cpu'\), got 'gpu'",
    ),
    (
        "comm_dtype not floating",
        dict(comm_dtype=torch.int8),
        ValueError,
        "comm_dtype must be None, torch.bfloat16 or torch.float16, got torch.int8",
    ),
]


@pytest.mark.parametrize(
    "description, kwargs, exception, message", LOCAL_SGD_BAD_ARGUMENTS, ids=[c[0] for c in LOCAL_SGD_BAD_ARGUMENTS]
)
def test_local_sgd_rejects_bad_arguments(single_process_accelerator, description, kwargs, exception, message):
    arguments = dict(accelerator=single_process_accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4)
    arguments.update(kwargs)
    with pytest.raises(exception, match=message):
        LocalSGD(**arguments)


@pytest.mark.parametrize("steps, enabled, expected_enabled", [(8.0, 1, True), (8, 0, False), (8.0, True, True)])
def test_local_sgd_accepts_what_accelerate_accepts_from_a_config_file(steps, enabled, expected_enabled):
    # Accelerate's LocalSGD takes local_sgd_steps=8.0 (YAML, JSON) and enabled=0/1 as truth values.
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    local_sgd = LocalSGD(accelerator=accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=steps, enabled=enabled)
    assert local_sgd.local_sgd_steps == 8 and isinstance(local_sgd.local_sgd_steps, int)
    assert local_sgd.enabled is expected_enabled


def test_local_sgd_says_once_why_it_is_disabled_under_a_single_process(single_process_accelerator, caplog, monkeypatch):
    import localsgd_ext.local_sgd as local_sgd_module

    monkeypatch.setattr(local_sgd_module, "_disabled_notice_given", False)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert not LocalSGD(accelerator=single_process_accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4).enabled
        LocalSGD(accelerator=single_process_accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4, enabled=False)
    notices = [r for r in caplog.records if "LocalSGD is disabled" in r.getMessage()]
    assert len(notices) == 1, "once, and not when the user disabled it"
    assert (
        "distributed_type=DistributedType.NO" in notices[0].getMessage()
        and "torchrun --nproc-per-node" in notices[0].getMessage()
    )


def test_local_sgd_accepts_none_steps_when_disabled_as_accelerates_example_does(single_process_accelerator):
    local_sgd = LocalSGD(accelerator=single_process_accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=None, enabled=False)
    with local_sgd:
        local_sgd.step()
    assert local_sgd.num_steps == 1 and local_sgd.local_sgd_steps is None


@pytest.mark.parametrize("accelerator", [None, "accelerator"])
def test_local_sgd_names_a_missing_accelerator(accelerator):
    with pytest.raises(TypeError, match=rf"accelerator must be an accelerate.Accelerator, got {accelerator!r}"):
        LocalSGD(accelerator=accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4)


def test_a_huge_bucket_cap_plans_one_bucket_instead_of_overflowing():
    averager = ParameterAverager([torch.zeros(3), torch.zeros(5)], bucket_cap_mb=1e13)
    assert [b["tensor_indices"] for b in averager.buckets] == [[0, 1]]


@pytest.mark.parametrize(
    "tensor, message",
    [
        (
            torch.zeros(1, 1).expand(4, 3),
            r"tensors\[0\] \('w'\) has elements that share memory \(sizes \[4, 3\], strides \[0, 0\]",
        ),
        (torch.zeros(6)[::2].unsqueeze(0).expand(2, 3), "has elements that share memory"),
    ],
)
def test_expanded_tensors_are_refused_before_anything_is_written(tensor, message):
    with pytest.raises(ValueError, match=message):
        ParameterAverager([tensor], names=["w"])


def test_freed_storage_is_refused_instead_of_read():
    t = torch.zeros(4, 3)
    t.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match=r"tensors\[0\] \('w'\) needs 48 bytes of storage but its storage holds 0"):
        ParameterAverager([t], names=["w"])


@pytest.mark.parametrize(
    "state, exception, message",
    [
        (
            {"num_steps": "abc", "sync_count": 0, "outer": None},
            TypeError,
            r"state_dict\['num_steps'\] must be an int >= 0, got 'abc' \(str\)",
        ),
        (
            {"num_steps": 3, "sync_count": -1, "outer": None},
            ValueError,
            r"state_dict\['sync_count'\] must be an int >= 0, got -1",
        ),
        ([("num_steps", 3)], TypeError, "state_dict must be a dict from LocalSGD.state_dict"),
        ({"num_steps": 3}, ValueError, r"state_dict is missing \['outer', 'sync_count'\]; it must come from"),
        ({"sync_count": 3, "outer": None}, ValueError, r"state_dict is missing \['num_steps'\]"),
        (
            {"num_steps": 3, "sync_count": 1, "outer": {"anchor": []}},
            ValueError,
            "state_dict was saved with outer_optimizer set, but this LocalSGD has outer_optimizer None",
        ),
    ],
)
def test_load_state_dict_names_bad_entries(single_process_accelerator, state, exception, message):
    local_sgd = LocalSGD(accelerator=single_process_accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4)
    with pytest.raises(exception, match=message):
        local_sgd.load_state_dict(state)
    assert local_sgd.num_steps == 0 and local_sgd.sync_count == 0, "nothing changes when a state is refused"


def test_nesting_one_local_sgd_is_refused(single_process_accelerator):
    local_sgd = LocalSGD(accelerator=single_process_accelerator, model=torch.nn.Linear(2, 2), local_sgd_steps=4)
    with local_sgd:
        with pytest.raises(RuntimeError, match="already inside its `with` block"):
            with local_sgd:
                pass
    with local_sgd:  # entering again after the block ended is fine
        local_sgd.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(agreement_settings=[("local_sgd_steps", 4)]), "agreement_settings must be a mapping or None, got list"),
        (dict(agreement_tensors=[torch.zeros(2)]), r"agreement_tensors\[0\] must be a \(name, tensor\) pair, got tensor"),
        (dict(agreement_tensors=[("b", "not a tensor")]), r"agreement_tensors\[0\] must be a \(name, tensor\) pair"),
    ],
)
def test_averager_rejects_bad_agreement_arguments(kwargs, message):
    with pytest.raises(TypeError, match=message):
        ParameterAverager([torch.zeros(3)], **kwargs)


def test_with_options_takes_built_options_only():
    from localsgd_ext import AveragingOptions

    averager = ParameterAverager.with_options([torch.zeros(3)], AveragingOptions(bucket_cap_mb=1, check_finite=True))
    assert (averager.bucket_cap_mb, averager.check_finite, averager.reduce_op) == (1.0, True, "auto")
    with pytest.raises(TypeError, match="options must be an AveragingOptions, got dict"):
        ParameterAverager.with_options([torch.zeros(3)], {"bucket_cap_mb": 1})
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive finite number, got 0"):
        AveragingOptions(bucket_cap_mb=0)
