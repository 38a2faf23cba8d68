// Overlapped sync (LocalSGD's sync_delay): at a sync step every bucket is packed into a snapshot
// buffer and a copy of it goes on the wire at once, without waiting; steps later the sums come back
// and each tensor takes the averaged correction, t += mean(snapshot) - snapshot, in one fused pass
// (the merge_into operator). Training runs on while the buckets are on the wire.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <vector>

#include "averaging_plan.h"

namespace localsgd_ext {

class DelayedAverage {
 public:
  // Drops the buffers (a new plan may need other sizes).
  void reset();
  // Packs every bucket into its snapshot and starts one all_reduce per bucket on a copy of it. The
  // buckets the plan scales (float32 on an fp16 wire) are packed times `narrow_wire_scale`, agreed by
  // every rank in the check before, and every later step divides it out again.
  void start(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const AveragingPlan& plan, bool use_avg_op,
             double narrow_wire_scale);
  bool pending() const { return !in_flight_.empty(); }
  // Waits for every bucket (interruptibly on CPU) and merges the correction into the tensors.
  void finish(const AveragingPlan& plan);
  // The outer step's split of finish(): waits for every bucket and writes mean(snapshot) into `targets`
  // (tensors laid out as the plan's, e.g. fresh ones shaped like them)...
  void finish_into_mean(const AveragingPlan& plan, const std::vector<at::Tensor>& targets);
  // ...then, once the caller has replaced those means (by its outer step's result), merges
  // t += target - snapshot into the tensors.
  void merge_targets(const AveragingPlan& plan, const std::vector<at::Tensor>& targets);
  bool awaiting_merge() const { return awaiting_merge_; }
  // Waits for every bucket without merging: nothing is left on the wire (after an exception).
  void drain();
  int64_t bytes() const;

 private:
  double scale_of(const AveragingPlan& plan, size_t bucket) const {
    return plan.scaled(plan.buckets[bucket]) ? narrow_wire_scale_ : 1.0;
  }

  struct BucketBuffers {
    at::Tensor snapshot; // the bucket as packed at the sync step
    at::Tensor sum;      // its copy, all-reduced in place
  };
  struct InFlight {
    size_t bucket;
    c10::intrusive_ptr<c10d::Work> work;
  };

  std::vector<BucketBuffers> buffers_; // per bucket, allocated at the first start() after a reset()
  std::vector<InFlight> in_flight_;
  double divisor_ = 1.0;
  double narrow_wire_scale_ = 1.0;
  bool awaiting_merge_ = false; // finish_into_mean() done, merge_targets() not yet
};

} // namespace localsgd_ext
