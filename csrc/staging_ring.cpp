// Copy mode's staging buffers and the pack -> all_reduce -> unpack ring.
#include "staging_ring.h"

#include <ATen/ops/zeros.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <deque>

#include "interruptible_wait.h"
#include "op_handles.h"

namespace localsgd_ext {
namespace {

c10::Stream current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device);
}

} // namespace

StagingRing::StagingRing(int64_t buffers_in_flight) : buffers_in_flight_(buffers_in_flight) {
  TORCH_CHECK_VALUE(buffers_in_flight_ >= 1 && buffers_in_flight_ <= kMaxBuffersInFlight,
                    "buffers_in_flight must be between 1 and ", kMaxBuffersInFlight, ", got ", buffers_in_flight_, ".");
}

void StagingRing::reset(const AveragingPlan& plan) {
  staging_.assign(buffers_in_flight_, std::vector<at::Tensor>(plan.devices.size()));
  released_.clear();
  released_.resize(plan.devices.size());
}

void StagingRing::allocate(const AveragingPlan& plan) {
  // Slots are taken round-robin over the non-empty buckets, as run() takes them.
  size_t slot = 0;
  for (const Bucket& bucket : plan.buckets) {
    if (bucket.numel > 0) {
      view(slot, plan, bucket);
      slot = (slot + 1) % static_cast<size_t>(buffers_in_flight_);
    }
  }
}

at::Tensor StagingRing::view(size_t slot, const AveragingPlan& plan, const Bucket& bucket) {
  const size_t device = plan.group_of(bucket).device;
  at::Tensor& bytes = staging_[slot][device];
  if (!bytes.defined()) {
    int64_t largest = 0;
    for (const Bucket& b : plan.buckets) {
      if (plan.group_of(b).device == device) {
        largest = std::max(largest, b.nbytes());
      }
    }
    // Zeroed once: padding between tensors is never written by pack, so it averages zeros forever.
    bytes = at::zeros({largest}, at::TensorOptions().dtype(at::kByte).device(plan.devices[device]));
  }
  return bytes.narrow(0, 0, bucket.nbytes()).view(plan.group_of(bucket).wire_dtype);
}

bool StagingRing::run(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const AveragingPlan& plan, bool use_avg_op,
                      std::optional<AgreementCheck>& check, double narrow_wire_scale) {
  const double divisor = use_avg_op ? 1.0 : static_cast<double>(group->getSize());
  c10d::AllreduceOptions options;
  options.reduceOp = use_avg_op ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
  const auto scale_of = [&](const Bucket& bucket) { return plan.scaled(bucket) ? narrow_wire_scale : 1.0; };

  struct InFlight {
    size_t bucket;
    at::Tensor buffer;
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::deque<InFlight> in_flight;
  const auto finish_oldest = [&] {
    InFlight done = std::move(in_flight.front());
    in_flight.pop_front();
    wait_interruptibly(*done.work, done.buffer.is_cpu());
    const BucketTensors& members = plan.members[done.bucket];
    unpack_op().call(done.buffer, members.offsets, divisor * scale_of(plan.buckets[done.bucket]), members.tensors);
    bump_versions(members.tensors);
  };

  size_t next_slot = 0;
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    if (plan.buckets[b].numel == 0) {
      continue;
    }
    if (in_flight.size() == static_cast<size_t>(buffers_in_flight_)) {
      finish_oldest();
    }
    // Slots are used round-robin and finished in order, so the slot taken here is free.
    at::Tensor buffer = view(next_slot, plan, plan.buckets[b]);
    next_slot = (next_slot + 1) % static_cast<size_t>(buffers_in_flight_);
    const BucketTensors& members = plan.members[b];
    pack_op().call(members.tensors, members.offsets, buffer, scale_of(plan.buckets[b]));
    // The first pack overlaps the agreement check; nothing is sent before it passed.
    if (check && !check->finish().holds()) {
      return false;
    }
    check.reset();
    std::vector<at::Tensor> wire{buffer};
    in_flight.push_back({b, buffer, group->allreduce(wire, options)});
  }
  // Still pending when no bucket had elements.
  if (check && !check->finish().holds()) {
    return false;
  }
  while (!in_flight.empty()) {
    finish_oldest();
  }
  return true;
}

void StagingRing::wait_for_previous_run(const AveragingPlan& plan) {
  for (size_t d = 0; d < plan.devices.size() && d < released_.size(); ++d) {
    if (released_[d]) {
      released_[d]->block(current_stream(plan.devices[d]));
    }
  }
}

void StagingRing::mark_released(const AveragingPlan& plan) {
  for (size_t d = 0; d < plan.devices.size(); ++d) {
    if (plan.devices[d].is_cpu()) {
      continue; // CPU work is done when run() returns
    }
    if (!released_[d]) {
      released_[d] = std::make_unique<c10::Event>(plan.devices[d].type());
    }
    released_[d]->record(current_stream(plan.devices[d]));
  }
}

int64_t StagingRing::bytes() const {
  int64_t total = 0;
  for (const auto& slot : staging_) {
    for (const at::Tensor& bytes : slot) {
      total += bytes.defined() ? bytes.numel() : 0;
    }
  }
  return total;
}

} // namespace localsgd_ext
