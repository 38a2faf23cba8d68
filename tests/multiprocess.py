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


class ForkedRank:
    """A rank forked by the zygote (tests/rank_zygote.py), with the part of Popen's interface run_ranks
    uses. It is the zygote's child, not ours: its end is read from the status file the zygote writes."""

    def __init__(self, pid: int, status_path: str):
        self.pid = pid
        self.status_path = status_path
        self.returncode = None

    def poll(self):
        if self.returncode is None and os.path.exists(self.status_path):
            with open(self.status_path) as f:
                kind, number = f.read().split()
            self.returncode = -int(number) if kind == "signal" else int(number)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode


_zygote = None


def _fork_rank(argv, env, log_path, status_path):
    """A rank forked from the zygote, which has imported torch, Accelerate and localsgd_ext once for the
    whole session (each launch would pay 1.5-2 s of imports per rank); None where the zygote is not
    running (LOCALSGD_TEST_NO_ZYGOTE=1, or it could not start), and the caller starts a process itself."""
    global _zygote
    if os.environ.get("LOCALSGD_TEST_NO_ZYGOTE") == "1":
        return None
    if _zygote is None or _zygote.poll() is not None:
        _zygote = subprocess.Popen(
            [sys.executable, "-m", "rank_zygote"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=TESTS_DIR,
        )
    try:
        _zygote.stdin.write(json.dumps({"argv": argv, "env": env, "log": log_path, "status": status_path}) + "\n")
        _zygote.stdin.flush()
        reply = _zygote.stdout.readline()
        return ForkedRank(json.loads(reply)["pid"], status_path)
    except (OSError, ValueError):
        _zygote = None
        return None


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
            argv = [target, json.dumps(args), out_dir]
            forked = _fork_rank(argv, rank_env, log.name, os.path.join(out_dir, f"rank{rank}.status"))
            if forked is None:
                command = [sys.executable, "-m", "rank_main", *argv]
                forked = subprocess.Popen(command, env=rank_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(forked)
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
