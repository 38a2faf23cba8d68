"""Packaging: Accelerate is optional (ParameterAverager works without it, LocalSGD says what to install),
and each build default is defined once."""

import importlib.metadata
import os
import subprocess
import sys

from multiprocess import REPO_ROOT

import localsgd_ext

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
    assert all("pip install accelerate" in line for line in lines), "an install that works (the package is not on PyPI)"


def test_the_lazy_local_sgd_is_listed_by_dir():
    assert "LocalSGD" in dir(localsgd_ext) and "ParameterAverager" in dir(localsgd_ext)


def test_an_isolated_build_without_torch_says_what_to_run():
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; exec(open('setup.py').read())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pip install --no-build-isolation ." in result.stderr and "torch==2.13.0" in result.stderr


def test_a_torch_other_than_the_one_built_against_is_named_at_import():
    code = (
        "import sys, types, torch; fake = types.ModuleType('localsgd_ext._build_info'); fake.TORCH_VERSION = '2.0.0+other'; "
        "sys.modules['localsgd_ext._build_info'] = fake\n"
        "try:\n import localsgd_ext\nexcept ImportError as e:\n print(e)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    import torch

    assert result.stdout.startswith(
        f"localsgd_ext was compiled against torch 2.0.0+other, but torch {torch.__version__} is installed"
    ), result.stdout + result.stderr
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in result.stdout


def test_the_build_records_the_torch_it_compiled_against():
    import torch

    from localsgd_ext._build_info import TORCH_VERSION

    assert TORCH_VERSION == torch.__version__
    assert os.path.exists(os.path.join(REPO_ROOT, "localsgd_ext", "py.typed"))


def test_importing_the_package_does_not_load_accelerate():
    code = (
        "import sys, localsgd_ext; print('accelerate' in sys.modules); localsgd_ext.LocalSGD; print('accelerate' in sys.modules)"
    )
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


def test_the_declared_license_ships_with_its_text():
    with open(os.path.join(REPO_ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    metadata = importlib.metadata.metadata("localsgd_ext")
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (metadata.get_all("License-File") or []), "the built metadata must list the license file"
