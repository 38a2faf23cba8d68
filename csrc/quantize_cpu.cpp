// CPU kernels of the quantized wires: quantize_blocks (a scale per block, then the codes) and
// dequantize_blocks (the rows' dequantized values, each scaled by 1 / divisor, summed in row order), blocks spread
// over intra-op threads. The arithmetic is quantize_math.h's, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "quantize_checks.h"
#include "quantize_math.h"

namespace localsgd_ext {
namespace {

// Blocks per parallel task: enough elements that a task outweighs its scheduling.
int64_t blocks_per_task(int64_t block_size) {
  return std::max<int64_t>(1, (64 * 1024) / block_size);
}

// Each code's value, computed once by Codec::decode: a table lookup instead of e4m3's bit work per
// element. An int8 code's value is the code itself: a conversion, which vectorizes where a lookup does not.
template <typename Codec>
struct DecodedCodes {
  float values[256];
  DecodedCodes() {
    for (int raw = 0; raw < 256; ++raw) {
      values[raw] = Codec::decode(static_cast<typename Codec::Code>(raw));
    }
  }
  float operator()(typename Codec::Code code) const {
    if constexpr (std::is_same_v<Codec, quantize::Int8Codec>) {
      return static_cast<float>(code);
    } else {
      return values[static_cast<uint8_t>(code)];
    }
  }
};

// One block's scale and codes, from `value(k)` for k < block_size (read twice: once for the scale, once
// for the codes). Both loops are branch-free so that the compiler vectorizes them. The max ignores NaN
// and a flag carries it instead: the same scale as quantize::max_magnitude's, which the CUDA kernels use.
template <typename Codec, typename Value>
float quantize_block(const Value& value, int64_t block_size, typename Codec::Code* codes) {
  // Eight running maxima, so that the compiler keeps them in one vector register (a single running max
  // is a dependency chain it will not vectorize without -ffast-math); the max is exact in any order.
  constexpr int64_t kLanes = 8;
  float lanes[kLanes] = {};
  int nan_lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= block_size; k += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = value(k + j);
      const float m = std::fabs(v);
      lanes[j] = m > lanes[j] ? m : lanes[j];
      nan_lanes[j] |= v != v;
    }
  }
  float magnitude = 0.0f;
  int has_nan = 0;
  for (; k < block_size; ++k) {
    const float v = value(k);
    const float m = std::fabs(v);
    magnitude = m > magnitude ? m : magnitude;
    has_nan |= v != v;
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    magnitude = lanes[j] > magnitude ? lanes[j] : magnitude;
    has_nan |= nan_lanes[j];
  }
  const float scale = has_nan ? std::numeric_limits<float>::quiet_NaN() : quantize::block_scale<Codec>(magnitude);
  if (!quantize::scale_gives_codes(scale)) {
    std::memset(codes, 0, block_size * sizeof(typename Codec::Code));
  } else {
    for (int64_t k = 0; k < block_size; ++k) {
      codes[k] = Codec::encode(value(k), scale);
    }
  }
  return scale;
}

// Block b of the rows' dequantized mean over `divisor` rows, into `sums`: row by row, so that the inner
// loops vectorize; each element still adds its rows in order, from 0.0f, exactly as the CUDA kernel does
// element by element.
template <typename Codec>
void sum_rows_of_block(
    const typename Codec::Code* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size,
    float divisor, int64_t b, float* sums) {
  static const DecodedCodes<Codec> decoded;
  const int64_t num_blocks = length / block_size;
  std::fill(sums, sums + block_size, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const typename Codec::Code* row = codes + r * length + b * block_size;
    const float scale = quantize::scale_for_mean(scales[r * num_blocks + b], divisor);
    for (int64_t k = 0; k < block_size; ++k) {
      sums[k] = quantize::add_dequantized(sums[k], decoded(row[k]), scale);
    }
  }
}

template <typename Codec>
void quantize_all(const float* in, int64_t num_blocks, int64_t block_size, void* codes, float* scale_out) {
  auto* out = static_cast<typename Codec::Code*>(codes);
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const float* block = in + b * block_size;
      scale_out[b] = quantize_block<Codec>([block](int64_t k) { return block[k]; }, block_size, out + b * block_size);
    }
  });
}

template <typename Codec>
void dequantize_all(
    const void* codes, const float* scale_in, int64_t rows, int64_t length, int64_t block_size, float divisor,
    float* sum_out) {
  const auto* in = static_cast<const typename Codec::Code*>(codes);
  at::parallel_for(0, length / block_size, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      sum_rows_of_block<Codec>(in, scale_in, rows, length, block_size, divisor, b, sum_out + b * block_size);
    }
  });
}

// quantize_change: the change (snapshot - anchor + residual) is recomputed from inputs that a block keeps
// in cache, rather than stored: for the scale, for the codes, and for the residual.
template <typename Codec, bool kWithResidual>
void quantize_change_all(
    const float* snapshot, const float* anchor, float* residual, int64_t num_blocks, int64_t block_size, void* codes,
    float* scale_out) {
  auto* out = static_cast<typename Codec::Code*>(codes);
  static const DecodedCodes<Codec> decoded;
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t offset = b * block_size;
      const float* s = snapshot + offset;
      const float* a = anchor + offset;
      // A compile-time null without error feedback, so that the inner loops have no branch on it.
      float* r = kWithResidual ? residual + offset : nullptr;
      const auto change = [s, a, r](int64_t k) { return quantize::change_at(s, a, r, k); };
      const float scale = quantize_block<Codec>(change, block_size, out + offset);
      scale_out[b] = scale;
      if constexpr (kWithResidual) {
        const typename Codec::Code* block_codes = out + offset;
        for (int64_t k = 0; k < block_size; ++k) {
          r[k] = quantize::left_out(change(k), decoded(block_codes[k]), scale);  // reads r[k] before writing it
        }
      }
    }
  });
}

// requantize_mean: each block's mean over the rows into a buffer of the task's own, then its codes.
template <typename Codec>
void requantize_mean_all(
    const void* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size, void* mean_codes,
    float* mean_scales) {
  const auto* in = static_cast<const typename Codec::Code*>(codes);
  auto* out = static_cast<typename Codec::Code*>(mean_codes);
  at::parallel_for(0, length / block_size, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    std::vector<float> mean(block_size);
    for (int64_t b = first; b < last; ++b) {
      sum_rows_of_block<Codec>(in, scales, rows, length, block_size, static_cast<float>(rows), b, mean.data());
      const float* m = mean.data();
      mean_scales[b] = quantize_block<Codec>([m](int64_t k) { return m[k]; }, block_size, out + b * block_size);
    }
  });
}

template <typename Codec>
void apply_mean_all(const void* codes, const float* scales, int64_t length, int64_t block_size, float* anchor) {
  const auto* in = static_cast<const typename Codec::Code*>(codes);
  static const DecodedCodes<Codec> decoded;
  at::parallel_for(0, length / block_size, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const float scale = scales[b];
      float* a = anchor + b * block_size;
      const typename Codec::Code* c = in + b * block_size;
      for (int64_t k = 0; k < block_size; ++k) {
        a[k] = quantize::add_dequantized(a[k], decoded(c[k]), scale);
      }
    }
  });
}

void quantize_change_cpu(
    const at::Tensor& snapshot, const at::Tensor& anchor, const std::optional<at::Tensor>& residual, int64_t block_size,
    const at::Tensor& codes, const at::Tensor& scales) {
  check_quantize_change_arguments(snapshot, anchor, residual, block_size, codes, scales);
  const bool int8 = codes.scalar_type() == at::kChar;
  const auto run = residual
      ? (int8 ? &quantize_change_all<quantize::Int8Codec, true> : &quantize_change_all<quantize::E4M3Codec, true>)
      : (int8 ? &quantize_change_all<quantize::Int8Codec, false> : &quantize_change_all<quantize::E4M3Codec, false>);
  // const_cast: the schema declares the outputs mutable (Tensor(a!)).
  run(snapshot.const_data_ptr<float>(), anchor.const_data_ptr<float>(),
      residual ? residual->mutable_data_ptr<float>() : nullptr, snapshot.numel() / block_size, block_size,
      const_cast<at::Tensor&>(codes).mutable_data_ptr(), const_cast<at::Tensor&>(scales).mutable_data_ptr<float>());
}

void requantize_mean_cpu(
    const at::Tensor& codes, const at::Tensor& scales, int64_t block_size, const at::Tensor& mean_codes,
    const at::Tensor& mean_scales) {
  check_requantize_mean_arguments(codes, scales, block_size, mean_codes, mean_scales);
  const auto run = codes.scalar_type() == at::kChar ? &requantize_mean_all<quantize::Int8Codec>
                                                    : &requantize_mean_all<quantize::E4M3Codec>;
  run(codes.const_data_ptr(), scales.const_data_ptr<float>(), codes.size(0), codes.size(1), block_size,
      const_cast<at::Tensor&>(mean_codes).mutable_data_ptr(), const_cast<at::Tensor&>(mean_scales).mutable_data_ptr<float>());
}

void apply_quantized_mean_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size, const at::Tensor& anchor) {
  check_apply_quantized_mean_arguments(codes, scales, block_size, anchor);
  const auto run = codes.scalar_type() == at::kChar ? &apply_mean_all<quantize::Int8Codec>
                                                    : &apply_mean_all<quantize::E4M3Codec>;
  // const_cast: the schema declares `anchor` mutable (Tensor(a!)).
  run(codes.const_data_ptr(), scales.const_data_ptr<float>(), codes.numel(), block_size,
      const_cast<at::Tensor&>(anchor).mutable_data_ptr<float>());
}

std::tuple<at::Tensor, at::Tensor> quantize_blocks_cpu(
    const at::Tensor& x, int64_t block_size, std::optional<at::ScalarType> code_dtype) {
  const at::ScalarType codes_type = check_quantize_arguments(x, block_size, code_dtype);
  const int64_t num_blocks = x.numel() / block_size;
  at::Tensor codes = at::empty({x.numel()}, x.options().dtype(codes_type));
  at::Tensor scales = at::empty({num_blocks}, x.options());
  const auto run = codes_type == at::kChar ? &quantize_all<quantize::Int8Codec> : &quantize_all<quantize::E4M3Codec>;
  run(x.const_data_ptr<float>(), num_blocks, block_size, codes.mutable_data_ptr(), scales.mutable_data_ptr<float>());
  return {codes, scales};
}

at::Tensor dequantize_blocks_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size, double divisor) {
  check_dequantize_arguments(codes, scales, block_size, divisor);
  at::Tensor out = at::empty({codes.size(1)}, scales.options());
  const auto run = codes.scalar_type() == at::kChar ? &dequantize_all<quantize::Int8Codec>
                                                    : &dequantize_all<quantize::E4M3Codec>;
  run(codes.const_data_ptr(), scales.const_data_ptr<float>(), codes.size(0), codes.size(1), block_size,
      static_cast<float>(divisor), out.mutable_data_ptr<float>());
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) {
  m.impl("quantize_blocks", &quantize_blocks_cpu);
  m.impl("dequantize_blocks", &dequantize_blocks_cpu);
  m.impl("quantize_change", &quantize_change_cpu);
  m.impl("requantize_mean", &requantize_mean_cpu);
  m.impl("apply_quantized_mean", &apply_quantized_mean_cpu);
}

} // namespace localsgd_ext
