// The bf16 and fp16 wires' casts on the CPU: contiguous float32 tensors into and out of a narrower
// bucket buffer, for pack_into / unpack_from (pack_unpack_cpu.cpp), which finds them in a bucket.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <vector>

namespace localsgd_ext::cpu {

// tensors[i] for i in `casts` (float32, contiguous), times `scale` in float32, into `buffer`
// (bfloat16 or float16) at offsets[i], rounding to nearest even: as `(tensor * scale).to(dtype)`.
void pack_casts(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, double scale,
                const std::vector<size_t>& casts);

// The reverse: each slot widened to float32, then divided in float32, as `slot.float() / divisor`.
void unpack_casts(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors,
                  const std::vector<size_t>& casts);

} // namespace localsgd_ext::cpu
