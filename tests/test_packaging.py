"""Packaging: Accelerate is optional (ParameterAverager works without it, LocalSGD says what to install),
and each build default is defined once."""

import importlib.metadata
import os
import subprocess
import sys

import localsgd_ext
from multiprocess import REPO_ROOT

# Run with Accelerate unimportable, as on a machine where it was never installed.
WITHOUT_ACCELERATE = """
import sys
sys.modules["accelerate"] = None
import torch
import localsgd_ext
averager = localsgd_ext.ParameterAverager([torch.zeros(3), torch.zeros(5)])
assert [b["tensor_indices"] for b in averager.buckets] == [[0, 1]]
for name in ("LocalSGD", "patch_accelerate"):
    try:
        getattr(localsgd_ext, name) if name == "LocalSGD" else localsgd_ext.patch_accelerate()
    except ImportError as error:
        print(error)
    else:
        raise SystemExit(name + " loaded without Accelerate")
"""


def test_parameter_averager_works_without_accelerate_and_local_sgd_names_the_extra():
    result = subprocess.run([sys.executable, "-c", WITHOUT_ACCELERATE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("localsgd_ext.LocalSGD needs Hugging Face Accelerate")
    assert lines[1].startswith("localsgd_ext.patch_accelerate needs Hugging Face Accelerate")
    assert all('pip install "localsgd_ext[accelerate]"' in line for line in lines)


def test_importing_the_package_does_not_load_accelerate():
    code = "import sys, localsgd_ext; print('accelerate' in sys.modules); localsgd_ext.LocalSGD; print('accelerate' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "True"], result.stdout + result.stderr


def test_the_version_is_defined_once():
    with open(os.path.join(REPO_ROOT, "pyproject.toml")) as f:
        assert 'dynamic = ["version"]' in f.read()
    assert importlib.metadata.version("localsgd_ext") == localsgd_ext.__version__


def test_the_cuda_arch_list_is_defined_once():
    with open(os.path.join(REPO_ROOT, "csrc", "cuda", "ARCH_LIST")) as f:
        arch_list = f.read().strip()
    assert arch_list == "8.0;9.0+PTX"
    # Each reads the file, and none keeps a list of its own (the copies it used to have).
    for path, own_copy in (
        ("setup.py", 'DEFAULT_CUDA_ARCH_LIST = "'),
        ("CMakeLists.txt", "CMAKE_CUDA_ARCHITECTURES 80 90"),
        ("scripts/check_cuda_kernels.sh", ":-8.0;9.0}"),
    ):
        with open(os.path.join(REPO_ROOT, path)) as f:
            text = f.read()
        assert "csrc/cuda/ARCH_LIST" in text or '"cuda", "ARCH_LIST"' in text, path
        assert own_copy not in text, path



def test_every_test_the_reliability_table_names_exists():
    """docs/reliability.md names a test for each bad input; a renamed or deleted test must fail here."""
    import re

    with open(os.path.join(REPO_ROOT, "docs", "reliability.md")) as f:
        rows = [line for line in f if line.startswith("| ") and not line.startswith("| input") and "---" not in line]
    assert len(rows) >= 29
    for row in rows:
        references = re.findall(r"`((?:tests/cpp/)?\w+\.(?:py|cpp))(?:::(\w+))?`", row.split("|")[3])
        assert references, f"a row without a test: {row}"
        for path, name in references:
            full = os.path.join(REPO_ROOT, path if path.startswith("tests/") else os.path.join("tests", path))
            with open(full) as f:
                source = f.read()
            assert not name or re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} does not exist"


def test_the_documented_constructor_is_the_real_one():
    """docs/options.md shows LocalSGD's whole signature; a new or renamed option must update it."""
    import inspect
    import re

    from localsgd_ext import LocalSGD

    parts, keyword_only = [], False
    for p in list(inspect.signature(LocalSGD.__init__).parameters.values())[1:]:
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    real = "LocalSGD(" + ", ".join(parts) + ")"
    with open(os.path.join(REPO_ROOT, "docs", "options.md")) as f:
        block = re.search(r"```python\n(LocalSGD\(.*?\))\n```", f.read(), re.S).group(1)
    assert re.sub(r"\s*\n\s*", " ", block) == real
