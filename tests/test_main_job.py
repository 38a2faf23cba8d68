"""The README's main job, shortened to one epoch, so that it cannot rot."""

import os
import re
import subprocess
import sys

from multiprocess import REPO_ROOT


def test_digits_training_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        os.path.join(REPO_ROOT, "examples", "train_digits.py"), "--epochs", "2",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    done = re.search(r"done: test accuracy ([\d.]+)%.*median ([\d.]+) ms.* over (\d+) syncs", proc.stdout)
    assert done, proc.stdout[-4000:]
    assert float(done.group(1)) > 80.0  # two epochs of Local SGD learn the digits
    assert int(done.group(3)) == 12  # 45 batches per epoch, K=8: 5 syncs + 1 at exit, per epoch
