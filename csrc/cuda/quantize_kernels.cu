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

template <typename Codec>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_blocks_kernel(
    const float* x, int64_t num_blocks, int64_t block_size, typename Codec::Code* codes, float* scales) {
  __shared__ float partial[kQuantizeThreads];
  const int thread = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const float* block = x + b * block_size;
    partial[thread] = partial_max_magnitude(block, block_size, thread, kQuantizeThreads);
    __syncthreads();
    // max_magnitude is order-independent, so this tree gives the CPU loop's result.
    for (int stride = kQuantizeThreads / 2; stride > 0; stride /= 2) {
      if (thread < stride) {
        partial[thread] = quantize::max_magnitude(partial[thread], partial[thread + stride]);
      }
      __syncthreads();
    }
    const float scale = quantize::block_scale<Codec>(partial[0]);
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
    __syncthreads();
    for (int stride = kQuantizeThreads / 2; stride > 0; stride /= 2) {
      if (thread < stride) {
        partial[thread] = quantize::max_magnitude(partial[thread], partial[thread + stride]);
      }
      __syncthreads();
    }
    const float scale = quantize::block_scale<Codec>(partial[0]);
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
    __syncthreads();
    for (int stride = kQuantizeThreads / 2; stride > 0; stride /= 2) {
      if (thread < stride) {
        partial[thread] = quantize::max_magnitude(partial[thread], partial[thread + stride]);
      }
      __syncthreads();
    }
    const float scale = quantize::block_scale<Codec>(partial[0]);
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
  if (format == CodeFormat::kInt8) {
    requantize_mean_with<quantize::Int8Codec>(codes, scales, rows, length, block_size, mean_codes, mean_scales, stream);
  } else {
    requantize_mean_with<quantize::E4M3Codec>(codes, scales, rows, length, block_size, mean_codes, mean_scales, stream);
  }
  return cudaGetLastError();
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
  if (format == CodeFormat::kInt8) {
    quantize_change_with<quantize::Int8Codec>(snapshot, anchor, residual, num_blocks, block_size, codes, scales, stream);
  } else {
    quantize_change_with<quantize::E4M3Codec>(snapshot, anchor, residual, num_blocks, block_size, codes, scales, stream);
  }
  return cudaGetLastError();
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
  if (format == CodeFormat::kInt8) {
    apply_mean_with<quantize::Int8Codec>(codes, scales, length, block_size, anchor, stream);
  } else {
    apply_mean_with<quantize::E4M3Codec>(codes, scales, length, block_size, anchor, stream);
  }
  return cudaGetLastError();
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
  if (format == CodeFormat::kInt8) {
    quantize_with<quantize::Int8Codec>(x, num_blocks, block_size, codes, scales, stream);
  } else {
    quantize_with<quantize::E4M3Codec>(x, num_blocks, block_size, codes, scales, stream);
  }
  return cudaGetLastError();
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
  if (format == CodeFormat::kInt8) {
    dequantize_with<quantize::Int8Codec>(codes, scales, rows, length, block_size, divisor, out, stream);
  } else {
    dequantize_with<quantize::E4M3Codec>(codes, scales, rows, length, block_size, divisor, out, stream);
  }
  return cudaGetLastError();
}

} // namespace localsgd_ext::cuda
