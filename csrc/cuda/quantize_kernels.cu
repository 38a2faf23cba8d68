// The quantized-wire kernels quantize_blocks (a thread block per quantization block: a shared-memory max
// reduction, then the codes) and dequantize_blocks (grid-stride over elements, rows summed in order), for
// int8 and float8 e4m3 codes. CUDA toolkit headers only, like pack_unpack_kernels.cu.
#include <algorithm>

#include "quantize_launch.cuh"

namespace localsgd_ext::cuda {
namespace {

template <typename Codec>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_blocks_kernel(const float* x, int64_t num_blocks, int64_t block_size, typename Codec::Storage* codes,
                           float* scales) {
  __shared__ float partial[kQuantizeThreads];
  const int thread = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const float* block = x + b * block_size;
    partial[thread] = partial_max_magnitude(block, block_size, thread, kQuantizeThreads);
    const float scale = quantize::block_scale<Codec>(block_max(partial, thread));
    write_codes<Codec>(block, quantize::storage_at<Codec>(codes, b * block_size), block_size, scale, thread,
                       kQuantizeThreads);
    if (thread == 0) {
      scales[b] = scale;
    }
    __syncthreads(); // partial[0] is read above before the next block overwrites it
  }
}

template <typename Codec>
__global__ void dequantize_blocks_kernel(const typename Codec::Storage* codes, const float* scales, int64_t rows,
                                         int64_t length, int64_t block_size, float divisor, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < length; k += stride) {
    out[k] = dequantized_sum_at<Codec>(codes, scales, rows, length, block_size, divisor, k);
  }
}

template <typename Codec>
void quantize_with(const float* x, int64_t num_blocks, int64_t block_size, void* codes, float* scales,
                   cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(std::min(num_blocks, kMaxBlocks));
  quantize_blocks_kernel<Codec><<<blocks, kQuantizeThreads, 0, stream>>>(
      x, num_blocks, block_size, static_cast<typename Codec::Storage*>(codes), scales);
}

template <typename Codec>
void dequantize_with(const void* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size,
                     float divisor, float* out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned int>(std::min((length + kThreads - 1) / kThreads, kMaxBlocks));
  dequantize_blocks_kernel<Codec><<<blocks, kThreads, 0, stream>>>(static_cast<const typename Codec::Storage*>(codes),
                                                                   scales, rows, length, block_size, divisor, out);
}

} // namespace

cudaError_t launch_quantize_blocks(const float* x, int64_t num_blocks, int64_t block_size, CodeFormat format,
                                   void* codes, float* scales, cudaStream_t stream) {
  if (num_blocks == 0) {
    return cudaSuccess;
  }
  if (x == nullptr || codes == nullptr || scales == nullptr || block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  return launch_for_format(
      format, [&](auto codec) { quantize_with<decltype(codec)>(x, num_blocks, block_size, codes, scales, stream); });
}

cudaError_t launch_dequantize_blocks(const void* codes, CodeFormat format, const float* scales, int64_t rows,
                                     int64_t length, int64_t block_size, float divisor, float* out,
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
