"""Builds localsgd_ext._C against the torch that is installed (use `pip install --no-build-isolation .`).

The CPU sources are always built. The CUDA sources (csrc/cuda/) join when torch was built with CUDA and a
CUDA toolkit is found (CUDA_HOME), whether or not a GPU is visible. Environment switches:
  LOCALSGD_EXT_SKIP_CUDA=1   build the CPU-only extension regardless;
  LOCALSGD_EXT_FORCE_CUDA=1  require the CUDA build: fail with the reason instead of falling back to CPU-only.
  TORCH_CUDA_ARCH_LIST       GPU architectures to compile for; without it and without a visible GPU,
                             csrc/cuda/ARCH_LIST (8.0 and 9.0: A100, H100/H200, plus PTX that newer GPUs
                             compile at load time), which CMakeLists.txt and the compile check read too.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    # pip's default isolated build runs this in a fresh environment without torch (and one with torch
    # in build requirements would compile against another torch than the one installed).
    raise SystemExit(
        "localsgd_ext compiles against the torch already installed, and this build environment has none (pip's "
        "build isolation hides it). Install torch first (pip install torch==2.13.0), then build without isolation: "
        "pip install --no-build-isolation ."
    ) from None

HERE = os.path.dirname(os.path.abspath(__file__))

CPP_SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
with open(os.path.join(HERE, "csrc", "cuda", "ARCH_LIST")) as arch_file:
    DEFAULT_CUDA_ARCH_LIST = arch_file.read().strip()


def env_flag(name: str) -> bool:
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def build_cuda() -> bool:
    skip, force = env_flag("LOCALSGD_EXT_SKIP_CUDA"), env_flag("LOCALSGD_EXT_FORCE_CUDA")
    if skip and force:
        raise SystemExit("LOCALSGD_EXT_SKIP_CUDA=1 and LOCALSGD_EXT_FORCE_CUDA=1 contradict each other; set one")
    if skip:
        return False
    missing = [
        reason
        for reason, ok in (
            (f"torch {torch.__version__} was built without CUDA", torch.version.cuda),
            ("no CUDA toolkit was found (set CUDA_HOME)", CUDA_HOME),
        )
        if not ok
    ]
    if force and missing:
        raise SystemExit("LOCALSGD_EXT_FORCE_CUDA=1, but " + " and ".join(missing))
    return not missing


def extension():
    # -g0: debug info triples compile time and the binary size; -O3 for the copy loops. -fno-trapping-math
    # lets the compiler turn the quantizers' selects into vector blends (we never read floating-point
    # exception flags); values and rounding are unchanged (no -ffast-math).
    cxx_flags = ["-O3", "-g0", "-fno-trapping-math"]
    if build_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            # torch derives the list from the visible GPUs and has nothing to go on without one.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        return CUDAExtension(
            "localsgd_ext._C",
            CPP_SOURCES + CUDA_SOURCES,
            define_macros=[("LOCALSGD_EXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    return CppExtension("localsgd_ext._C", CPP_SOURCES, extra_compile_args={"cxx": cxx_flags})


def record_build_torch() -> None:
    """The compiled module works with the torch it was built against only (C++ ABI): the package checks
    this at import and names both versions, instead of failing with a linker error."""
    with open(os.path.join(HERE, "localsgd_ext", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py: the torch localsgd_ext._C was compiled against."""\n\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")


record_build_torch()
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
