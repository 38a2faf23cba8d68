// What every quantized-wire kernel file shares on the device side: the grid's block cap, the thread
// block's max tree, and the dispatch from a CodeFormat to its codec. CUDA toolkit headers only.
#pragma once

#include <cuda_runtime.h>

#include "quantize_blocks.cuh"
#include "quantize_kernels.h"

namespace localsgd_ext::cuda {

inline constexpr int64_t kMaxBlocks = 1 << 16;

// The thread block's max of every thread's `partial` (each thread has written its own): a shared-memory
// tree. max_magnitude is order-independent, so the tree gives the CPU loop's result.
__device__ inline float block_max(float* partial, int thread) {
  __syncthreads();
  for (int stride = kQuantizeThreads / 2; stride > 0; stride /= 2) {
    if (thread < stride) {
      partial[thread] = quantize::max_magnitude(partial[thread], partial[thread + stride]);
    }
    __syncthreads();
  }
  return partial[0];
}

// Runs `launch` with the codec of `format` (a value of its type, for its template argument) and returns
// the launch's status.
template <typename Launch>
inline cudaError_t launch_for_format(CodeFormat format, const Launch& launch) {
  if (format == CodeFormat::kInt8) {
    launch(quantize::Int8Codec{});
  } else if (format == CodeFormat::kInt4) {
    launch(quantize::Int4Codec{});
  } else {
    launch(quantize::E4M3Codec{});
  }
  return cudaGetLastError();
}

} // namespace localsgd_ext::cuda
