#include "averager.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <deque>
#include <utility>

namespace localsgd_ext {
namespace {

using PackFn = void(at::TensorList, at::IntArrayRef, const at::Tensor&);
using UnpackFn = void(const at::Tensor&, at::IntArrayRef, double, at::TensorList);

const c10::TypedOperatorHandle<PackFn>& pack_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("localsgd_ext::pack_into", "").typed<PackFn>();
  return op;
}

const c10::TypedOperatorHandle<UnpackFn>& unpack_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("localsgd_ext::unpack_from", "").typed<UnpackFn>();
  return op;
}

c10::Stream current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device);
}

} // namespace

BucketedAverager::BucketedAverager(
    std::vector<at::Tensor> tensors,
    int64_t bucket_cap_bytes,
    int64_t buffers_in_flight)
    : tensors_(std::move(tensors)),
      bucket_cap_bytes_(bucket_cap_bytes),
      buffers_in_flight_(buffers_in_flight) {
  TORCH_CHECK_VALUE(
      bucket_cap_bytes_ > 0, "bucket_cap_bytes must be positive, got ", bucket_cap_bytes_, ".");
  TORCH_CHECK_VALUE(
      buffers_in_flight_ >= 1, "buffers_in_flight must be at least 1, got ", buffers_in_flight_, ".");
  build_plan();
}

void BucketedAverager::check_tensors() const {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const at::Tensor& t = tensors_[i];
    TORCH_CHECK_VALUE(t.defined(), "tensors[", i, "] is undefined.");
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

void BucketedAverager::build_plan() {
  // Checked at every (re)plan: a tensor re-pointed since (`param.data = ...`) may no longer qualify.
  check_tensors();
  planned_inputs_.clear();
  group_dtypes_.clear();
  group_device_index_.clear();
  devices_.clear();
  staging_.clear();
  for (const at::Tensor& t : tensors_) {
    size_t group = 0;
    while (group < group_dtypes_.size() &&
           !(group_dtypes_[group] == t.scalar_type() && devices_[group_device_index_[group]] == t.device())) {
      ++group;
    }
    if (group == group_dtypes_.size()) {
      auto device = std::find(devices_.begin(), devices_.end(), t.device());
      if (device == devices_.end()) {
        device = devices_.insert(devices_.end(), t.device());
      }
      group_dtypes_.push_back(t.scalar_type());
      group_device_index_.push_back(static_cast<size_t>(device - devices_.begin()));
    }
    planned_inputs_.push_back(
        {static_cast<int64_t>(group), t.numel(), static_cast<int64_t>(t.element_size())});
  }
  buckets_ = plan_buckets(planned_inputs_, bucket_cap_bytes_, kBucketAlignmentBytes);
  bucket_tensors_.clear();
  bucket_tensors_.reserve(buckets_.size());
  for (const Bucket& bucket : buckets_) {
    BucketTensors members;
    for (int64_t index : bucket.tensor_indices) {
      members.tensors.push_back(tensors_[index]);
    }
    members.offsets = bucket.offsets;
    bucket_tensors_.push_back(std::move(members));
  }
  staging_.assign(buffers_in_flight_, std::vector<at::Tensor>(devices_.size()));
  staging_released_.clear();
  staging_released_.resize(devices_.size());
}

void BucketedAverager::wait_for_previous_average() {
  for (size_t d = 0; d < devices_.size(); ++d) {
    if (staging_released_[d]) {
      staging_released_[d]->block(current_stream(devices_[d]));
    }
  }
}

void BucketedAverager::mark_staging_released() {
  for (size_t d = 0; d < devices_.size(); ++d) {
    if (devices_[d].is_cpu()) {
      continue;  // CPU work is done when average() returns
    }
    if (!staging_released_[d]) {
      staging_released_[d] = std::make_unique<c10::Event>(devices_[d].type());
    }
    staging_released_[d]->record(current_stream(devices_[d]));
  }
}

int64_t BucketedAverager::layout_fingerprint() const {
  // FNV-1a over (count, then dtype, rank and sizes of each tensor).
  uint64_t hash = 1469598103934665603ULL;
  const auto mix = [&hash](uint64_t value) {
    for (int byte = 0; byte < 8; ++byte) {
      hash ^= (value >> (8 * byte)) & 0xFF;
      hash *= 1099511628211ULL;
    }
  };
  mix(tensors_.size());
  for (const at::Tensor& t : tensors_) {
    mix(static_cast<uint64_t>(t.scalar_type()));
    mix(static_cast<uint64_t>(t.dim()));
    for (int64_t size : t.sizes()) {
      mix(static_cast<uint64_t>(size));
    }
  }
  // 62 bits: the value and its negation both fit in int64, so one MAX all_reduce gives max and min.
  return static_cast<int64_t>(hash >> 2);
}

int64_t BucketedAverager::first_nonfinite() const {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const at::Tensor& t = tensors_[i];
    if (t.numel() > 0 && !at::isfinite(t).all().item<bool>()) {
      return static_cast<int64_t>(i);
    }
  }
  return -1;
}

bool BucketedAverager::plan_is_stale() const {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const at::Tensor& t = tensors_[i];
    const PlanInput& planned = planned_inputs_[i];
    const size_t group = static_cast<size_t>(planned.group);
    if (t.numel() != planned.numel || t.scalar_type() != group_dtypes_[group] ||
        t.device() != devices_[group_device_index_[group]]) {
      return true;
    }
  }
  return false;
}

at::Tensor BucketedAverager::staging_view(size_t slot, const Bucket& bucket) {
  const size_t group = static_cast<size_t>(bucket.group);
  const size_t device = group_device_index_[group];
  at::Tensor& bytes = staging_[slot][device];
  if (!bytes.defined()) {
    int64_t largest = 0;
    for (const Bucket& b : buckets_) {
      if (group_device_index_[static_cast<size_t>(b.group)] == device) {
        largest = std::max(largest, b.nbytes());
      }
    }
    // Zeroed once: padding between tensors is never written by pack, so it averages zeros forever.
    bytes = at::zeros({largest}, at::TensorOptions().dtype(at::kByte).device(devices_[device]));
  }
  return bytes.narrow(0, 0, bucket.nbytes()).view(group_dtypes_[group]);
}

int64_t BucketedAverager::staging_bytes() const {
  int64_t total = 0;
  for (const auto& slot : staging_) {
    for (const at::Tensor& bytes : slot) {
      total += bytes.defined() ? bytes.numel() : 0;
    }
  }
  return total;
}

void BucketedAverager::average(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  wait_for_previous_average();
  if (plan_is_stale()) {
    build_plan();
  }
  // Parameters are leaves that require grad; the copies must bypass autograd like an optimizer's
  // torch.no_grad() update does. Their version counters are bumped by hand below.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const double divisor = use_avg_op ? 1.0 : static_cast<double>(group->getSize());
  c10d::AllreduceOptions options;
  options.reduceOp = use_avg_op ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;

  struct InFlight {
    size_t bucket;
    at::Tensor buffer;
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::deque<InFlight> in_flight;
  const auto finish_oldest = [&] {
    InFlight done = std::move(in_flight.front());
    in_flight.pop_front();
    done.work->wait();
    const BucketTensors& members = bucket_tensors_[done.bucket];
    unpack_op().call(done.buffer, members.offsets, divisor, members.tensors);
    for (const at::Tensor& t : members.tensors) {
      if (!t.is_inference()) {
        t.unsafeGetTensorImpl()->bump_version();
      }
    }
  };

  size_t next_slot = 0;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (buckets_[b].numel == 0) {
      continue;
    }
    if (in_flight.size() == static_cast<size_t>(buffers_in_flight_)) {
      finish_oldest();
    }
    // Slots are used round-robin and finished in order, so the slot taken here is free.
    at::Tensor buffer = staging_view(next_slot, buckets_[b]);
    next_slot = (next_slot + 1) % static_cast<size_t>(buffers_in_flight_);
    const BucketTensors& members = bucket_tensors_[b];
    pack_op().call(members.tensors, members.offsets, buffer);
    std::vector<at::Tensor> wire{buffer};
    in_flight.push_back({b, buffer, group->allreduce(wire, options)});
  }
  while (!in_flight.empty()) {
    finish_oldest();
  }
  mark_staging_released();
}

} // namespace localsgd_ext
