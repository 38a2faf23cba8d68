// The quantized-wire kernels: quantize_blocks and quantize_change (a thread block per quantization
// block: a shared-memory max reduction, then the codes; quantize_change computes the change since the
// anchor on the fly and updates the residual), dequantize_blocks (grid-stride over elements, rows
// summed in order) and apply_quantized_mean (grid-stride: the anchor moved by the mean change), for
// int8 and float8 e4m3 codes. CUDA toolkit headers only, like pack_unpack_kernels.cu.
#include "quantize_blocks.cuh"
#include "quantize_kernels.h"

#include <algorithm>

namespace localsgd_ext::cuda {
namespace {

constexpr int64_t kMaxBlocks = 1 << 16;

// The thread block's max of every thread's `partial` (each thread has written its own): a shared-memory
// tree. max_magnitude is order-independent, so the tree gives the CPU loop's result.
__device__ float block_max(float* partial, int thread) {
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
cudaError_t launch_for_format(CodeFormat format, const Launch& launch) {
  if (format == CodeFormat::kInt8) {
    launch(quantize::Int8Codec{});
  } else {
    launch(quantize::E4M3Codec{});
  }
  return cudaGetLastError();
}

template <typename Codec>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_blocks_kernel(
    const float* x, int64_t num_blocks, int64_t block_size, typename Codec::Code* codes, float* scales) {
  __shared__ float partial[kQuantizeThreads];
  const int thread = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const float* block = x + b * block_size;
    partial[thread] = partial_max_magnitude(block, block_size, thread, kQuantizeThreads);
    const float scale = quantize::block_scale<Codec>(block_max(partial, thread));
    write_codes<Codec>(block, codes + b * block_size, block_size, scale, thread, kQuantizeThreads);
    if (thread == 0) {
      scales[b] = scale;
    }
    __syncthreads();  // partial[0] is read above before the next block overwrites it
  }
}

template <typename Codec>
__global__ void dequantize_blocks_kernel(
    const typename Codec::Code* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size,
    float divisor, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < length; k += stride) {
    out[k] = dequantized_sum_at<Codec>(codes, scales, rows, length, block_size, divisor, k);
  }
}

template <typename Codec>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_change_kernel(
    const float* snapshot, const float* anchor, float* residual, int64_t num_blocks, int64_t block_size,
    typename Codec::Code* codes, float* scales) {
  __shared__ float partial[kQuantizeThreads];
  const int thread = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const int64_t first = b * block_size;
    float* block_residual = residual == nullptr ? nullptr : residual + first;
    partial[thread] =
        partial_max_change(snapshot + first, anchor + first, block_residual, block_size, thread, kQuantizeThreads);
    const float scale = quantize::block_scale<Codec>(block_max(partial, thread));
    write_change_codes<Codec>(
        snapshot + first, anchor + first, block_residual, codes + first, block_size, scale, thread, kQuantizeThreads);
    if (thread == 0) {
      scales[b] = scale;
    }
    __syncthreads();
  }
}

template <typename Codec>
__global__ void __launch_bounds__(kQuantizeThreads) requantize_mean_kernel(
    const typename Codec::Code* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size,
    typename Codec::Code* mean_codes, float* mean_scales) {
  __shared__ float partial[kQuantizeThreads];
  const int thread = static_cast<int>(threadIdx.x);
  const int64_t num_blocks = length / block_size;
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    partial[thread] = partial_max_mean<Codec>(codes, scales, rows, length, block_size, b, thread, kQuantizeThreads);
    const float scale = quantize::block_scale<Codec>(block_max(partial, thread));
    write_mean_codes<Codec>(codes, scales, rows, length, block_size, b, scale, mean_codes, thread, kQuantizeThreads);
    if (thread == 0) {
      mean_scales[b] = scale;
    }
    __syncthreads();
  }
}

template <typename Codec>
__global__ void apply_quantized_mean_kernel(
    const typename Codec::Code* codes, const float* scales, int64_t length, int64_t block_size, float* anchor) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < length; k += stride) {
    anchor[k] = moved_anchor_at<Codec>(codes, scales, anchor, block_size, k);
  }
}

template <typename Codec>
void quantize_with(const float* x, int64_t num_blocks, int64_t block_size, void* codes, float* scales, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(std::min(num_blocks, kMaxBlocks));
  quantize_blocks_kernel<Codec><<<blocks, kQuantizeThreads, 0, stream>>>(
      x, num_blocks, block_size, static_cast<typename Codec::Code*>(codes), scales);
}

template <typename Codec>
void dequantize_with(
    const void* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size, float divisor, float* out,
    cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned int>(std::min((length + kThreads - 1) / kThreads, kMaxBlocks));
  dequantize_blocks_kernel<Codec><<<blocks, kThreads, 0, stream>>>(
      static_cast<const typename Codec::Code*>(codes), scales, rows, length, block_size, divisor, out);
}

template <typename Codec>
void quantize_change_with(
    const float* snapshot, const float* anchor, float* residual, int64_t num_blocks, int64_t block_size, void* codes,
    float* scales, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(std::min(num_blocks, kMaxBlocks));
  quantize_change_kernel<Codec><<<blocks, kQuantizeThreads, 0, stream>>>(
      snapshot, anchor, residual, num_blocks, block_size, static_cast<typename Codec::Code*>(codes), scales);
}

template <typename Codec>
void apply_mean_with(
    const void* codes, const float* scales, int64_t length, int64_t block_size, float* anchor, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned int>(std::min((length + kThreads - 1) / kThreads, kMaxBlocks));
  apply_quantized_mean_kernel<Codec><<<blocks, kThreads, 0, stream>>>(
      static_cast<const typename Codec::Code*>(codes), scales, length, block_size, anchor);
}

template <typename Codec>
void requantize_mean_with(
    const void* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size, void* mean_codes,
    float* mean_scales, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(std::min(length / block_size, kMaxBlocks));
  requantize_mean_kernel<Codec><<<blocks, kQuantizeThreads, 0, stream>>>(
      static_cast<const typename Codec::Code*>(codes), scales, rows, length, block_size,
      static_cast<typename Codec::Code*>(mean_codes), mean_scales);
}

} // namespace

cudaError_t launch_requantize_mean(
    const void* codes,
    CodeFormat format,
    const float* scales,
    int64_t rows,
    int64_t length,
    int64_t block_size,
    void* mean_codes,
    float* mean_scales,
    cudaStream_t stream) {
  if (length == 0) {
    return cudaSuccess;
  }
  if (codes == nullptr || scales == nullptr || mean_codes == nullptr || mean_scales == nullptr || block_size <= 0 ||
      rows <= 0) {
    return cudaErrorInvalidValue;
  }
  return launch_for_format(format, [&](auto codec) {
    requantize_mean_with<decltype(codec)>(codes, scales, rows, length, block_size, mean_codes, mean_scales, stream);
  });
}

cudaError_t launch_quantize_change(
    const float* snapshot,
    const float* anchor,
    float* residual,
    int64_t num_blocks,
    int64_t block_size,
    CodeFormat format,
    void* codes,
    float* scales,
    cudaStream_t stream) {
  if (num_blocks == 0) {
    return cudaSuccess;
  }
  if (snapshot == nullptr || anchor == nullptr || codes == nullptr || scales == nullptr || block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  return launch_for_format(format, [&](auto codec) {
    quantize_change_with<decltype(codec)>(snapshot, anchor, residual, num_blocks, block_size, codes, scales, stream);
  });
}

cudaError_t launch_apply_quantized_mean(
    const void* codes,
    CodeFormat format,
    const float* scales,
    int64_t length,
    int64_t block_size,
    float* anchor,
    cudaStream_t stream) {
  if (length == 0) {
    return cudaSuccess;
  }
  if (codes == nullptr || scales == nullptr || anchor == nullptr || block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  return launch_for_format(format, [&](auto codec) {
    apply_mean_with<decltype(codec)>(codes, scales, length, block_size, anchor, stream);
  });
}

cudaError_t launch_quantize_blocks(
    const float* x,
    int64_t num_blocks,
    int64_t block_size,
    CodeFormat format,
    void* codes,
    float* scales,
    cudaStream_t stream) {
  if (num_blocks == 0) {
    return cudaSuccess;
  }
  if (x == nullptr || codes == nullptr || scales == nullptr || block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  return launch_for_format(format, [&](auto codec) {
    quantize_with<decltype(codec)>(x, num_blocks, block_size, codes, scales, stream);
  });
}

cudaError_t launch_dequantize_blocks(
    const void* codes,
    CodeFormat format,
    const float* scales,
    int64_t rows,
    int64_t length,
    int64_t block_size,
    float divisor,
    float* out,
    cudaStream_t stream) {
  if (length == 0) {
    return cudaSuccess;
  }
  if (codes == nullptr || scales == nullptr || out == nullptr || block_size <= 0 || rows <= 0) {
    return cudaErrorInvalidValue;
  }
  return launch_for_format(format, [&](auto codec) {
    dequantize_with<decltype(codec)>(codes, scales, rows, length, block_size, divisor, out, stream);
  });
}

} // namespace localsgd_ext::cuda
