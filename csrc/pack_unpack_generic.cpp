#include "pack_unpack_generic.h"

#include <ATen/ops/div.h>
#include <torch/library.h>

#include "pack_common.h"

namespace localsgd_ext {
void pack_into_generic(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer) {
  check_pack_arguments("pack_into", tensors, offsets, buffer);
  for (size_t i = 0; i < tensors.size(); ++i) {
    slot_in_buffer(buffer, offsets[i], tensors[i]).copy_(tensors[i]);
  }
}

void unpack_from_generic(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors) {
  check_pack_arguments("unpack_from", tensors, offsets, buffer);
  check_divisor("unpack_from", divisor);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor slot = slot_in_buffer(buffer, offsets[i], tensors[i]);
    // const_cast: the schema declares these tensors mutable (Tensor(a!)[]).
    auto& destination = const_cast<at::Tensor&>(tensors[i]);
    // at::div, not a multiply: rounds exactly as `tensor / divisor` does on the same device.
    destination.copy_(divisor == 1.0 ? slot : at::div(slot, divisor));
  }
}

// Any backend without its own kernel (CPU has one in pack_unpack_cpu.cpp) falls back to these.
TORCH_LIBRARY_IMPL(localsgd_ext, CompositeExplicitAutograd, m) {
  m.impl("pack_into", &pack_into_generic);
  m.impl("unpack_from", &unpack_from_generic);
}

} // namespace localsgd_ext
