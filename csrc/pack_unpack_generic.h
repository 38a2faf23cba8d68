// Device-generic pack_into / unpack_from built from ATen ops: correct on any backend that has no
// dedicated kernel (until csrc/cuda/ provides fused ones), one ATen copy per tensor.
#pragma once

#include <ATen/core/Tensor.h>

namespace localsgd_ext {

void pack_into_generic(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, double scale);
void unpack_from_generic(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors);
void merge_into_generic(const at::Tensor& sum, const at::Tensor& snapshot, at::IntArrayRef offsets, double divisor,
                        at::TensorList tensors, double scale);

} // namespace localsgd_ext
