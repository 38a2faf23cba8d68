// Zero-copy mode: the tensors live as views of one persistent flat buffer per bucket (rebound like
// `param.data = view`, so they stay the same objects), and a sync is only an in-place all_reduce of
// each buffer: no pack, no unpack, no staging.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <vector>

#include "averaging_plan.h"

namespace localsgd_ext {

class FlatStorage {
 public:
  // Copies every bucket's tensors into a fresh zeroed buffer and rebinds them as views of it. Each old
  // storage is freed as soon as nothing else holds it, so the peak is about one bucket above the model.
  // The caller has refused tensors that share memory with each other (check_no_shared_memory).
  void flatten(const AveragingPlan& plan);
  // True when some tensor is no longer the view flatten() made of it (`param.data = ...`, `.to(...)`).
  bool broken(const AveragingPlan& plan) const;
  int64_t bytes() const;
  // One in-place all_reduce per buffer, all in flight at once; with SUM, one division pass after.
  void all_reduce(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op, const AveragingPlan& plan);

 private:
  std::vector<at::Tensor> buffers_; // per bucket
};

} // namespace localsgd_ext
