#!/usr/bin/env bash
# Compile-checks the CUDA path on a machine with nvcc, GPU or not, torch with CUDA or not:
#   1. `nvcc -c` of the kernels (csrc/cuda/*.cu include no torch header) for each target architecture;
#   2. the kernels' per-thread code run on the host (tests/cuda/test_kernels_on_host.cu), built with
#      AddressSanitizer and UBSan;
#   3. the torch glue (csrc/cuda/*.cpp) through the host compiler's syntax check against the installed
#      torch's headers. A CPU-only torch wheel lacks the one header its CMake configure step generates
#      (c10/cuda/impl/cuda_cmake_macros.h); a copy with the value CUDA wheels ship is supplied then.
# Architectures: TORCH_CUDA_ARCH_LIST if set (e.g. "8.0;9.0"), else csrc/cuda/ARCH_LIST, setup.py's default.
set -euo pipefail
cd "$(dirname "$0")/.."

# The toolkit: CUDA_HOME (or CUDA_PATH) when set, else /usr/local/cuda, else the one around `nvcc` on PATH.
cuda_home=${CUDA_HOME:-${CUDA_PATH:-}}
if [[ -z "$cuda_home" ]]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")"; do
    if [[ -x "$candidate/bin/nvcc" && -f "$candidate/include/cuda_runtime.h" ]]; then
      cuda_home=$candidate
      break
    fi
  done
fi
if [[ -z "$cuda_home" || ! -x "$cuda_home/bin/nvcc" ]]; then
  echo "check_cuda_kernels: no CUDA toolkit found (set CUDA_HOME); nothing to check" >&2
  exit 0
fi
NVCC="$cuda_home/bin/nvcc"
cuda_include="$cuda_home/include"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

arch_list=${TORCH_CUDA_ARCH_LIST:-$(tr -d '[:space:]' < csrc/cuda/ARCH_LIST)}
gencode=()
IFS=';' read -ra archs <<< "$arch_list"
for arch in "${archs[@]}"; do
  number=${arch%+PTX}
  number=${number//./}
  gencode+=(-gencode "arch=compute_${number},code=sm_${number}")
done

# The flags torch's CUDAExtension adds (no implicit half/bf16 conversions, ...), so this is the real build.
read -ra torch_nvcc_flags <<< "$(python -c 'from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(" ".join(f))')"
for source in csrc/cuda/*.cu; do
  echo "nvcc -c $source ($arch_list)"
  "$NVCC" -c -std=c++20 -O3 "${torch_nvcc_flags[@]}" "${gencode[@]}" "$source" -o "$work/$(basename "$source").o"
done

echo "kernels' per-thread code on the host, under AddressSanitizer and UBSan: tests/cuda/test_kernels_on_host.cu"
sanitize=(-Xcompiler=-fsanitize=address -Xcompiler=-fsanitize=undefined -Xcompiler=-fno-sanitize-recover=all
          -Xcompiler=-fno-omit-frame-pointer)
"$NVCC" -std=c++20 -O1 "${torch_nvcc_flags[@]}" "${sanitize[@]}" -Icsrc/cuda tests/cuda/test_kernels_on_host.cu \
  -o "$work/test_kernels_on_host" -lasan -lubsan
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 "$work/test_kernels_on_host"

torch_includes=$(python -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')
torch_root=$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
if [[ ! -f "$torch_root/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$work/include/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/include/c10/cuda/impl/cuda_cmake_macros.h"
fi
for source in csrc/cuda/*.cpp; do
  echo "syntax check of the torch glue: $source"
  # shellcheck disable=SC2086
  ${CXX:-c++} -std=c++20 -fsyntax-only $torch_includes -I"$work/include" -I"$cuda_include" "$source"
done
echo "check_cuda_kernels: all CUDA sources compile"
