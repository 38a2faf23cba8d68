"""Zero-edit drop-in: an unmodified Accelerate script (tests/scripts/by_feature_local_sgd.py, in the
pattern of Accelerate's examples/by_feature/local_sgd.py) run with `-m localsgd_ext.patch`."""

import os
import subprocess
import sys

import accelerate.local_sgd

import localsgd_ext
from multiprocess import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "tests", "scripts", "by_feature_local_sgd.py")


def test_patch_accelerate_replaces_the_class_for_later_imports(monkeypatch):
    monkeypatch.setattr(accelerate.local_sgd, "LocalSGD", accelerate.local_sgd.LocalSGD)
    theirs = accelerate.local_sgd.LocalSGD
    assert localsgd_ext.patch_accelerate() is theirs
    from accelerate.local_sgd import LocalSGD

    assert LocalSGD is localsgd_ext.LocalSGD
    assert localsgd_ext.patch_accelerate() is theirs  # idempotent: still returns Accelerate's own
    monkeypatch.delattr(accelerate.local_sgd, "_localsgd_ext_original")


def _torchrun(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )


def _results(stdout):
    return [line for line in stdout.splitlines() if line.startswith(("epoch ", "parameter checksum"))]


def test_unmodified_script_runs_with_ours_and_gets_accelerates_results():
    options = ["--cpu", "--gradient_accumulation_steps", "2", "--local_sgd_steps", "4"]
    patched = _torchrun("-m", "localsgd_ext.patch", SCRIPT, *options)
    assert patched.returncode == 0, patched.stdout[-3000:] + patched.stderr[-3000:]
    assert "localsgd_ext.patch: running" in patched.stderr
    plain = _torchrun(SCRIPT, *options)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    # Two ranks: our averaging is Accelerate's bit for bit, so the whole run prints the same numbers.
    assert len(_results(patched.stdout)) == 4
    assert _results(patched.stdout) == _results(plain.stdout)


def test_it_is_ours_that_runs():
    """Accelerate's LocalSGD accepts local_sgd_steps=0 and fails later with a ZeroDivisionError; ours
    refuses it when constructed, naming the argument."""
    patched = _torchrun("-m", "localsgd_ext.patch", SCRIPT, "--cpu", "--local_sgd_steps", "0")
    assert patched.returncode != 0
    assert "local_sgd_steps must be an int >= 1, got 0" in patched.stdout + patched.stderr
