// The ATen-op pack/unpack every backend without its own kernels falls back to.
#include "pack_unpack_generic.h"

#include <torch/library.h>

#include "pack_common.h"

namespace localsgd_ext {

void pack_into_generic(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, double scale) {
  check_pack_arguments("pack_into", tensors, offsets, buffer);
  check_disjoint_slots("pack_into", tensors, offsets);
  check_scale("pack_into", tensors, buffer, scale);
  for (size_t i = 0; i < tensors.size(); ++i) {
    pack_one_with_aten(tensors[i], offsets[i], buffer, scale);
  }
}

void unpack_from_generic(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors) {
  check_pack_arguments("unpack_from", tensors, offsets, buffer);
  check_divisor("unpack_from", divisor);
  for (size_t i = 0; i < tensors.size(); ++i) {
    unpack_one_with_aten(buffer, offsets[i], divisor, tensors[i]);
  }
}

void merge_into_generic(const at::Tensor& sum, const at::Tensor& snapshot, at::IntArrayRef offsets, double divisor,
                        at::TensorList tensors, double scale) {
  check_merge_arguments(sum, snapshot, offsets, divisor, tensors, scale);
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() > 0) {
      merge_one_with_aten(sum, snapshot, offsets[i], divisor, tensors[i], scale);
    }
  }
}

// Any backend without its own kernel (CPU has one in pack_unpack_cpu.cpp) falls back to these.
TORCH_LIBRARY_IMPL(localsgd_ext, CompositeExplicitAutograd, m) {
  m.impl("pack_into", &pack_into_generic);
  m.impl("unpack_from", &unpack_from_generic);
  m.impl("merge_into", &merge_into_generic);
}

} // namespace localsgd_ext
