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

// Code k of a block whose scale may give none.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline typename Codec::Code code_or_zero(float value, float scale, bool gives_codes) {
  return gives_codes ? Codec::encode(value, scale) : typename Codec::Code{0};
}

// Thread `thread` of `threads` writes the codes its storage units hold: unit u holds codes
// u * kPerStorage ... (u + 1) * kPerStorage - 1 (int4: a byte, two codes), so that no two threads write one
// byte. `code(k)` gives code k of the block.
template <typename Codec, typename CodeOf>
LOCALSGD_HOST_DEVICE inline void store_codes(typename Codec::Storage* codes, int64_t block_size, int thread,
                                             int threads, const CodeOf& code) {
  if constexpr (Codec::kPerStorage == 2) {
    for (int64_t u = thread; u < block_size / 2; u += threads) {
      codes[u] = Codec::pack(code(2 * u), code(2 * u + 1));
    }
  } else {
    for (int64_t k = thread; k < block_size; k += threads) {
      codes[k] = code(k);
    }
  }
}

// Thread `thread` of `threads`: the codes of its storage units of one block, once the block's scale is known.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline void write_codes(const float* block, typename Codec::Storage* codes, int64_t block_size,
                                             float scale, int thread, int threads) {
  const bool gives_codes = quantize::scale_gives_codes(scale);
  store_codes<Codec>(codes, block_size, thread, threads,
                     [&](int64_t k) { return code_or_zero<Codec>(block[k], scale, gives_codes); });
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

// quantize_change: the codes of this thread's storage units once the block's scale is known, and (with a
// residual) what each code leaves out, written back as the next residual (each element's residual is read,
// for its change, before it is written).
template <typename Codec>
LOCALSGD_HOST_DEVICE inline void write_change_codes(const float* snapshot, const float* anchor, float* residual,
                                                    typename Codec::Storage* codes, int64_t block_size, float scale,
                                                    int thread, int threads) {
  const bool gives_codes = quantize::scale_gives_codes(scale);
  store_codes<Codec>(codes, block_size, thread, threads, [&](int64_t k) {
    const float change = quantize::change_at(snapshot, anchor, residual, k);
    const typename Codec::Code code = code_or_zero<Codec>(change, scale, gives_codes);
    if (residual != nullptr) {
      residual[k] = quantize::left_out(change, Codec::decode(code), scale);
    }
    return code;
  });
}

// apply_quantized_mean: element k of the anchor moved by its dequantized mean change.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline float moved_anchor_at(const typename Codec::Storage* codes, const float* scales,
                                                  const float* anchor, int64_t block_size, int64_t k) {
  return quantize::add_dequantized(anchor[k], Codec::decode(Codec::load(codes, k)), scales[k / block_size]);
}

// Element k of the rows' dequantized mean over divisor: each row's value times its scale / divisor,
// summed in row order.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline float dequantized_sum_at(const typename Codec::Storage* codes, const float* scales,
                                                     int64_t rows, int64_t length, int64_t block_size, float divisor,
                                                     int64_t k) {
  const int64_t num_blocks = length / block_size;
  const int64_t block = k / block_size;
  float sum = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    sum = quantize::add_dequantized(sum, Codec::decode(Codec::load(codes, r * length + k)),
                                    quantize::scale_for_mean(scales[r * num_blocks + block], divisor));
  }
  return sum;
}

// requantize_mean: thread `thread` of `threads`, max |mean| over its elements of block b (the mean over
// the rows, as dequantized_sum_at computes it with divisor = rows).
template <typename Codec>
LOCALSGD_HOST_DEVICE inline float partial_max_mean(const typename Codec::Storage* codes, const float* scales,
                                                   int64_t rows, int64_t length, int64_t block_size, int64_t b,
                                                   int thread, int threads) {
  float magnitude = 0.0f;
  for (int64_t k = b * block_size + thread; k < (b + 1) * block_size; k += threads) {
    magnitude = quantize::max_magnitude(
        magnitude, dequantized_sum_at<Codec>(codes, scales, rows, length, block_size, static_cast<float>(rows), k));
  }
  return magnitude;
}

// requantize_mean: the codes of the mean in this thread's storage units of block b, once its scale is known.
template <typename Codec>
LOCALSGD_HOST_DEVICE inline void write_mean_codes(const typename Codec::Storage* codes, const float* scales,
                                                  int64_t rows, int64_t length, int64_t block_size, int64_t b,
                                                  float scale, typename Codec::Storage* mean_codes, int thread,
                                                  int threads) {
  const bool gives_codes = quantize::scale_gives_codes(scale);
  store_codes<Codec>(quantize::storage_at<Codec>(mean_codes, b * block_size), block_size, thread, threads,
                     [&](int64_t k) {
                       const float mean = dequantized_sum_at<Codec>(codes, scales, rows, length, block_size,
                                                                    static_cast<float>(rows), b * block_size + k);
                       return code_or_zero<Codec>(mean, scale, gives_codes);
                     });
}

} // namespace localsgd_ext::cuda
