// The storage check every compiled op and the engine share: a tensor whose storage no longer holds the
// elements its sizes and strides reach (freed or shrunk, e.g. by untyped_storage().resize_(0), as FSDP
// does to sharded parameters) is refused before any memory is read or written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace localsgd_ext {

// The furthest element a tensor can reach through its strides, in elements past its storage offset.
inline int64_t last_reachable_element(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * std::abs(t.stride(d));
  }
  return last;
}

// `label` names the tensor in the error ("merge_into: tensors[2]", "tensors[0] ('fc.weight')").
inline void check_storage_holds(const at::Tensor& t, const std::string& label) {
  if (t.numel() == 0) {
    return;
  }
  const int64_t needed = (t.storage_offset() + last_reachable_element(t) + 1) * static_cast<int64_t>(t.element_size());
  const int64_t held = t.has_storage() ? static_cast<int64_t>(t.storage().nbytes()) : 0;
  TORCH_CHECK_VALUE(held >= needed, label, " needs ", needed, " bytes of storage but its storage holds ", held,
                    ": its memory was freed or shrunk (e.g. by untyped_storage().resize_(0), as FSDP does to sharded "
                    "parameters). Restore it before averaging.");
}

} // namespace localsgd_ext
