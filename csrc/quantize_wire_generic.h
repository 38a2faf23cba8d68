// The quantized wire's window ops (quantize_tensors_change, apply_quantized_mean_to) through ATen copies
// and the device's own quantize_change / apply_quantized_mean: every device without window kernels (CUDA
// today) takes this path, and so do CPU calls with a non-contiguous tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace localsgd_ext {

void quantize_tensors_change_generic(at::TensorList tensors, at::IntArrayRef offsets, int64_t start,
                                     const at::Tensor& anchor, const std::optional<at::Tensor>& residual,
                                     int64_t block_size, const at::Tensor& codes, const at::Tensor& scales,
                                     const std::optional<at::Tensor>& snapshot);

void apply_quantized_mean_to_generic(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                     const at::Tensor& anchor, at::IntArrayRef offsets, int64_t start,
                                     at::TensorList tensors);

} // namespace localsgd_ext
