// The engine's refusals of tensors, each naming the tensor.
#include "tensor_checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <functional>
#include <map>

#include "storage_checks.h"

namespace localsgd_ext {

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
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, "tensors[", i, "] must be a strided (dense) tensor, got layout ",
                      t.layout(), ".");
    TORCH_CHECK_VALUE(t.device().type() != c10::DeviceType::Meta, "tensors[", i,
                      "] is on the meta device and has no data to average.");
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "tensors[", i,
                     "] must have a floating-point dtype to be averaged, got ", t.scalar_type(), ".");
  }
}

void check_memory(const std::vector<at::Tensor>& tensors, const std::vector<std::string>& names) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, tensor_label(names, i),
                      " has elements that share memory (sizes ", t.sizes(), ", strides ", t.strides(),
                      ", e.g. an expanded view): averaging writes every element, so it cannot be averaged in place. "
                      "Give it memory of its own (e.g. .contiguous()).");
    check_storage_holds(t, [&] { return tensor_label(names, i); });
  }
}

void check_no_shared_memory(const std::vector<at::Tensor>& tensors, const std::vector<std::string>& names,
                            bool zero_copy) {
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
  // Per dtype, the extent reaching furthest among those of the current storage seen so far: one that
  // reaches past the next extent's start overlaps it.
  std::map<c10::ScalarType, const Extent*> furthest;
  for (size_t k = 0; k < extents.size(); ++k) {
    const Extent& current = extents[k];
    if (k > 0 && extents[k - 1].storage != current.storage) {
      furthest.clear();
    }
    const c10::ScalarType dtype = tensors[current.index].scalar_type();
    for (const auto& [other_dtype, previous] : furthest) {
      if (previous->end <= current.begin) {
        continue;
      }
      const size_t a = std::min(previous->index, current.index), b = std::max(previous->index, current.index);
      TORCH_CHECK_VALUE(!zero_copy, "zero_copy cannot flatten tensors that share memory: tensors[", a, "] and tensors[",
                        b,
                        "] overlap in one storage, and flattening would untie them. Average them without zero_copy.");
      // Copy mode averages overlapping tensors of one dtype correctly (both slots get the same mean);
      // under two dtypes the same bytes would be averaged twice, under two meanings.
      TORCH_CHECK_VALUE(
          other_dtype == dtype, tensor_label(names, a), " (", tensors[a].scalar_type(), ") and ",
          tensor_label(names, b), " (", tensors[b].scalar_type(),
          ") share memory under two dtypes (one views the other's bytes, e.g. through "
          ".view(dtype)): averaging both would average the same bytes twice, under two meanings, and leave "
          "both wrong. Average only one of them.");
    }
    const auto found = furthest.find(dtype);
    if (found == furthest.end() || found->second->end < current.end) {
      furthest[dtype] = &current;
    }
  }
}

} // namespace localsgd_ext
