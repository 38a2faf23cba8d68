"""setup.py's CUDA switches: each refuses a bad value or an impossible demand with the reason."""

import os
import subprocess
import sys

import pytest
import torch
from multiprocess import REPO_ROOT


def setup_py(**env):
    """Runs `setup.py --name` (decides the extension, builds nothing) with the given switches."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALSGD_EXT_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_skip_and_force_together_are_refused():
    result = setup_py(LOCALSGD_EXT_SKIP_CUDA="1", LOCALSGD_EXT_FORCE_CUDA="1")
    assert result.returncode != 0
    assert "contradict each other" in result.stderr


def test_switch_values_other_than_0_or_1_are_refused():
    result = setup_py(LOCALSGD_EXT_SKIP_CUDA="yes")
    assert result.returncode != 0
    assert "LOCALSGD_EXT_SKIP_CUDA must be 0 or 1, got 'yes'" in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA, so forcing the CUDA build is allowed")
def test_force_cuda_with_a_cpu_only_torch_names_the_reason():
    result = setup_py(LOCALSGD_EXT_FORCE_CUDA="1")
    assert result.returncode != 0
    assert f"torch {torch.__version__} was built without CUDA" in result.stderr


def test_skip_cuda_decides_a_cpu_only_build():
    result = setup_py(LOCALSGD_EXT_SKIP_CUDA="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "localsgd_ext"
