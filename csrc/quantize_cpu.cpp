// CPU kernels of the int8 wire: quantize_blocks (a scale per block, then the codes) and
// dequantize_blocks (the rows' dequantized values summed in row order, divided once), blocks spread
// over intra-op threads. The arithmetic is quantize_math.h's, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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
      float magnitude = 0.0f;
      for (int64_t k = 0; k < block_size; ++k) {
        magnitude = quantize::max_magnitude(magnitude, block[k]);
      }
      const float scale = quantize::block_scale(magnitude);
      scale_out[b] = scale;
      for (int64_t k = 0; k < block_size; ++k) {
        out[b * block_size + k] = quantize::quantize_value(block[k], scale);
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
      for (int64_t k = b * block_size; k < (b + 1) * block_size; ++k) {
        float sum = 0.0f;
        for (int64_t r = 0; r < rows; ++r) {
          sum = quantize::add_dequantized(sum, in[r * length + k], scale_in[r * num_blocks + b]);
        }
        sum_out[k] = quantize::divide_sum(sum, d);
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
