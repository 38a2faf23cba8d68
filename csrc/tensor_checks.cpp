// The engine's refusals of tensors, each naming the tensor.
#include "tensor_checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <functional>

namespace localsgd_ext {
namespace {

// The furthest element a tensor can reach through its strides, in elements past its storage offset.
int64_t last_reachable_element(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * std::abs(t.stride(d));
  }
  return last;
}

} // namespace

std::string tensor_label(const std::vector<std::string>& names, size_t index) {
  std::string text = "tensors[" + std::to_string(index) + "]";
  return names.empty() ? text : text + " ('" + names[index] + "')";
}

void check_not_python_subclass(const at::Tensor& tensor, const std::string& label) {
  TORCH_CHECK_TYPE(
      !tensor.unsafeGetTensorImpl()->is_python_dispatch(), label,
      " is a tensor subclass handled in Python (such as DTensor), which the compiled engine cannot read; pass its "
      "local tensor (DTensor.to_local()).");
}

void check_averageable(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "tensors[", i, "] is undefined.");
    check_not_python_subclass(t, "tensors[" + std::to_string(i) + "]");
    TORCH_CHECK_VALUE(
        t.layout() == at::kStrided,
        "tensors[", i, "] must be a strided (dense) tensor, got layout ", t.layout(), ".");
    TORCH_CHECK_VALUE(
        t.device().type() != c10::DeviceType::Meta,
        "tensors[", i, "] is on the meta device and has no data to average.");
    TORCH_CHECK_TYPE(
        at::isFloatingType(t.scalar_type()),
        "tensors[", i, "] must have a floating-point dtype to be averaged, got ", t.scalar_type(), ".");
  }
}

void check_memory(const std::vector<at::Tensor>& tensors, const std::vector<std::string>& names) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    const int64_t needed =
        (t.storage_offset() + last_reachable_element(t) + 1) * static_cast<int64_t>(t.element_size());
    const int64_t held = t.has_storage() ? static_cast<int64_t>(t.storage().nbytes()) : 0;
    TORCH_CHECK_VALUE(
        at::has_internal_overlap(t) != at::MemOverlap::Yes,
        tensor_label(names, i), " has elements that share memory (sizes ", t.sizes(), ", strides ", t.strides(),
        ", e.g. an expanded view): averaging writes every element, so it cannot be averaged in place. "
        "Give it memory of its own (e.g. .contiguous()).");
    TORCH_CHECK_VALUE(
        held >= needed,
        tensor_label(names, i), " needs ", needed, " bytes of storage but its storage holds ", held,
        ": its memory was freed or shrunk (e.g. by untyped_storage().resize_(0), as FSDP does to sharded "
        "parameters). Restore it before averaging.");
  }
}

void check_no_shared_memory(const std::vector<at::Tensor>& tensors) {
  struct Extent {
    const void* storage;
    int64_t begin;
    int64_t end;
    size_t index;
  };
  std::vector<Extent> extents;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    // The furthest element reachable through the strides bounds what the tensor can touch.
    const int64_t begin = t.storage_offset() * static_cast<int64_t>(t.element_size());
    const int64_t end = begin + (last_reachable_element(t) + 1) * static_cast<int64_t>(t.element_size());
    extents.push_back({t.storage().unsafeGetStorageImpl(), begin, end, i});
  }
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
    return a.storage != b.storage ? std::less<const void*>()(a.storage, b.storage) : a.begin < b.begin;
  });
  for (size_t k = 1; k < extents.size(); ++k) {
    const Extent& previous = extents[k - 1];
    const Extent& current = extents[k];
    TORCH_CHECK_VALUE(
        previous.storage != current.storage || current.begin >= previous.end,
        "zero_copy cannot flatten tensors that share memory: tensors[", std::min(previous.index, current.index),
        "] and tensors[", std::max(previous.index, current.index),
        "] overlap in one storage, and flattening would untie them. Average them without zero_copy.");
  }
}

} // namespace localsgd_ext
