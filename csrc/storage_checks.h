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
  const at::IntArrayRef sizes = t.sizes();
  const at::IntArrayRef strides = t.strides();
  int64_t last = 0;
  for (size_t d = 0; d < sizes.size(); ++d) {
    last += (sizes[d] - 1) * std::abs(strides[d]);
  }
  return last;
}

// What names a tensor in an error: a string, or a callable that makes one. The engine checks every tensor
// at every sync, so a label built from a name and an index is made only when the check fails.
inline const char* label_text(const char* label) { return label; }
inline const std::string& label_text(const std::string& label) { return label; }
template <typename MakeLabel>
inline auto label_text(const MakeLabel& make_label) -> decltype(make_label()) {
  return make_label();
}

// `label` names the tensor in the error ("merge_into: tensors[2]", "tensors[0] ('fc.weight')").
template <typename Label>
inline void check_storage_holds(const at::Tensor& t, const Label& label) {
  if (t.numel() == 0) {
    return;
  }
  const int64_t needed = (t.storage_offset() + last_reachable_element(t) + 1) * static_cast<int64_t>(t.element_size());
  const int64_t held = t.has_storage() ? static_cast<int64_t>(t.storage().nbytes()) : 0;
  TORCH_CHECK_VALUE(held >= needed, label_text(label), " needs ", needed, " bytes of storage but its storage holds ",
                    held,
                    ": its memory was freed or shrunk (e.g. by untyped_storage().resize_(0), as FSDP does to sharded "
                    "parameters). Restore it before averaging.");
}

} // namespace localsgd_ext
