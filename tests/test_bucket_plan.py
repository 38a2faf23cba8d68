"""The bucket planner (pure logic, through localsgd_ext._C.plan_buckets)."""

import random

import pytest

import localsgd_ext  # noqa: F401  (loads torch first)
from localsgd_ext import _C

MiB = 2**20


def plan(inputs, cap_bytes=MiB, alignment_bytes=16):
    return _C.plan_buckets(inputs, cap_bytes, alignment_bytes)


def check_invariants(inputs, buckets, cap_bytes, alignment_bytes=16):
    """Every tensor exactly once, in a bucket of its own group, inside the buffer, not overlapping
    another, aligned when not empty; buckets over the cap hold exactly one tensor."""
    seen = sorted(i for b in buckets for i in b["tensor_indices"])
    assert seen == list(range(len(inputs)))
    for b in buckets:
        assert b["tensor_indices"] == sorted(b["tensor_indices"])
        spans = []
        for index, offset in zip(b["tensor_indices"], b["offsets"]):
            group, numel, element_size = inputs[index]
            assert group == b["group"] and element_size == b["element_size"]
            assert 0 <= offset and offset + numel <= b["numel"]
            if numel:
                assert (offset * element_size) % alignment_bytes == 0 or alignment_bytes % element_size
                spans.append((offset, offset + numel))
        spans.sort()
        assert all(a[1] <= b_[0] for a, b_ in zip(spans, spans[1:])), "tensors overlap in a bucket"
        if b["numel"] * b["element_size"] > cap_bytes:
            assert len([i for i in b["tensor_indices"] if inputs[i][1]]) == 1


def test_uneven_sizes_fill_buckets_in_order():
    inputs = [(0, 100_000, 4), (0, 60_000, 4), (0, 100_000, 4), (0, 30_000, 4)]  # 400, 240, 400, 120 KB
    buckets = plan(inputs, cap_bytes=MiB // 2)  # 524,288 bytes: 400 + 120 KB fit, 240 + 400 do not
    assert [b["tensor_indices"] for b in buckets] == [[0], [1], [2, 3]]
    assert buckets[2]["offsets"] == [0, 100_000]
    check_invariants(inputs, buckets, MiB // 2)


def test_tensor_larger_than_cap_gets_its_own_bucket():
    inputs = [(0, 10, 4), (0, 1_000_000, 4), (0, 10, 4)]
    buckets = plan(inputs, cap_bytes=MiB)
    alone = [b for b in buckets if b["tensor_indices"] == [1]]
    assert len(alone) == 1 and alone[0]["numel"] == 1_000_000
    small = [b for b in buckets if 1 not in b["tensor_indices"]]
    assert [b["tensor_indices"] for b in small] == [[0, 2]]
    check_invariants(inputs, buckets, MiB)


def test_tensor_exactly_at_cap_fits():
    buckets = plan([(0, MiB // 4, 4), (0, 1, 4)], cap_bytes=MiB)
    assert [b["tensor_indices"] for b in buckets] == [[0], [1]]


def test_groups_never_share_a_bucket():
    # Interleaved groups (e.g. fp32 / bf16 / fp32 on another device).
    inputs = [(0, 10, 4), (1, 10, 2), (2, 10, 4), (0, 10, 4), (1, 10, 2)]
    buckets = plan(inputs)
    assert sorted(tuple(b["tensor_indices"]) for b in buckets) == [(0, 3), (1, 4), (2,)]
    check_invariants(inputs, buckets, MiB)


def test_zero_size_tensors_are_kept_and_take_no_room():
    inputs = [(0, 0, 4), (0, 5, 4), (0, 0, 4), (0, 3, 4), (1, 0, 2)]
    buckets = plan(inputs)
    check_invariants(inputs, buckets, MiB)
    fp32 = next(b for b in buckets if b["group"] == 0)
    assert fp32["tensor_indices"] == [0, 1, 2, 3]
    assert fp32["offsets"] == [0, 0, 5, 8]  # the 3-element tensor starts 16-byte aligned
    assert fp32["numel"] == 11
    assert next(b for b in buckets if b["group"] == 1)["numel"] == 0


def test_many_tiny_tensors():
    inputs = [(0, 24 * 24 if i % 2 == 0 else 24, 4) for i in range(2000)]
    buckets = plan(inputs, cap_bytes=25 * MiB)
    assert len(buckets) == 1
    check_invariants(inputs, buckets, 25 * MiB)
    buckets = plan(inputs, cap_bytes=64 * 1024)
    assert len(buckets) > 30
    check_invariants(inputs, buckets, 64 * 1024)


def test_random_plans_hold_invariants_and_are_deterministic():
    rng = random.Random(0)
    for _ in range(200):
        inputs = [
            (g, rng.choice([0, 1, 3, 17, 1000, rng.randrange(0, 300_000)]), (4, 2, 2, 8)[g])
            for g in (rng.randrange(4) for _ in range(rng.randrange(0, 60)))
        ]
        cap = rng.choice([64, 4096, 100_000, MiB])
        buckets = plan(inputs, cap_bytes=cap)
        check_invariants(inputs, buckets, cap)
        assert buckets == plan(inputs, cap_bytes=cap)


def test_empty_input_gives_no_buckets():
    assert plan([]) == []


@pytest.mark.parametrize(
    "inputs, cap, alignment, message",
    [
        ([(0, 1, 4)], 0, 16, "cap_bytes must be positive, got 0"),
        ([(0, 1, 4)], 1024, -16, "alignment_bytes must be positive, got -16"),
        ([(0, -1, 4)], 1024, 16, "tensor 0: numel must be non-negative, got -1"),
        ([(0, 1, 0)], 1024, 16, "tensor 0: element_size must be positive, got 0"),
        ([(0, 1, 4), (0, 1, 2)], 1024, 16, "tensor 1: element_size 2 differs from 4"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(inputs, cap, alignment, message):
    with pytest.raises(ValueError, match=message):
        plan(inputs, cap_bytes=cap, alignment_bytes=alignment)
