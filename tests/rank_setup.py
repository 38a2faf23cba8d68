"""Helpers used inside rank processes."""

import datetime
import os

import torch.distributed as dist


def group_timeout() -> datetime.timedelta:
    """How long a collective may wait here before failing (set by multiprocess.run_ranks)."""
    return datetime.timedelta(seconds=int(os.environ.get("LOCALSGD_TEST_GROUP_TIMEOUT", "30")))


def init_gloo() -> None:
    dist.init_process_group("gloo", timeout=group_timeout())


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]
