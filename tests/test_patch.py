"""Zero-edit drop-in: an unmodified Accelerate script (tests/scripts/by_feature_local_sgd.py, in the
pattern of Accelerate's examples/by_feature/local_sgd.py) run with `-m localsgd_ext.patch`."""

import os
import subprocess
import sys

import accelerate.local_sgd
from multiprocess import REPO_ROOT

import localsgd_ext

SCRIPT = os.path.join(REPO_ROOT, "tests", "scripts", "by_feature_local_sgd.py")


def test_patch_accelerate_replaces_the_class_for_later_imports(monkeypatch):
    monkeypatch.setattr(accelerate.local_sgd, "LocalSGD", accelerate.local_sgd.LocalSGD)
    theirs = accelerate.local_sgd.LocalSGD
    assert localsgd_ext.patch_accelerate() is theirs
    from accelerate.local_sgd import LocalSGD

    assert LocalSGD is localsgd_ext.LocalSGD
    assert localsgd_ext.patch_accelerate() is theirs  # idempotent: still returns Accelerate's own
    monkeypatch.delattr(accelerate.local_sgd, "_localsgd_ext_original")


def _torchrun(*args, cwd=REPO_ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _results(stdout):
    return [line for line in stdout.splitlines() if line.startswith(("epoch ", "parameter checksum"))]


def test_unmodified_script_runs_with_ours_and_gets_accelerates_results():
    options = ["--cpu", "--gradient_accumulation_steps", "2", "--local_sgd_steps", "4"]
    patched = _torchrun("-m", "localsgd_ext.patch", SCRIPT, *options)
    assert patched.returncode == 0, patched.stdout[-3000:] + patched.stderr[-3000:]
    assert patched.stderr.count("localsgd_ext.patch: running") == 1, "one notice, from rank 0"
    # The same script as a module (`accelerate launch -m` / `torchrun -m` users): python -m's rules.
    as_module = _torchrun("-m", "localsgd_ext.patch", "-m", "by_feature_local_sgd", *options, cwd=os.path.dirname(SCRIPT))
    assert as_module.returncode == 0, as_module.stdout[-3000:] + as_module.stderr[-3000:]
    assert "localsgd_ext.patch: running module by_feature_local_sgd" in as_module.stderr
    plain = _torchrun(SCRIPT, *options)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    # Two ranks: our averaging is Accelerate's bit for bit, so the whole run prints the same numbers.
    assert len(_results(patched.stdout)) == 4
    assert _results(patched.stdout) == _results(plain.stdout)
    assert _results(as_module.stdout) == _results(plain.stdout)


def test_a_subclass_overriding_accelerates_private_method_runs_under_the_patch():
    """examples/train_digits.py times Accelerate's LocalSGD by overriding `_sync_and_avg_model_params(self)`
    (Accelerate's signature); under the patch that class derives from ours, whose step() and exit must
    call it the way Accelerate's do."""
    patched = _torchrun(
        "-m",
        "localsgd_ext.patch",
        os.path.join(REPO_ROOT, "examples", "train_digits.py"),
        "--implementation",
        "accelerate",
        "--epochs",
        "1",
        "--hidden",
        "32",
    )
    assert patched.returncode == 0, patched.stdout[-3000:] + patched.stderr[-3000:]
    assert "median" in patched.stdout, patched.stdout[-2000:]  # the override's timings were recorded


def test_a_missing_script_gets_pythons_own_message():
    missing = subprocess.run(
        [sys.executable, "-m", "localsgd_ext.patch", "no_such_script.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        timeout=60,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith(
        "can't open file " + repr(os.path.join(REPO_ROOT, "no_such_script.py")) + ": [Errno 2] No such file or directory"
    )
    assert "Traceback" not in missing.stderr


def test_it_is_ours_that_runs():
    """Accelerate's LocalSGD accepts local_sgd_steps=0 and fails later with a ZeroDivisionError; ours
    refuses it when constructed, naming the argument."""
    patched = _torchrun("-m", "localsgd_ext.patch", SCRIPT, "--cpu", "--local_sgd_steps", "0")
    assert patched.returncode != 0
    assert "local_sgd_steps must be an int >= 1, got 0" in patched.stdout + patched.stderr
