// What one thread of the quantized-wire kernels does, as host/device functions: the kernels
// (quantize_kernels.cu) call them on the GPU, tests/cuda/test_kernels_on_host.cu on the CPU, with the
// arithmetic of ../quantize_math.h that the CPU kernel uses too.
#pragma once

#include <cstdint>

#include "../quantize_math.h"

namespace localsgd_ext::cuda {

constexpr int kQuantizeThreads = 256;

// Thread `thread` of `threads`: max |x| over the elements thread, thread + threads, ... of one block.
LOCALSGD_HOST_DEVICE inline float partial_max_magnitude(const float* block, int64_t block_size, int thread,
                                                        int threads) {
  float magnitude = 0.0f;
  for (int64_t k = thread; k < block_size; k += threads) {
    magnitude = quantize::max_magnitude(magnitude, block[k]);
  }
  return magnitude;
}

// Thread `thread` of `threads`: the codes of the same elements, once the block's scale is known.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline void write_codes(const float* block, typename Codec::Code* codes, int64_t block_size,
                                             float scale, int thread, int threads) {
  const bool gives_codes = quantize::scale_gives_codes(scale);
  for (int64_t k = thread; k < block_size; k += threads) {
    codes[k] = gives_codes ? Codec::encode(block[k], scale) : typename Codec::Code{0};
  }
}

// quantize_change: thread `thread` of `threads`, max |change| over its elements of one block (the change
// computed on the fly from the block's snapshot, anchor and residual pointers; residual may be null).
LOCALSGD_HOST_DEVICE inline float partial_max_change(const float* snapshot, const float* anchor, const float* residual,
                                                     int64_t block_size, int thread, int threads) {
  float magnitude = 0.0f;
  for (int64_t k = thread; k < block_size; k += threads) {
    magnitude = quantize::max_magnitude(magnitude, quantize::change_at(snapshot, anchor, residual, k));
  }
  return magnitude;
}

// quantize_change: the same elements' codes once the block's scale is known, and (with a residual)
// what each code leaves out, written back as the next residual.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline void write_change_codes(const float* snapshot, const float* anchor, float* residual,
                                                    typename Codec::Code* codes, int64_t block_size, float scale,
                                                    int thread, int threads) {
  const bool gives_codes = quantize::scale_gives_codes(scale);
  for (int64_t k = thread; k < block_size; k += threads) {
    const float change = quantize::change_at(snapshot, anchor, residual, k);
    const typename Codec::Code code = gives_codes ? Codec::encode(change, scale) : typename Codec::Code{0};
    codes[k] = code;
    if (residual != nullptr) {
      residual[k] = quantize::left_out(change, Codec::decode(code), scale);
    }
  }
}

// apply_quantized_mean: element k of the anchor moved by its dequantized mean change.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline float moved_anchor_at(const typename Codec::Code* codes, const float* scales,
                                                  const float* anchor, int64_t block_size, int64_t k) {
  return quantize::add_dequantized(anchor[k], Codec::decode(codes[k]), scales[k / block_size]);
}

// Element k of the rows' dequantized mean over divisor: each row's value times its scale / divisor,
// summed in row order.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline float dequantized_sum_at(const typename Codec::Code* codes, const float* scales,
                                                     int64_t rows, int64_t length, int64_t block_size, float divisor,
                                                     int64_t k) {
  const int64_t num_blocks = length / block_size;
  const int64_t block = k / block_size;
  float sum = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    sum = quantize::add_dequantized(sum, Codec::decode(codes[r * length + k]),
                                    quantize::scale_for_mean(scales[r * num_blocks + block], divisor));
  }
  return sum;
}

// requantize_mean: thread `thread` of `threads`, max |mean| over its elements of block b (the mean over
// the rows, as dequantized_sum_at computes it with divisor = rows).
template <typename Codec>
LOCALSGD_HOST_DEVICE inline float partial_max_mean(const typename Codec::Code* codes, const float* scales, int64_t rows,
                                                   int64_t length, int64_t block_size, int64_t b, int thread,
                                                   int threads) {
  float magnitude = 0.0f;
  for (int64_t k = b * block_size + thread; k < (b + 1) * block_size; k += threads) {
    magnitude = quantize::max_magnitude(
        magnitude, dequantized_sum_at<Codec>(codes, scales, rows, length, block_size, static_cast<float>(rows), k));
  }
  return magnitude;
}

// requantize_mean: the same elements' codes of the mean, once block b's scale is known.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline void write_mean_codes(const typename Codec::Code* codes, const float* scales, int64_t rows,
                                                  int64_t length, int64_t block_size, int64_t b, float scale,
                                                  typename Codec::Code* mean_codes, int thread, int threads) {
  const bool gives_codes = quantize::scale_gives_codes(scale);
  for (int64_t k = b * block_size + thread; k < (b + 1) * block_size; k += threads) {
    const float mean = dequantized_sum_at<Codec>(codes, scales, rows, length, block_size, static_cast<float>(rows), k);
    mean_codes[k] = gives_codes ? Codec::encode(mean, scale) : typename Codec::Code{0};
  }
}

} // namespace localsgd_ext::cuda
