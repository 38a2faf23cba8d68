// CPU kernels of the int8 wire: quantize_blocks (a scale per block, then the codes) and
// dequantize_blocks (the rows' dequantized values summed in row order, divided once), blocks spread
// over intra-op threads. The arithmetic is quantize_math.h's, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "quantize_checks.h"
#include "quantize_math.h"

namespace localsgd_ext {
namespace {

// Blocks per parallel task: enough elements that a task outweighs its scheduling.
int64_t blocks_per_task(int64_t block_size) {
  return std::max<int64_t>(1, (64 * 1024) / block_size);
}

std::tuple<at::Tensor, at::Tensor> quantize_blocks_cpu(const at::Tensor& x, int64_t block_size) {
  check_quantize_arguments(x, block_size);
  const int64_t num_blocks = x.numel() / block_size;
  at::Tensor codes = at::empty({x.numel()}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({num_blocks}, x.options());
  const float* in = x.const_data_ptr<float>();
  int8_t* out = codes.mutable_data_ptr<int8_t>();
  float* scale_out = scales.mutable_data_ptr<float>();
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const float* block = in + b * block_size;
      int8_t* block_codes = out + b * block_size;
      // Both loops are branch-free so that the compiler vectorizes them. The max ignores NaN and a flag
      // carries it instead: the same scale as quantize::max_magnitude's, which the CUDA kernel uses.
      float magnitude = 0.0f;
      int has_nan = 0;
      for (int64_t k = 0; k < block_size; ++k) {
        const float m = std::fabs(block[k]);
        magnitude = m > magnitude ? m : magnitude;
        has_nan |= block[k] != block[k];
      }
      const float scale = has_nan ? std::numeric_limits<float>::quiet_NaN() : quantize::block_scale(magnitude);
      scale_out[b] = scale;
      if (!quantize::scale_gives_codes(scale)) {
        std::memset(block_codes, 0, block_size);
        continue;
      }
      for (int64_t k = 0; k < block_size; ++k) {
        block_codes[k] = quantize::quantize_value(block[k], scale);
      }
    }
  });
  return {codes, scales};
}

at::Tensor dequantize_blocks_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size, double divisor) {
  check_dequantize_arguments(codes, scales, block_size, divisor);
  const int64_t rows = codes.size(0);
  const int64_t length = codes.size(1);
  const int64_t num_blocks = length / block_size;
  at::Tensor out = at::empty({length}, scales.options());
  const int8_t* in = codes.const_data_ptr<int8_t>();
  const float* scale_in = scales.const_data_ptr<float>();
  float* sum_out = out.mutable_data_ptr<float>();
  const float d = static_cast<float>(divisor);
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      float* sums = sum_out + b * block_size;
      // Row by row, so that the inner loops vectorize; each element still adds its rows in order, from
      // 0.0f, exactly as quantize::add_dequantized does in the CUDA kernel.
      std::fill(sums, sums + block_size, 0.0f);
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* row = in + r * length + b * block_size;
        const float scale = scale_in[r * num_blocks + b];
        for (int64_t k = 0; k < block_size; ++k) {
          sums[k] = quantize::add_dequantized(sums[k], row[k], scale);
        }
      }
      if (d != 1.0f) {
        for (int64_t k = 0; k < block_size; ++k) {
          sums[k] = sums[k] / d;
        }
      }
    }
  });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) {
  m.impl("quantize_blocks", &quantize_blocks_cpu);
  m.impl("dequantize_blocks", &dequantize_blocks_cpu);
}

} // namespace localsgd_ext
