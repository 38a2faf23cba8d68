// What every device's pack_into / unpack_from shares: the argument checks (so a bad call gets the
// same sentence whichever kernel it reaches) and how a tensor's slot in the flat buffer is viewed.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/div.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "storage_checks.h"

namespace localsgd_ext {

// The one dtype change a bucket allows: float32 tensors on a narrower wire (comm_dtype), cast to the
// buffer's dtype by pack and back to float32 by unpack.
inline bool is_wire_cast(c10::ScalarType tensor_dtype, c10::ScalarType buffer_dtype) {
  return tensor_dtype == at::kFloat && (buffer_dtype == at::kBFloat16 || buffer_dtype == at::kHalf);
}

inline void check_pack_arguments(const char* op, at::TensorList tensors, at::IntArrayRef offsets,
                                 const at::Tensor& buffer) {
  TORCH_CHECK_VALUE(tensors.size() == offsets.size(), op, ": tensors and offsets must have the same length, got ",
                    tensors.size(), " tensors and ", offsets.size(), " offsets.");
  TORCH_CHECK_VALUE(buffer.layout() == at::kStrided, op, ": buffer must be a strided (dense) tensor, got layout ",
                    buffer.layout(), ".");
  TORCH_CHECK_VALUE(buffer.dim() == 1 && buffer.is_contiguous(), op, ": buffer must be 1-D and contiguous, got sizes ",
                    buffer.sizes(), " and strides ", buffer.strides(), ".");
  check_storage_holds(buffer, [&] { return std::string(op) + ": buffer"; });
  const int64_t capacity = buffer.numel();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), op, ": tensors[", i, "] is undefined.");
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": tensors[", i, "] must be strided (dense), got layout ",
                      t.layout(), ".");
    TORCH_CHECK_TYPE(t.scalar_type() == buffer.scalar_type() || is_wire_cast(t.scalar_type(), buffer.scalar_type()), op,
                     ": tensors[", i, "] has dtype ", t.scalar_type(), " but buffer has dtype ", buffer.scalar_type(),
                     "; a bucket holds one dtype (or float32 tensors in a BFloat16 or Half buffer).");
    TORCH_CHECK_VALUE(t.device() == buffer.device(), op, ": tensors[", i, "] is on ", t.device(), " but buffer is on ",
                      buffer.device(), ".");
    TORCH_CHECK_VALUE(offsets[i] >= 0 && offsets[i] <= capacity - t.numel(), op, ": tensors[", i, "] with ", t.numel(),
                      " elements at offset ", offsets[i], " does not fit in a buffer of ", capacity, " elements.");
    check_storage_holds(t, [&] { return std::string(op) + ": tensors[" + std::to_string(i) + "]"; });
  }
}

// pack_into writes every tensor into its slot: two slots that overlap would both end up holding whichever
// was written last, so they are refused. The engine's offsets ascend, and are checked in one pass.
inline void check_disjoint_slots(const char* op, at::TensorList tensors, at::IntArrayRef offsets) {
  std::vector<std::pair<int64_t, size_t>> slots; // (offset, index) of each tensor with elements
  slots.reserve(tensors.size());
  bool ascending = true;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() > 0) {
      ascending = ascending && (slots.empty() || slots.back().first <= offsets[i]);
      slots.emplace_back(offsets[i], i);
    }
  }
  if (!ascending) {
    std::sort(slots.begin(), slots.end());
  }
  // The slot reaching furthest so far: one that reaches past the next slot's start overlaps it.
  size_t furthest = 0;
  for (size_t k = 1; k < slots.size(); ++k) {
    const auto [start, index] = slots[k];
    const auto [other_start, other] = slots[furthest];
    const int64_t other_end = other_start + tensors[other].numel();
    TORCH_CHECK_VALUE(other_end <= start, op, ": tensors[", std::min(index, other), "] and tensors[",
                      std::max(index, other), "] overlap in the buffer (elements ", other_start, " to ", other_end,
                      " and from ", start, "); each tensor needs a slot of its own.");
    if (start + tensors[index].numel() > other_end) {
      furthest = k;
    }
  }
}

// What the kernels compute with: a scale or divisor as a float32 multiplier (the double given is
// rounded to float32 there), so a value that float32 turns into 0 or inf (1e-300, 1e300) or a
// subnormal (whose reciprocal overflows) is refused as it is, not only once it is NaN in the result.
inline bool is_normal_float32(double value) {
  return value >= static_cast<double>(std::numeric_limits<float>::min()) &&
         value <= static_cast<double>(std::numeric_limits<float>::max());
}

inline void check_float32_factor(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(is_normal_float32(value), op, ": ", name, " must be a finite positive number, got ", value,
                    ": the kernels compute with it in float32, whose normal range is 1.2e-38 to 3.4e38.");
}

// `scale` multiplies float32 values on their way into a narrower buffer; every other copy is exact.
inline void check_scale(const char* op, at::TensorList tensors, const at::Tensor& buffer, double scale) {
  check_float32_factor(op, "scale", scale);
  for (size_t i = 0; i < tensors.size() && scale != 1.0; ++i) {
    TORCH_CHECK_VALUE(is_wire_cast(tensors[i].scalar_type(), buffer.scalar_type()), op,
                      ": scale must be 1 unless every tensor is float32 cast to a bfloat16/float16 buffer; tensors[", i,
                      "] has dtype ", tensors[i].scalar_type(), " and buffer ", buffer.scalar_type(), ", got scale ",
                      scale, ".");
  }
}

// The stretch of `buffer` that holds `like`, viewed in its shape.
inline at::Tensor slot_in_buffer(const at::Tensor& buffer, int64_t offset, const at::Tensor& like) {
  return buffer.narrow(0, offset, like.numel()).view(like.sizes());
}

// One tensor copied through ATen (any device, any strides): the generic kernels' whole job, and the
// CPU kernels' path for strided tensors.
inline void pack_one_with_aten(const at::Tensor& tensor, int64_t offset, const at::Tensor& buffer, double scale = 1.0) {
  // Multiplied in float32, then rounded to the buffer's dtype: what the fused kernels do.
  slot_in_buffer(buffer, offset, tensor).copy_(scale == 1.0 ? tensor : at::mul(tensor, scale));
}

inline void unpack_one_with_aten(const at::Tensor& buffer, int64_t offset, double divisor, const at::Tensor& tensor) {
  // A narrow wire is widened first, so that the division happens in the tensor's dtype (float32).
  const at::Tensor slot = slot_in_buffer(buffer, offset, tensor).to(tensor.scalar_type());
  // const_cast: the schema declares these tensors mutable (Tensor(a!)[]). at::div, not a multiply:
  // it rounds exactly as `tensor / divisor` does on the same device.
  const_cast<at::Tensor&>(tensor).copy_(divisor == 1.0 ? slot : at::div(slot, divisor));
}

// Overlapped sync's merge through ATen (any device, any strides): t + (sum / divisor - snapshot), each
// operand widened to the tensor's math dtype (float32 for fp16/bf16) and, with an fp16 wire's scale,
// divided by it; rounded once into the tensor.
inline void merge_one_with_aten(const at::Tensor& sum, const at::Tensor& snapshot, int64_t offset, double divisor,
                                const at::Tensor& tensor, double scale) {
  const c10::ScalarType math = at::toOpMathType(tensor.scalar_type());
  const at::Tensor mean = at::div(slot_in_buffer(sum, offset, tensor).to(math), divisor * scale);
  const at::Tensor packed = slot_in_buffer(snapshot, offset, tensor).to(math);
  const at::Tensor before = scale == 1.0 ? packed : at::div(packed, scale);
  const at::Tensor merged = at::add(tensor.to(math), at::sub(mean, before));
  const_cast<at::Tensor&>(tensor).copy_(merged);
}

inline void check_divisor(const char* op, double divisor) { check_float32_factor(op, "divisor", divisor); }

inline void check_merge_arguments(const at::Tensor& sum, const at::Tensor& snapshot, at::IntArrayRef offsets,
                                  double divisor, at::TensorList tensors, double scale) {
  check_pack_arguments("merge_into", tensors, offsets, sum);
  check_pack_arguments("merge_into", tensors, offsets, snapshot);
  check_divisor("merge_into", divisor);
  check_scale("merge_into", tensors, sum, scale);
  check_float32_factor("merge_into", "divisor * scale", divisor * scale);
  TORCH_CHECK_TYPE(sum.scalar_type() == snapshot.scalar_type(),
                   "merge_into: sum and snapshot must have one dtype, got ", sum.scalar_type(), " and ",
                   snapshot.scalar_type(), ".");
}

} // namespace localsgd_ext
