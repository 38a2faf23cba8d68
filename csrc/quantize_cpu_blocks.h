// The CPU loops every quantized-wire kernel shares (quantize_cpu.cpp: quantize_blocks / dequantize_blocks;
// quantize_wire_cpu.cpp and quantize_window_cpu.cpp: the fused send, reduce and receive, on packed buffers
// and on the tensors themselves): how blocks are spread over threads, one block's scale and codes, one
// block's mean over rows, the change's codes and residual, the anchor moved by a block's codes. The arithmetic is
// quantize_math.h's, shared with the CUDA kernels; its branch-free decode vectorizes (a 256-entry table lookup did not,
// and was slower).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "quantize_math.h"
#include "vector_clones.h"

namespace localsgd_ext::cpu {

// `body(codec)` with the codec whose codes a tensor of `codes_dtype` holds (int8, float8_e4m3fn, or uint8:
// int4 two per byte); the dtype was checked before.
template <typename Body>
void with_codec(c10::ScalarType codes_dtype, const Body& body) {
  if (codes_dtype == c10::ScalarType::Char) {
    body(quantize::Int8Codec{});
  } else if (codes_dtype == c10::ScalarType::Byte) {
    body(quantize::Int4Codec{});
  } else {
    body(quantize::E4M3Codec{});
  }
}

// Blocks per parallel task: enough elements that a task outweighs its scheduling.
inline int64_t blocks_per_task(int64_t block_size) { return std::max<int64_t>(1, (64 * 1024) / block_size); }

// The largest |value(k)| for k < n, as its bit pattern. The max runs over the magnitudes' bit patterns as
// integers: for non-negative floats the integer order is the float order, and every NaN's pattern lies
// above infinity's, so NaN wins as in quantize::max_magnitude (the CUDA kernels' step). An integer max is
// associative, so the compiler vectorizes the loop without -ffast-math, and the result is the same in any
// order.
template <typename Value>
inline int32_t largest_magnitude_bits(const Value& value, int64_t n) {
  // Signed: the sign bit is cleared, and SSE2 compares only signed integers.
  int32_t largest_bits = 0;
  for (int64_t k = 0; k < n; ++k) {
    const auto bits = static_cast<int32_t>(quantize::float_bits(value(k)) & 0x7fffffffu);
    largest_bits = bits > largest_bits ? bits : largest_bits;
  }
  return largest_bits;
}

// A block's scale from its largest magnitude's bits: NaN if the block holds one.
template <typename Codec>
inline float scale_of_largest_bits(int32_t largest_bits) {
  const bool has_nan = largest_bits > 0x7f800000;
  const float magnitude = quantize::bits_float(static_cast<uint32_t>(largest_bits));
  return has_nan ? std::numeric_limits<float>::quiet_NaN() : quantize::block_scale<Codec>(magnitude);
}

// A block's codes for its scale.
template <typename Codec, typename Value>
inline void encode_block(const Value& value, int64_t block_size, float scale, typename Codec::Storage* codes) {
  if (!quantize::scale_gives_codes(scale)) {
    std::fill(codes, codes + block_size / Codec::kPerStorage, typename Codec::Storage{0});
  } else if constexpr (Codec::kPerStorage == 2) {
    for (int64_t k = 0; k < block_size; k += 2) {
      codes[k / 2] = Codec::pack(Codec::encode(value(k), scale), Codec::encode(value(k + 1), scale));
    }
  } else {
    for (int64_t k = 0; k < block_size; ++k) {
      codes[k] = Codec::encode(value(k), scale);
    }
  }
}

// One block's scale and codes, from `value(k)` for k < block_size (read twice: once for the scale, once
// for the codes).
template <typename Codec, typename Value>
inline float quantize_block(const Value& value, int64_t block_size, typename Codec::Storage* codes) {
  const float scale = scale_of_largest_bits<Codec>(largest_magnitude_bits(value, block_size));
  encode_block<Codec>(value, block_size, scale, codes);
  return scale;
}

// Block b of the rows' dequantized mean over `divisor` rows, into `sums`: row by row, so that the inner
// loops vectorize; each element still adds its rows in order, from 0.0f, exactly as the CUDA kernel does
// element by element.
template <typename Codec>
inline void sum_rows_of_block(const typename Codec::Storage* codes, const float* scales, int64_t rows, int64_t length,
                              int64_t block_size, float divisor, int64_t b, float* sums) {
  const int64_t num_blocks = length / block_size;
  std::fill(sums, sums + block_size, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const typename Codec::Storage* row = quantize::storage_at<Codec>(codes, r * length + b * block_size);
    const float scale = quantize::scale_for_mean(scales[r * num_blocks + b], divisor);
    for (int64_t k = 0; k < block_size; ++k) {
      sums[k] = quantize::add_dequantized(sums[k], Codec::decode(Codec::load(row, k)), scale);
    }
  }
}

// What each code of a block leaves out of its change, into the residual (read before it is written).
template <typename Codec, typename Change>
inline void write_left_out(const Change& change, const typename Codec::Storage* codes, float scale, float* residual,
                           int64_t block_size) {
  for (int64_t k = 0; k < block_size; ++k) {
    residual[k] = quantize::left_out(change(k), Codec::decode(Codec::load(codes, k)), scale);
  }
}

// quantize_change: the change (snapshot - anchor + residual) is recomputed from inputs that a block keeps
// in cache, rather than stored: for the scale, for the codes, and for the residual. The pointers are at
// the first of `num_blocks` blocks.
template <typename Codec, bool kWithResidual>
LOCALSGD_VECTOR_CLONES void quantize_change_blocks(const float* snapshot, const float* anchor, float* residual,
                                                   int64_t num_blocks, int64_t block_size, typename Codec::Storage* out,
                                                   float* scale_out) {
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t offset = b * block_size;
    const float* s = snapshot + offset;
    const float* a = anchor + offset;
    // A compile-time null without error feedback, so that the inner loops have no branch on it.
    float* r = kWithResidual ? residual + offset : nullptr;
    const auto change = [s, a, r](int64_t k) { return quantize::change_at(s, a, r, k); };
    typename Codec::Storage* block_codes = quantize::storage_at<Codec>(out, offset);
    const float scale = quantize_block<Codec>(change, block_size, block_codes);
    scale_out[b] = scale;
    if constexpr (kWithResidual) {
      write_left_out<Codec>(change, block_codes, scale, r, block_size);
    }
  }
}

template <typename Codec>
LOCALSGD_VECTOR_CLONES void apply_mean_blocks(const typename Codec::Storage* in, const float* scales, int64_t first,
                                              int64_t last, int64_t block_size, float* anchor) {
  for (int64_t b = first; b < last; ++b) {
    const float scale = scales[b];
    float* a = anchor + b * block_size;
    const typename Codec::Storage* c = quantize::storage_at<Codec>(in, b * block_size);
    for (int64_t k = 0; k < block_size; ++k) {
      a[k] = quantize::add_dequantized(a[k], Codec::decode(Codec::load(c, k)), scale);
    }
  }
}

} // namespace localsgd_ext::cpu
