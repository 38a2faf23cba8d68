// The window ops through ATen (see quantize_wire_generic.h): the window is gathered into a flat tensor
// (the snapshot when one is asked for), quantized by the device's quantize_change; the anchor moved by the
// device's apply_quantized_mean and copied into the tensors' stretches of the window.
#include "quantize_wire_generic.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "flat_window.h"
#include "op_handles.h"
#include "quantize_window_checks.h"

namespace localsgd_ext {

using cpu::window_overlap;

void quantize_tensors_change_generic(at::TensorList tensors, at::IntArrayRef offsets, int64_t start,
                                     const at::Tensor& anchor, const std::optional<at::Tensor>& residual,
                                     int64_t block_size, const at::Tensor& codes, const at::Tensor& scales,
                                     const std::optional<at::Tensor>& snapshot) {
  check_quantize_tensors_change_arguments(tensors, offsets, start, anchor, residual, block_size, codes, scales,
                                          snapshot);
  const int64_t length = anchor.numel();
  at::Tensor window = snapshot ? *snapshot : at::empty({length}, anchor.options());
  window.zero_();
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (const auto o = window_overlap(offsets[i], tensors[i].numel(), start, length)) {
      window.narrow(0, o->position, o->count).copy_(tensors[i].reshape(-1).narrow(0, o->first, o->count));
    }
  }
  quantize_change_op().call(window, anchor, residual, block_size, codes, scales);
}

void apply_quantized_mean_to_generic(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                     const at::Tensor& anchor, at::IntArrayRef offsets, int64_t start,
                                     at::TensorList tensors) {
  check_apply_quantized_mean_to_arguments(codes, scales, block_size, anchor, offsets, start, tensors);
  apply_quantized_mean_op().call(codes, scales, block_size, anchor);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto o = window_overlap(offsets[i], tensors[i].numel(), start, anchor.numel());
    if (!o) {
      continue;
    }
    // const_cast: the schema declares the tensors mutable (Tensor(b!)[]). A contiguous tensor is written
    // through a flat view of itself; another through a contiguous copy, written back whole.
    auto& tensor = const_cast<at::Tensor&>(tensors[i]);
    at::Tensor flat = tensor.contiguous().view(-1);
    flat.narrow(0, o->first, o->count).copy_(anchor.narrow(0, o->position, o->count));
    if (!tensor.is_contiguous()) {
      tensor.copy_(flat.view(tensor.sizes()));
    }
  }
}

TORCH_LIBRARY_IMPL(localsgd_ext, CompositeExplicitAutograd, m) {
  m.impl("quantize_tensors_change", &quantize_tensors_change_generic);
  m.impl("apply_quantized_mean_to", &apply_quantized_mean_to_generic);
}

} // namespace localsgd_ext
