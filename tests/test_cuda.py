"""The CUDA path: fused pack/unpack kernels against torch, one launch per call, and NCCL averaging.

Skipped without a GPU (and without the fused kernels in the build). What runs anywhere: test_ops.py
covers CUDA too when present, and scripts/check_cuda_kernels.sh compiles the kernels and runs their
per-thread code on the host. One GPU means NCCL runs with world size 1 here; multi-rank correctness is
shown on CPU with gloo, through the same engine.
"""

import random

import pytest
import torch
from multiprocess import run_ranks
from test_averager_distributed import check_means
from workers_local_sgd import SCENARIOS

from localsgd_ext import _C, ops

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _C.CUDA_KERNELS_BUILT, reason="localsgd_ext was built without its CUDA kernels"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CHUNK_BYTES = 16 * 1024  # csrc/cuda/slot_table.h: kChunkBytes
BUFFER_POISON = 0xAB
TENSOR_POISON = 0xCD


def interesting_sizes(dtype):
    """Sizes around the 16-byte vector width and the chunk boundaries, plus random ones."""
    per_vector = 16 // torch.empty((), dtype=dtype).element_size()
    chunk = CHUNK_BYTES // torch.empty((), dtype=dtype).element_size()
    return [
        1,
        2,
        per_vector - 1,
        per_vector,
        per_vector + 1,
        3 * per_vector + 1,
        chunk - 1,
        chunk,
        chunk + 1,
        3 * chunk + per_vector - 1,
    ]


def poisoned(numel, dtype, byte, storage_offset=0):
    """A CUDA tensor of `numel` elements `storage_offset` elements into a poisoned storage that also
    extends past its end, so writes outside it show."""
    storage = torch.empty(numel + storage_offset + 9, dtype=dtype, device="cuda")
    storage.view(torch.uint8).fill_(byte)
    return storage, storage[storage_offset : storage_offset + numel]


def random_case(rng, dtype):
    sizes = interesting_sizes(dtype)
    count = rng.randrange(1, 30)
    sources, offsets, cursor = [], [], 0
    for _ in range(count):
        numel = rng.choice(sizes) if rng.random() < 0.7 else rng.randrange(0, 50_000)
        shift = rng.choice([0, 0, 0, 1, 3])  # a misaligned data pointer: the scalar path
        storage = torch.randn(numel + shift, device="cuda").to(dtype) * 100
        sources.append(storage[shift:])
        cursor += rng.choice([0, 0, 1, 5])  # misaligned slots too
        offsets.append(cursor)
        cursor += numel
    return sources, offsets, cursor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_fused_kernels_match_torch_bit_for_bit(dtype, seed):
    rng = random.Random(seed)
    sources, offsets, total = random_case(rng, dtype)
    buffer_storage, buffer = poisoned(total, dtype, BUFFER_POISON)
    ops.pack_into(sources, offsets, buffer)
    written = torch.zeros(buffer_storage.numel(), dtype=torch.bool, device="cuda")
    for src, off in zip(sources, offsets):
        assert torch.equal(buffer[off : off + src.numel()].view(torch.uint8), src.view(torch.uint8))
        written[off : off + src.numel()] = True
    untouched = buffer_storage.view(torch.uint8).view(buffer_storage.numel(), -1)[~written]
    assert bool((untouched == BUFFER_POISON).all()), "pack wrote outside the tensors' slots"

    for divisor in (1.0, 2.0, 3.0, 7.0):
        targets = [poisoned(src.numel(), dtype, TENSOR_POISON, rng.choice([0, 1, 4])) for src in sources]
        ops.unpack_from(buffer, offsets, divisor, [t for _, t in targets])
        for src, (storage, target) in zip(sources, targets):
            expected = src if divisor == 1.0 else src / divisor  # torch's rounding on this device
            assert torch.equal(target.view(torch.uint8), expected.view(torch.uint8)), f"divisor {divisor}"
            outside = torch.ones(storage.numel(), dtype=torch.bool, device="cuda")
            start = target.storage_offset()
            outside[start : start + target.numel()] = False
            assert bool((storage.view(torch.uint8).view(storage.numel(), -1)[outside] == TENSOR_POISON).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_on_cuda(dtype):
    tensors = [torch.randn(3, 4, device="cuda").to(dtype), torch.randn(4100, device="cuda").to(dtype)]
    offsets = [0, 16]
    buffer = torch.zeros(4116, dtype=dtype, device="cuda")
    torch.library.opcheck(torch.ops.localsgd_ext.pack_into.default, (tensors, offsets, buffer))
    targets = [torch.zeros_like(t) for t in tensors]
    torch.library.opcheck(torch.ops.localsgd_ext.unpack_from.default, (buffer, offsets, 3.0, targets))


def kernels_launched(fn):
    """Names of the CUDA kernels `fn` launched, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "emcpy" not in e.name]


def test_one_kernel_launch_per_call_for_many_tensors():
    tensors = [torch.randn(n, device="cuda") for n in range(1, 2001)]
    offsets, cursor = [], 0
    for t in tensors:
        offsets.append(cursor)
        cursor += (t.numel() + 3) // 4 * 4
    buffer = torch.zeros(cursor, device="cuda")
    ops.pack_into(tensors, offsets, buffer)  # warm-up: CUDA context, pinned pool
    packed = kernels_launched(lambda: ops.pack_into(tensors, offsets, buffer))
    unpacked = kernels_launched(lambda: ops.unpack_from(buffer, offsets, 2.0, tensors))
    assert len(packed) == 1 and "multi_tensor_copy_kernel" in packed[0], packed
    assert len(unpacked) == 1 and "multi_tensor_copy_kernel" in unpacked[0], unpacked


def cast_probes(numel, generator_seed):
    """float32 values for the fused casts: ordinary ones, every exponent (random bits), values past
    fp16's range, subnormals of both wires, signed zeros, infinities and NaN."""
    g = torch.Generator(device="cuda").manual_seed(generator_seed)
    normal = torch.randn(numel, device="cuda", generator=g) * 100
    bits = torch.randint(-(2**31), 2**31 - 1, (numel,), device="cuda", generator=g, dtype=torch.int64)
    any_exponent = bits.to(torch.int32).view(torch.float32)
    tiny = torch.randn(numel, device="cuda", generator=g) * 2.0**-130
    huge = torch.randn(numel, device="cuda", generator=g) * 7e4
    pick = torch.randint(0, 4, (numel,), device="cuda", generator=g)
    values = torch.where(pick == 0, normal, torch.where(pick == 1, any_exponent, torch.where(pick == 2, tiny, huge)))
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0], device="cuda")
    values[: min(numel, specials.numel())] = specials[: min(numel, specials.numel())]
    return values


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_fused_casts_match_torch_bit_for_bit(wire, seed):
    rng = random.Random(seed)
    sizes = interesting_sizes(wire) + interesting_sizes(torch.float32)
    sources, offsets, cursor = [], [], 0
    for i in range(rng.randrange(1, 30)):
        numel = rng.choice(sizes) if rng.random() < 0.7 else rng.randrange(0, 50_000)
        shift = rng.choice([0, 0, 0, 1, 3])
        sources.append(cast_probes(numel + shift, seed * 100 + i)[shift:])
        cursor += rng.choice([0, 0, 1, 5])
        offsets.append(cursor)
        cursor += numel
    for scale in (1.0, 0.5, 2.0**-10):
        buffer_storage, buffer = poisoned(cursor, wire, BUFFER_POISON)
        launches = kernels_launched(lambda: ops.pack_into(sources, offsets, buffer, scale))
        assert len(launches) == 1 and "multi_tensor_copy_kernel" in launches[0], launches
        written = torch.zeros(buffer_storage.numel(), dtype=torch.bool, device="cuda")
        for src, off in zip(sources, offsets):
            expected = (src if scale == 1.0 else src * scale).to(wire)
            got = buffer[off : off + src.numel()]
            same = (got.view(torch.int16) == expected.view(torch.int16)) | (got.isnan() & expected.isnan())
            assert bool(same.all()), f"scale {scale}"
            written[off : off + src.numel()] = True
        untouched = buffer_storage.view(torch.uint8).view(buffer_storage.numel(), -1)[~written]
        assert bool((untouched == BUFFER_POISON).all()), "pack wrote outside the tensors' slots"
    for divisor in (1.0, 2.0, 3.0, 7.0):
        targets = [poisoned(src.numel(), torch.float32, TENSOR_POISON, rng.choice([0, 1, 4])) for src in sources]
        launches = kernels_launched(lambda: ops.unpack_from(buffer, offsets, divisor, [t for _, t in targets]))
        assert len(launches) == 1 and "multi_tensor_copy_kernel" in launches[0], launches
        for src, off, (storage, target) in zip(sources, offsets, targets):
            widened = buffer[off : off + src.numel()].float()
            expected = widened if divisor == 1.0 else widened / divisor
            same = (target.view(torch.int32) == expected.view(torch.int32)) | (target.isnan() & expected.isnan())
            assert bool(same.all()), f"divisor {divisor}"
            outside = torch.ones(storage.numel(), dtype=torch.bool, device="cuda")
            outside[target.storage_offset() : target.storage_offset() + target.numel()] = False
            assert bool((storage.view(torch.uint8).view(storage.numel(), -1)[outside] == TENSOR_POISON).all())


def test_comm_dtype_sync_packs_and_unpacks_each_bucket_in_one_launch():
    result = run_ranks(1, "workers_averager:comm_dtype_sync_launches", timeout=180)[0]
    copies = [name for name in result["kernels"] if "multi_tensor_copy_kernel" in name]
    assert len(copies) == 2, result["kernels"]  # one pack, one unpack: no per-tensor casts
    for before, after in zip(result["before"], result["after"]):
        # World size 1: the mean is the value itself, as the bf16 wire carried it.
        assert torch.equal(after, before.to(torch.bfloat16).float())


def test_unpack_refuses_integer_buffers_by_name():
    buffer = torch.zeros(4, dtype=torch.int32, device="cuda")
    with pytest.raises(TypeError, match="buffer must be float16, bfloat16, float32 or float64 on CUDA, got Int"):
        ops.unpack_from(buffer, [0], 2.0, [torch.zeros(2, dtype=torch.int32, device="cuda")])


@pytest.mark.parametrize("bucket_cap_mb", [1, 25])
def test_parameter_averager_on_nccl_world_size_1(bucket_cap_mb):
    """The engine on NCCL: mixed dtypes, a non-contiguous tensor, empty ones; AVG and SUM paths."""
    results = run_ranks(1, "workers_averager:average_mixed", bucket_cap_mb, 2, "cuda", timeout=180)
    check_means(1, results, 2)
    assert set(results[0]["avg"]["devices"]) == {"cuda"}


def test_local_sgd_on_nccl_matches_accelerate():
    """Every LocalSGD scenario on one GPU with NCCL, ours (both modes) against Accelerate's, bit for bit."""
    results = run_ranks(
        1,
        "workers_local_sgd:compare_with_accelerate",
        list(SCENARIOS),
        False,
        timeout=300,
        env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    )[0]
    for name, r in results.items():
        assert r["backend"] == "nccl", name
        for mode, mine in r["modes"].items():
            assert mine["our_num_steps"] == r["their_num_steps"], (name, mode)
            for i, (ours, theirs) in enumerate(zip(mine["ours"], r["theirs"])):
                assert torch.equal(ours, theirs), f"{name} {mode} parameter {i}: max diff {(ours - theirs).abs().max()}"


def test_syncs_on_alternating_streams_see_each_other():
    result = run_ranks(1, "workers_averager:average_on_alternating_streams", timeout=120)[0]
    for got, expected in zip(result["got"], result["expected"]):
        assert torch.equal(got, expected)
