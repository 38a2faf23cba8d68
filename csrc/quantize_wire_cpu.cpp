// CPU kernels of the quantized wire's fused steps, one pass each: quantize_change (the change since the
// anchor, its codes and the residual it leaves), requantize_mean (the rows' mean quantized again) and
// apply_quantized_mean (the anchor moved by the mean codes), with the loops of quantize_cpu_blocks.h. Their
// window forms, which read and write the parameters themselves, are in quantize_window_cpu.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "quantize_checks.h"
#include "quantize_cpu_blocks.h"
#include "vector_clones.h"

namespace localsgd_ext {
namespace {

using namespace cpu;

template <typename Codec, bool kWithResidual>
void quantize_change_all(const float* snapshot, const float* anchor, float* residual, int64_t num_blocks,
                         int64_t block_size, void* codes, float* scale_out) {
  auto* out = static_cast<typename Codec::Storage*>(codes);
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    const int64_t offset = first * block_size;
    quantize_change_blocks<Codec, kWithResidual>(snapshot + offset, anchor + offset,
                                                 kWithResidual ? residual + offset : nullptr, last - first, block_size,
                                                 quantize::storage_at<Codec>(out, offset), scale_out + first);
  });
}

// requantize_mean: each block's mean over the rows into a buffer of the task's own, then its codes.
template <typename Codec>
LOCALSGD_VECTOR_CLONES void requantize_mean_blocks(const typename Codec::Storage* in, const float* scales, int64_t rows,
                                                   int64_t length, int64_t block_size, int64_t first, int64_t last,
                                                   float* mean, typename Codec::Storage* out, float* mean_scales) {
  for (int64_t b = first; b < last; ++b) {
    sum_rows_of_block<Codec>(in, scales, rows, length, block_size, static_cast<float>(rows), b, mean);
    mean_scales[b] = quantize_block<Codec>([mean](int64_t k) { return mean[k]; }, block_size,
                                           quantize::storage_at<Codec>(out, b * block_size));
  }
}

template <typename Codec>
void requantize_mean_all(const void* codes, const float* scales, int64_t rows, int64_t length, int64_t block_size,
                         void* mean_codes, float* mean_scales) {
  const auto* in = static_cast<const typename Codec::Storage*>(codes);
  auto* out = static_cast<typename Codec::Storage*>(mean_codes);
  at::parallel_for(0, length / block_size, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    std::vector<float> mean(block_size);
    requantize_mean_blocks<Codec>(in, scales, rows, length, block_size, first, last, mean.data(), out, mean_scales);
  });
}

template <typename Codec>
void apply_mean_all(const void* codes, const float* scales, int64_t length, int64_t block_size, float* anchor) {
  const auto* in = static_cast<const typename Codec::Storage*>(codes);
  at::parallel_for(0, length / block_size, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    apply_mean_blocks<Codec>(in, scales, first, last, block_size, anchor);
  });
}

void quantize_change_cpu(const at::Tensor& snapshot, const at::Tensor& anchor,
                         const std::optional<at::Tensor>& residual, int64_t block_size, const at::Tensor& codes,
                         const at::Tensor& scales) {
  check_quantize_change_arguments(snapshot, anchor, residual, block_size, codes, scales);
  with_codec(codes.scalar_type(), [&](auto codec) {
    using Codec = decltype(codec);
    const auto run = residual ? &quantize_change_all<Codec, true> : &quantize_change_all<Codec, false>;
    // const_cast: the schema declares the outputs mutable (Tensor(a!)).
    run(snapshot.const_data_ptr<float>(), anchor.const_data_ptr<float>(),
        residual ? residual->mutable_data_ptr<float>() : nullptr, snapshot.numel() / block_size, block_size,
        const_cast<at::Tensor&>(codes).mutable_data_ptr(), const_cast<at::Tensor&>(scales).mutable_data_ptr<float>());
  });
}

void requantize_mean_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                         const at::Tensor& mean_codes, const at::Tensor& mean_scales) {
  check_requantize_mean_arguments(codes, scales, block_size, mean_codes, mean_scales);
  with_codec(codes.scalar_type(), [&](auto codec) {
    requantize_mean_all<decltype(codec)>(codes.const_data_ptr(), scales.const_data_ptr<float>(), codes.size(0),
                                         codes.size(1) * codes_per_storage(codes.scalar_type()), block_size,
                                         const_cast<at::Tensor&>(mean_codes).mutable_data_ptr(),
                                         const_cast<at::Tensor&>(mean_scales).mutable_data_ptr<float>());
  });
}

void apply_quantized_mean_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                              const at::Tensor& anchor) {
  check_apply_quantized_mean_arguments(codes, scales, block_size, anchor);
  with_codec(codes.scalar_type(), [&](auto codec) {
    // const_cast: the schema declares `anchor` mutable (Tensor(a!)).
    apply_mean_all<decltype(codec)>(codes.const_data_ptr(), scales.const_data_ptr<float>(), anchor.numel(), block_size,
                                    const_cast<at::Tensor&>(anchor).mutable_data_ptr<float>());
  });
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) {
  m.impl("quantize_change", &quantize_change_cpu);
  m.impl("requantize_mean", &requantize_mean_cpu);
  m.impl("apply_quantized_mean", &apply_quantized_mean_cpu);
}

} // namespace localsgd_ext
