"""Helpers used inside rank processes."""

import datetime
import os

import torch
import torch.distributed as dist


def init_gloo() -> None:
    timeout = datetime.timedelta(seconds=int(os.environ.get("LOCALSGD_TEST_GROUP_TIMEOUT", "30")))
    dist.init_process_group("gloo", timeout=timeout)


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]
