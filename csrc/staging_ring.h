// Copy mode: reusable staging buffers and the pack -> all_reduce -> unpack ring over them. Bucket i+1
// is packed while bucket i is on the wire; at most `buffers_in_flight` buckets are staged at once, so
// extra memory is that many of each device's largest bucket, whatever the model size.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <optional>
#include <vector>

#include "agreement.h"
#include "averaging_plan.h"

namespace localsgd_ext {

// Copy mode holds at most this many staging buffers per device.
constexpr int64_t kMaxBuffersInFlight = 3;

class StagingRing {
 public:
  explicit StagingRing(int64_t buffers_in_flight);

  // Drops the buffers (a new plan may need other sizes); they are allocated again by allocate().
  void reset(const AveragingPlan& plan);
  // Allocates the slots the next run() takes, so that a failed allocation stops this rank before
  // anything is on the wire.
  void allocate(const AveragingPlan& plan);
  // Packs, all-reduces and unpacks every bucket (division by the group size fused into the unpack
  // unless `use_avg_op`; fp16-scaled buckets packed with `narrow_wire_scale`, see AveragingPlan::scaled).
  // `check`, when set, is still in flight: it is finished after bucket 0's pack and before anything is
  // sent; when it fails, run() returns false having sent nothing.
  bool run(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const AveragingPlan& plan, bool use_avg_op,
           std::optional<AgreementCheck>& check, double narrow_wire_scale);
  // Stream-ordered devices (CUDA): the next run may be on another current stream, so it first waits
  // for the point where the previous run's last unpack had read the buffers.
  void wait_for_previous_run(const AveragingPlan& plan);
  void mark_released(const AveragingPlan& plan);
  int64_t bytes() const;

 private:
  at::Tensor view(size_t slot, const AveragingPlan& plan, const Bucket& bucket);

  int64_t buffers_in_flight_;
  // staging_[slot][device index]: a byte buffer as large as that device's largest bucket, shared by
  // every dtype on the device (viewed as the bucket's wire dtype).
  std::vector<std::vector<at::Tensor>> staging_;
  // Per device index: recorded on the current stream at the end of a run; null on CPU.
  std::vector<std::unique_ptr<c10::Event>> released_;
};

} // namespace localsgd_ext
