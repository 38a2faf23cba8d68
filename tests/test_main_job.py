"""The README's main job, shortened to one epoch, so that it cannot rot."""

import os
import re
import subprocess
import sys

from multiprocess import REPO_ROOT


def test_digits_training_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(REPO_ROOT, "examples", "train_digits.py"),
        "--epochs",
        "2",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    done = re.search(r"done: test accuracy ([\d.]+)%.*median ([\d.]+) ms.* over (\d+) syncs", proc.stdout)
    assert done, proc.stdout[-4000:]
    assert float(done.group(1)) > 80.0  # two epochs of Local SGD learn the digits
    assert int(done.group(3)) == 12  # 45 batches per epoch, K=8: 5 syncs + 1 at exit, per epoch


def _run(command):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def test_one_process_runs_and_says_nothing_is_averaged():
    for implementation in ("localsgd_ext", "accelerate"):
        proc = _run(
            [
                sys.executable,
                os.path.join(REPO_ROOT, "examples", "train_digits.py"),
                "--epochs",
                "1",
                "--hidden",
                "32",
                "--implementation",
                implementation,
            ]
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "epoch 1: train loss" in proc.stdout and "nothing averaged (one process)" in proc.stdout


def test_the_headline_options_have_flags_and_their_syncs_are_counted_per_epoch():
    proc = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            os.path.join(REPO_ROOT, "examples", "train_digits.py"),
            "--epochs",
            "2",
            "--hidden",
            "32",
            "--wire",
            "int8",
            "--sync-delay",
            "1",
            "--fragments",
            "2",
            "--outer-optimizer",
            "diloco",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # 45 steps per epoch, K=8 over 2 fragments: a fragment sync every 4 steps (11), plus the exit's one
    # average of both fragments; per epoch, not cumulative.
    epochs = re.findall(r"epoch (\d): .*over (\d+) syncs", proc.stdout)
    assert epochs == [("1", "12"), ("2", "12")], proc.stdout[-3000:]
