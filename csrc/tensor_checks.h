// Refusals of tensors the engine cannot average, each a sentence naming the tensor, raised before any
// memory is read or written.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace localsgd_ext {

// "tensors[3]", or "tensors[3] ('layer.weight')" when names are known.
std::string tensor_label(const std::vector<std::string>& names, size_t index);

// A tensor subclass handled in Python (DTensor, FakeTensor, ...): its operations need the GIL, which the
// engine's collectives release, and it has no storage of its own to pack. `label` names it.
void check_not_python_subclass(const at::Tensor& tensor, const std::string& label);

// Undefined, not dense, on the meta device, or not floating: refused whenever a plan is built.
void check_averageable(const std::vector<at::Tensor>& tensors);

// Elements that share memory (an expanded view: `param.data = t.expand(...)` keeps numel and dtype, so
// no re-plan notices), or storage that no longer holds them (freed, e.g. resize_(0)): checked at every
// plan and every sync, since either can happen between syncs.
void check_memory(const std::vector<at::Tensor>& tensors, const std::vector<std::string>& names);

// Tensors that overlap each other in one storage: zero-copy cannot flatten them apart; copy mode can
// average them only when they share a dtype (the same bytes under two dtypes would be averaged twice).
void check_no_shared_memory(const std::vector<at::Tensor>& tensors, const std::vector<std::string>& names,
                            bool zero_copy);

} // namespace localsgd_ext
