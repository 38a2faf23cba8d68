// The quantized wire's fused kernels: quantize_change and requantize_mean (a thread block per quantization
// block: a shared-memory max reduction, then the codes; quantize_change computes the change since the anchor
// on the fly and updates the residual, requantize_mean the rows' mean) and apply_quantized_mean
// (grid-stride: the anchor moved by the mean change), for int8 and float8 e4m3 codes. CUDA toolkit
// headers only, like pack_unpack_kernels.cu.
#include <algorithm>

#include "quantize_launch.cuh"

namespace localsgd_ext::cuda {
namespace {

template <typename Codec>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_change_kernel(const float* snapshot, const float* anchor, float* residual, int64_t num_blocks,
                           int64_t block_size, typename Codec::Storage* codes, float* scales) {
  __shared__ float partial[kQuantizeThreads];
  const int thread = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const int64_t first = b * block_size;
    float* block_residual = residual == nullptr ? nullptr : residual + first;
    partial[thread] =
        partial_max_change(snapshot + first, anchor + first, block_residual, block_size, thread, kQuantizeThreads);
    const float scale = quantize::block_scale<Codec>(block_max(partial, thread));
    write_change_codes<Codec>(snapshot + first, anchor + first, block_residual,
                              quantize::storage_at<Codec>(codes, first), block_size, scale, thread, kQuantizeThreads);
    if (thread == 0) {
      scales[b] = scale;
    }
    __syncthreads();
  }
}

template <typename Codec>
__global__ void __launch_bounds__(kQuantizeThreads)
    requantize_mean_kernel(const typename Codec::Storage* codes, const float* scales, int64_t rows, int64_t length,
                           int64_t block_size, typename Codec::Storage* mean_codes, float* mean_scales) {
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
__global__ void apply_quantized_mean_kernel(const typename Codec::Storage* codes, const float* scales, int64_t length,
                                            int64_t block_size, float* anchor) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < length; k += stride) {
    anchor[k] = moved_anchor_at<Codec>(codes, scales, anchor, block_size, k);
  }
}

template <typename Codec>
void quantize_change_with(const float* snapshot, const float* anchor, float* residual, int64_t num_blocks,
                          int64_t block_size, void* codes, float* scales, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(std::min(num_blocks, kMaxBlocks));
  quantize_change_kernel<Codec><<<blocks, kQuantizeThreads, 0, stream>>>(
      snapshot, anchor, residual, num_blocks, block_size, static_cast<typename Codec::Storage*>(codes), scales);
}

template <typename Codec>
void apply_mean_with(const void* codes, const float* scales, int64_t length, int64_t block_size, float* anchor,
                     cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned int>(std::min((length + kThreads - 1) / kThreads, kMaxBlocks));
  apply_quantized_mean_kernel<Codec><<<blocks, kThreads, 0, stream>>>(
      static_cast<const typename Codec::Storage*>(codes), scales, length, block_size, anchor);
}

template <typename Codec>
void requantize_mean_with(const void* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size,
                          void* mean_codes, float* mean_scales, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(std::min(length / block_size, kMaxBlocks));
  requantize_mean_kernel<Codec><<<blocks, kQuantizeThreads, 0, stream>>>(
      static_cast<const typename Codec::Storage*>(codes), scales, rows, length, block_size,
      static_cast<typename Codec::Storage*>(mean_codes), mean_scales);
}

} // namespace

cudaError_t launch_requantize_mean(const void* codes, CodeFormat format, const float* scales, int64_t rows,
                                   int64_t length, int64_t block_size, void* mean_codes, float* mean_scales,
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

cudaError_t launch_quantize_change(const float* snapshot, const float* anchor, float* residual, int64_t num_blocks,
                                   int64_t block_size, CodeFormat format, void* codes, float* scales,
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

cudaError_t launch_apply_quantized_mean(const void* codes, CodeFormat format, const float* scales, int64_t length,
                                        int64_t block_size, float* anchor, cudaStream_t stream) {
  if (length == 0) {
    return cudaSuccess;
  }
  if (codes == nullptr || scales == nullptr || anchor == nullptr || block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  return launch_for_format(
      format, [&](auto codec) { apply_mean_with<decltype(codec)>(codes, scales, length, block_size, anchor, stream); });
}

} // namespace localsgd_ext::cuda
