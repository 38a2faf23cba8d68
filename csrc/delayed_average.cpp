// The overlapped sync's buffers, its started all_reduces, and the fused merge (see delayed_average.h).
#include "delayed_average.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "interruptible_wait.h"
#include "op_handles.h"

namespace localsgd_ext {

void DelayedAverage::reset() {
  TORCH_CHECK(in_flight_.empty(), "DelayedAverage::reset with buckets still on the wire.");
  buffers_.clear();
}

void DelayedAverage::start(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const AveragingPlan& plan,
                           bool use_avg_op, double narrow_wire_scale) {
  TORCH_CHECK(in_flight_.empty(), "a delayed average is already in flight: finish it before starting another.");
  if (buffers_.empty()) { // first start() since the plan was built (reset())
    for (const Bucket& bucket : plan.buckets) {
      // Zeroed once: padding between tensors is never written by pack, so it averages zeros forever.
      const auto options = at::TensorOptions().dtype(plan.group_of(bucket).wire_dtype).device(plan.device_of(bucket));
      buffers_.push_back({at::zeros({bucket.numel}, options), at::zeros({bucket.numel}, options)});
    }
  }
  divisor_ = use_avg_op ? 1.0 : static_cast<double>(group->getSize());
  narrow_wire_scale_ = narrow_wire_scale;
  c10d::AllreduceOptions options;
  options.reduceOp = use_avg_op ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    if (plan.buckets[b].numel == 0) {
      continue;
    }
    BucketBuffers& buffers = buffers_[b];
    pack_op().call(plan.members[b].tensors, plan.members[b].offsets, buffers.snapshot, scale_of(plan, b));
    buffers.sum.copy_(buffers.snapshot);
    std::vector<at::Tensor> wire{buffers.sum};
    in_flight_.push_back({b, group->allreduce(wire, options)});
  }
}

void DelayedAverage::finish(const AveragingPlan& plan) {
  for (const InFlight& done : in_flight_) {
    wait_interruptibly(*done.work, buffers_[done.bucket].sum.is_cpu());
  }
  for (const InFlight& done : in_flight_) {
    const BucketTensors& members = plan.members[done.bucket];
    merge_op().call(buffers_[done.bucket].sum, buffers_[done.bucket].snapshot, members.offsets, divisor_,
                    members.tensors, scale_of(plan, done.bucket));
    bump_versions(members.tensors);
  }
  in_flight_.clear();
}

namespace {

// A bucket's targets, in the order its members list the tensors.
std::vector<at::Tensor> bucket_targets(const Bucket& bucket, const std::vector<at::Tensor>& targets) {
  std::vector<at::Tensor> picked;
  picked.reserve(bucket.tensor_indices.size());
  for (int64_t index : bucket.tensor_indices) {
    picked.push_back(targets[static_cast<size_t>(index)]);
  }
  return picked;
}

} // namespace

void DelayedAverage::finish_into_mean(const AveragingPlan& plan, const std::vector<at::Tensor>& targets) {
  TORCH_CHECK(!awaiting_merge_, "the overlapped average's mean was taken already: merge it first.");
  for (const InFlight& done : in_flight_) {
    wait_interruptibly(*done.work, buffers_[done.bucket].sum.is_cpu());
  }
  for (const InFlight& done : in_flight_) {
    const BucketTensors& members = plan.members[done.bucket];
    unpack_op().call(buffers_[done.bucket].sum, members.offsets, divisor_ * scale_of(plan, done.bucket),
                     bucket_targets(plan.buckets[done.bucket], targets));
  }
  awaiting_merge_ = true;
}

void DelayedAverage::merge_targets(const AveragingPlan& plan, const std::vector<at::Tensor>& targets) {
  TORCH_CHECK(awaiting_merge_, "merge_targets() without finish_into_mean() first.");
  for (const InFlight& done : in_flight_) {
    const BucketTensors& members = plan.members[done.bucket];
    // The targets take the sum buffer's place (divisor 1): t + (target - snapshot), in the wire's dtype,
    // scaled as the snapshot was.
    const double scale = scale_of(plan, done.bucket);
    pack_op().call(bucket_targets(plan.buckets[done.bucket], targets), members.offsets, buffers_[done.bucket].sum,
                   scale);
    merge_op().call(buffers_[done.bucket].sum, buffers_[done.bucket].snapshot, members.offsets, 1.0, members.tensors,
                    scale);
    bump_versions(members.tensors);
  }
  in_flight_.clear();
  awaiting_merge_ = false;
}

void DelayedAverage::drain() {
  for (const InFlight& done : in_flight_) {
    try {
      done.work->wait();
    } catch (const std::exception&) {
      // Called while another error propagates: a collective that failed too is the lesser news.
    }
  }
  in_flight_.clear();
  awaiting_merge_ = false;
}

int64_t DelayedAverage::bytes() const {
  int64_t total = 0;
  for (const BucketBuffers& buffers : buffers_) {
    total += 2 * buffers.sum.numel() * static_cast<int64_t>(buffers.sum.element_size());
  }
  return total;
}

} // namespace localsgd_ext
