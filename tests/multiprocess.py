"""Runs a function on N real processes joined by torch.distributed (gloo on loopback).

The parent owns a TCPStore on port 0 (no port races); the ranks connect to it as torchrun's workers do
(TORCHELASTIC_USE_AGENT_STORE), so `init_process_group()` and `Accelerator()` work unchanged in them.
Each rank runs `module:function(*args)` and its return value comes back through torch.save. A run that
outlives its deadline is killed, process group and all, and fails the test with every rank's output.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, List

import torch
import torch.distributed as dist

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# Collectives in tests give up after this long, so a lost rank fails a test instead of hanging it.
GROUP_TIMEOUT_SECONDS = 30


class RanksFailed(AssertionError):
    pass


def run_ranks(
    world_size: int,
    target: str,
    *args: Any,
    timeout: float = 120,
    env: dict | None = None,
    may_fail: tuple = (),
    expect_killed: bool = False,
) -> List[Any]:
    """Runs `target` ("module:function", importable from tests/) on `world_size` ranks; returns each
    rank's return value, in rank order. Ranks in `may_fail` may die or hang (the tests that lose a rank
    on purpose): they are killed once the others are done, and their result is None. With
    `expect_killed`, every rank must end by SIGKILL (a target that kills itself); the results are None."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory() as out_dir:
        base_env = dict(os.environ)
        base_env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(store.port),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            TORCHELASTIC_USE_AGENT_STORE="True",
            OMP_NUM_THREADS="1",
            LOCALSGD_TEST_GROUP_TIMEOUT=str(GROUP_TIMEOUT_SECONDS),
            LOCALSGD_TEST_OUT_DIR=out_dir,
            PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO_ROOT, base_env.get("PYTHONPATH", "")]),
        )
        base_env.update(env or {})
        procs = []
        logs = []
        for rank in range(world_size):
            log = open(os.path.join(out_dir, f"rank{rank}.log"), "w+")
            logs.append(log)
            rank_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            command = [sys.executable, "-m", "rank_main", target, json.dumps(args), out_dir]
            procs.append(subprocess.Popen(command, env=rank_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        timed_out = False
        for rank, proc in enumerate(procs):
            if rank in may_fail:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        outputs = []
        for rank, log in enumerate(logs):
            log.seek(0)
            outputs.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-6000:]}")
            log.close()
        if timed_out:
            raise RanksFailed(f"{target} did not finish within {timeout}s on {world_size} ranks\n" + "\n".join(outputs))
        expected_code = -signal.SIGKILL if expect_killed else 0
        if any(proc.returncode != expected_code for rank, proc in enumerate(procs) if rank not in may_fail):
            raise RanksFailed(
                f"{target} failed on {world_size} ranks (expected exit code {expected_code})\n" + "\n".join(outputs)
            )
        if expect_killed:
            return [None] * world_size
        return [
            None if rank in may_fail else torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]
