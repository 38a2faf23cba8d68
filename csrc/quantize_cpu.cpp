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

#include "quantize_checks.h"
#include "quantize_math.h"

namespace localsgd_ext {
namespace {

// Blocks per parallel task: enough elements that a task outweighs its scheduling.
int64_t blocks_per_task(int64_t block_size) {
  return std::max<int64_t>(1, (64 * 1024) / block_size);
}

template <typename Codec>
void quantize_all(const float* in, int64_t num_blocks, int64_t block_size, void* codes, float* scale_out) {
  using Code = typename Codec::Code;
  Code* out = static_cast<Code*>(codes);
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const float* block = in + b * block_size;
      Code* block_codes = out + b * block_size;
      // Both loops are branch-free so that the compiler vectorizes them. The max ignores NaN and a flag
      // carries it instead: the same scale as quantize::max_magnitude's, which the CUDA kernel uses.
      float magnitude = 0.0f;
      int has_nan = 0;
      for (int64_t k = 0; k < block_size; ++k) {
        const float m = std::fabs(block[k]);
        magnitude = m > magnitude ? m : magnitude;
        has_nan |= block[k] != block[k];
      }
      const float scale =
          has_nan ? std::numeric_limits<float>::quiet_NaN() : quantize::block_scale<Codec>(magnitude);
      scale_out[b] = scale;
      if (!quantize::scale_gives_codes(scale)) {
        std::memset(block_codes, 0, block_size * sizeof(Code));
        continue;
      }
      for (int64_t k = 0; k < block_size; ++k) {
        block_codes[k] = Codec::encode(block[k], scale);
      }
    }
  });
}

// Each code's value, computed once by Codec::decode: a table lookup instead of decode's bit work per element.
template <typename Codec>
struct DecodedCodes {
  float values[256];
  DecodedCodes() {
    for (int raw = 0; raw < 256; ++raw) {
      values[raw] = Codec::decode(static_cast<typename Codec::Code>(raw));
    }
  }
  float operator()(typename Codec::Code code) const { return values[static_cast<uint8_t>(code)]; }
};

template <typename Codec>
void dequantize_all(
    const void* codes, const float* scale_in, int64_t rows, int64_t length, int64_t block_size, float divisor,
    float* sum_out) {
  using Code = typename Codec::Code;
  const Code* in = static_cast<const Code*>(codes);
  const int64_t num_blocks = length / block_size;
  static const DecodedCodes<Codec> decoded;
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      float* sums = sum_out + b * block_size;
      // Row by row, so that the inner loops vectorize; each element still adds its rows in order, from
      // 0.0f, exactly as the CUDA kernel does element by element.
      std::fill(sums, sums + block_size, 0.0f);
      for (int64_t r = 0; r < rows; ++r) {
        const Code* row = in + r * length + b * block_size;
        const float scale = quantize::scale_for_mean(scale_in[r * num_blocks + b], divisor);
        for (int64_t k = 0; k < block_size; ++k) {
          sums[k] = quantize::add_dequantized(sums[k], decoded(row[k]), scale);
        }
      }
    }
  });
}

// quantize_change: per block, the change (snapshot - anchor + residual) is computed twice from inputs that
// a block keeps in cache, rather than stored: once for the scale, once for the codes and the residual.
template <typename Codec>
void quantize_change_all(
    const float* snapshot, const float* anchor, float* residual, int64_t num_blocks, int64_t block_size, void* codes,
    float* scale_out) {
  using Code = typename Codec::Code;
  Code* out = static_cast<Code*>(codes);
  static const DecodedCodes<Codec> decoded;
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t offset = b * block_size;
      const float* s = snapshot + offset;
      const float* a = anchor + offset;
      float* r = residual == nullptr ? nullptr : residual + offset;
      float magnitude = 0.0f;
      int has_nan = 0;
      for (int64_t k = 0; k < block_size; ++k) {
        const float change = quantize::change_at(s, a, r, k);
        const float m = std::fabs(change);
        magnitude = m > magnitude ? m : magnitude;
        has_nan |= change != change;
      }
      const float scale =
          has_nan ? std::numeric_limits<float>::quiet_NaN() : quantize::block_scale<Codec>(magnitude);
      scale_out[b] = scale;
      Code* block_codes = out + offset;
      const bool gives_codes = quantize::scale_gives_codes(scale);
      if (!gives_codes) {
        std::memset(block_codes, 0, block_size * sizeof(Code));
      } else {
        for (int64_t k = 0; k < block_size; ++k) {
          block_codes[k] = Codec::encode(quantize::change_at(s, a, r, k), scale);
        }
      }
      if (r != nullptr) {
        // Reads the change before overwriting the residual it includes.
        for (int64_t k = 0; k < block_size; ++k) {
          r[k] = quantize::left_out(quantize::change_at(s, a, r, k), decoded(block_codes[k]), scale);
        }
      }
    }
  });
}

template <typename Codec>
void apply_mean_all(const void* codes, const float* scales, int64_t length, int64_t block_size, float* anchor) {
  using Code = typename Codec::Code;
  const Code* in = static_cast<const Code*>(codes);
  static const DecodedCodes<Codec> decoded;
  const int64_t num_blocks = length / block_size;
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const float scale = scales[b];
      float* a = anchor + b * block_size;
      const Code* c = in + b * block_size;
      for (int64_t k = 0; k < block_size; ++k) {
        a[k] = quantize::add_dequantized(a[k], decoded(c[k]), scale);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_change_cpu(
    const at::Tensor& snapshot, const at::Tensor& anchor, const std::optional<at::Tensor>& residual, int64_t block_size,
    std::optional<at::ScalarType> code_dtype) {
  const at::ScalarType codes_type = check_quantize_change_arguments(snapshot, anchor, residual, block_size, code_dtype);
  const int64_t num_blocks = snapshot.numel() / block_size;
  at::Tensor codes = at::empty({snapshot.numel()}, snapshot.options().dtype(codes_type));
  at::Tensor scales = at::empty({num_blocks}, snapshot.options());
  float* r = residual ? residual->mutable_data_ptr<float>() : nullptr;
  const auto run = codes_type == at::kChar ? &quantize_change_all<quantize::Int8Codec>
                                           : &quantize_change_all<quantize::E4M3Codec>;
  run(snapshot.const_data_ptr<float>(), anchor.const_data_ptr<float>(), r, num_blocks, block_size,
      codes.mutable_data_ptr(), scales.mutable_data_ptr<float>());
  return {codes, scales};
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
  if (codes_type == at::kChar) {
    quantize_all<quantize::Int8Codec>(
        x.const_data_ptr<float>(), num_blocks, block_size, codes.mutable_data_ptr(), scales.mutable_data_ptr<float>());
  } else {
    quantize_all<quantize::E4M3Codec>(
        x.const_data_ptr<float>(), num_blocks, block_size, codes.mutable_data_ptr(), scales.mutable_data_ptr<float>());
  }
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
  m.impl("apply_quantized_mean", &apply_quantized_mean_cpu);
}

} // namespace localsgd_ext
