// CPU kernels of the quantized wires: quantize_blocks (a scale per block, then the codes) and
// dequantize_blocks (the rows' dequantized values, each scaled by 1 / divisor, summed in row order), blocks spread
// over intra-op threads, with the loops of quantize_cpu_blocks.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "quantize_checks.h"
#include "quantize_cpu_blocks.h"
#include "vector_clones.h"

namespace localsgd_ext {
namespace {

using namespace cpu;

template <typename Codec>
LOCALSGD_VECTOR_CLONES void quantize_blocks_of(const float* in, int64_t first, int64_t last, int64_t block_size,
                                               typename Codec::Storage* out, float* scale_out) {
  for (int64_t b = first; b < last; ++b) {
    const float* block = in + b * block_size;
    scale_out[b] = quantize_block<Codec>([block](int64_t k) { return block[k]; }, block_size,
                                         quantize::storage_at<Codec>(out, b * block_size));
  }
}

template <typename Codec>
void quantize_all(const float* in, int64_t num_blocks, int64_t block_size, void* codes, float* scale_out) {
  auto* out = static_cast<typename Codec::Storage*>(codes);
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    quantize_blocks_of<Codec>(in, first, last, block_size, out, scale_out);
  });
}

template <typename Codec>
LOCALSGD_VECTOR_CLONES void dequantize_blocks_of(const typename Codec::Storage* in, const float* scale_in, int64_t rows,
                                                 int64_t length, int64_t block_size, float divisor, int64_t first,
                                                 int64_t last, float* sum_out) {
  for (int64_t b = first; b < last; ++b) {
    sum_rows_of_block<Codec>(in, scale_in, rows, length, block_size, divisor, b, sum_out + b * block_size);
  }
}

template <typename Codec>
void dequantize_all(const void* codes, const float* scale_in, int64_t rows, int64_t length, int64_t block_size,
                    float divisor, float* sum_out) {
  const auto* in = static_cast<const typename Codec::Storage*>(codes);
  at::parallel_for(0, length / block_size, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    dequantize_blocks_of<Codec>(in, scale_in, rows, length, block_size, divisor, first, last, sum_out);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_blocks_cpu(const at::Tensor& x, int64_t block_size,
                                                       std::optional<at::ScalarType> code_dtype) {
  const at::ScalarType codes_type = check_quantize_arguments(x, block_size, code_dtype);
  const int64_t num_blocks = x.numel() / block_size;
  at::Tensor codes = at::empty({x.numel() / codes_per_storage(codes_type)}, x.options().dtype(codes_type));
  at::Tensor scales = at::empty({num_blocks}, x.options());
  with_codec(codes_type, [&](auto codec) {
    quantize_all<decltype(codec)>(x.const_data_ptr<float>(), num_blocks, block_size, codes.mutable_data_ptr(),
                                  scales.mutable_data_ptr<float>());
  });
  return {codes, scales};
}

at::Tensor dequantize_blocks_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                 double divisor) {
  check_dequantize_arguments(codes, scales, block_size, divisor);
  const int64_t length = codes.size(1) * codes_per_storage(codes.scalar_type());
  at::Tensor out = at::empty({length}, scales.options());
  with_codec(codes.scalar_type(), [&](auto codec) {
    dequantize_all<decltype(codec)>(codes.const_data_ptr(), scales.const_data_ptr<float>(), codes.size(0), length,
                                    block_size, static_cast<float>(divisor), out.mutable_data_ptr<float>());
  });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) {
  m.impl("quantize_blocks", &quantize_blocks_cpu);
  m.impl("dequantize_blocks", &dequantize_blocks_cpu);
}

} // namespace localsgd_ext
