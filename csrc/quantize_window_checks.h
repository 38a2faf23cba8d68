// Argument checks of the quantized wire's window ops, quantize_tensors_change and apply_quantized_mean_to,
// shared by the CPU kernels and the generic path (any device): the tensors of a flat layout, and outputs
// that share no memory with the inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pack_common.h"
#include "quantize_checks.h"
#include "storage_checks.h"

namespace localsgd_ext {

// The tensors a window op reads or writes: float32, on the anchor's device, in slots of their own; any of
// them may lie outside the window (that one is not touched).
inline void check_window_tensors(const char* op, at::TensorList tensors, at::IntArrayRef offsets, int64_t start,
                                 const at::Tensor& anchor) {
  TORCH_CHECK_VALUE(tensors.size() == offsets.size(), op, ": tensors and offsets must have the same length, got ",
                    tensors.size(), " tensors and ", offsets.size(), " offsets.");
  TORCH_CHECK_VALUE(start >= 0, op, ": start must be at least 0, got ", start, ".");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined() && t.layout() == at::kStrided, op, ": tensors[", i, "] must be a strided tensor.");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": tensors[", i, "] must be float32, got ", t.scalar_type(),
                     ".");
    TORCH_CHECK_VALUE(t.device() == anchor.device(), op, ": tensors[", i, "] is on ", t.device(), " but anchor is on ",
                      anchor.device(), ".");
    TORCH_CHECK_VALUE(offsets[i] >= 0, op, ": offsets[", i, "] must be at least 0, got ", offsets[i], ".");
    check_storage_holds(t, [&] { return std::string(op) + ": tensors[" + std::to_string(i) + "]"; });
  }
  check_disjoint_slots(op, tensors, offsets);
}

// The bytes from a tensor's first element to one past its last (for a strided view, everything between):
// empty for an empty tensor.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) {
    return {0, 0};
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last_reachable_element(t) + 1) * t.element_size())};
}

inline bool spans_overlap(const std::pair<uintptr_t, uintptr_t>& a, const std::pair<uintptr_t, uintptr_t>& b) {
  return a.first < b.second && b.first < a.second;
}

// What quantize_tensors_change writes must share memory neither with what it reads (the anchor, the
// tensors) nor with its other outputs: the results would be garbage on any device, and the CPU kernel
// reads and writes through restrict pointers.
inline void check_outputs_apart(const char* op, at::TensorList tensors, const at::Tensor& anchor,
                                const std::vector<std::pair<const char*, const at::Tensor*>>& outputs) {
  std::vector<std::pair<uintptr_t, uintptr_t>> tensor_spans;
  tensor_spans.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    tensor_spans.push_back(byte_span(t));
  }
  const auto anchor_span = byte_span(anchor);
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto [name, output] = outputs[i];
    const auto written = byte_span(*output);
    TORCH_CHECK_VALUE(!spans_overlap(written, anchor_span), op, ": ", name,
                      " must not share memory with anchor, got overlapping tensors.");
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(!spans_overlap(written, byte_span(*outputs[j].second)), op, ": ", name,
                        " must not share memory with ", outputs[j].first, ", got overlapping tensors.");
    }
    for (size_t t = 0; t < tensor_spans.size(); ++t) {
      TORCH_CHECK_VALUE(!spans_overlap(written, tensor_spans[t]), op, ": ", name,
                        " must not share memory with tensors[", t, "], got overlapping tensors.");
    }
  }
}

inline void check_quantize_tensors_change_arguments(at::TensorList tensors, at::IntArrayRef offsets, int64_t start,
                                                    const at::Tensor& anchor, const std::optional<at::Tensor>& residual,
                                                    int64_t block_size, const at::Tensor& codes,
                                                    const at::Tensor& scales,
                                                    const std::optional<at::Tensor>& snapshot) {
  constexpr const char* op = "quantize_tensors_change";
  check_block_size(op, block_size);
  check_flat_float32(op, "anchor", anchor, anchor);
  TORCH_CHECK_VALUE(anchor.numel() % block_size == 0, op,
                    ": the window's length must be a multiple of block_size (pad it), got ", anchor.numel(),
                    " elements and block_size ", block_size, ".");
  for (const auto& [name, buffer] : {std::pair{"residual", &residual}, std::pair{"snapshot", &snapshot}}) {
    if (*buffer) {
      check_flat_float32(op, name, **buffer, anchor);
    }
  }
  check_codes_out(op, codes, scales, anchor.numel(), block_size, anchor.device(), "codes", "scales");
  check_window_tensors(op, tensors, offsets, start, anchor);
  std::vector<std::pair<const char*, const at::Tensor*>> outputs = {{"codes", &codes}, {"scales", &scales}};
  if (residual) {
    outputs.emplace_back("residual", &*residual);
  }
  if (snapshot) {
    outputs.emplace_back("snapshot", &*snapshot);
  }
  check_outputs_apart(op, tensors, anchor, outputs);
}

inline void check_apply_quantized_mean_to_arguments(const at::Tensor& codes, const at::Tensor& scales,
                                                    int64_t block_size, const at::Tensor& anchor,
                                                    at::IntArrayRef offsets, int64_t start, at::TensorList tensors) {
  check_apply_quantized_mean_arguments(codes, scales, block_size, anchor);
  check_window_tensors("apply_quantized_mean_to", tensors, offsets, start, anchor);
}

} // namespace localsgd_ext
