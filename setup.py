"""Builds localsgd_ext._C against the torch that is installed (use `pip install --no-build-isolation .`).

The CPU sources are always built. CUDA sources (csrc/cuda/*.cu) join when torch has CUDA and a CUDA
toolkit is found; set LOCALSGD_EXT_SKIP_CUDA=1 to build the CPU-only extension regardless.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

CPP_SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))


def build_cuda() -> bool:
    if os.environ.get("LOCALSGD_EXT_SKIP_CUDA", "0") == "1":
        return False
    return bool(torch.version.cuda and CUDA_HOME and CUDA_SOURCES)


def extension():
    # -g0: debug info triples compile time and the binary size; -O3 for the copy loops.
    cxx_flags = ["-O3", "-g0"]
    if build_cuda():
        return CUDAExtension(
            "localsgd_ext._C",
            CPP_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    return CppExtension("localsgd_ext._C", CPP_SOURCES, extra_compile_args={"cxx": cxx_flags})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
