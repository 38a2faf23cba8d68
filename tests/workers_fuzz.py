"""Rank-side fuzzing of BucketedAverager.average() on a real gloo group (run through run_ranks)."""

import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from rank_setup import init_group
from test_fuzz import CLEAN_ERRORS, tensors

from localsgd_ext import _C


def fuzz_engine_average():
    init_group()
    group = dist.group.WORLD
    examples = []

    @settings(max_examples=80, deadline=None, derandomize=True)
    @given(
        items=st.lists(tensors(dtype=torch.float32, device="cpu"), max_size=6),
        cap=st.integers(1, 4096),
        use_avg_op=st.booleans(),
        repoint=st.booleans(),
    )
    def average_once(items, cap, use_avg_op, repoint):
        examples.append(1)
        expected = [t.clone() for t in items]
        try:
            engine = _C.BucketedAverager(items, cap, 2)
            if repoint and items and items[0].numel() > 0:
                items[0].set_(torch.full((items[0].numel() + 3,), 5.0))  # re-planned at the next average
                expected[0] = items[0].clone()
            engine.average(group, use_avg_op)
        except CLEAN_ERRORS:
            return
        for t, e in zip(items, expected):  # a world of one: the mean is the tensor itself
            assert torch.equal(t, e)

    average_once()
    return {"examples": len(examples)}
