#include "averager.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <functional>
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
    int64_t buffers_in_flight,
    bool zero_copy,
    std::optional<c10::ScalarType> comm_dtype)
    : tensors_(std::move(tensors)),
      bucket_cap_bytes_(bucket_cap_bytes),
      buffers_in_flight_(buffers_in_flight),
      zero_copy_(zero_copy),
      comm_dtype_(comm_dtype) {
  TORCH_CHECK_VALUE(
      !comm_dtype_ || *comm_dtype_ == at::kBFloat16 || *comm_dtype_ == at::kHalf,
      "comm_dtype must be BFloat16 or Half, got ", *comm_dtype_, ".");
  TORCH_CHECK_VALUE(
      !(comm_dtype_ && zero_copy_),
      "comm_dtype needs copy mode: zero_copy all-reduces the parameters' own memory, in their dtype.");
  TORCH_CHECK_VALUE(
      bucket_cap_bytes_ > 0, "bucket_cap_bytes must be positive, got ", bucket_cap_bytes_, ".");
  TORCH_CHECK_VALUE(
      buffers_in_flight_ >= 1 && buffers_in_flight_ <= kMaxBuffersInFlight,
      "buffers_in_flight must be between 1 and ", kMaxBuffersInFlight, ", got ", buffers_in_flight_, ".");
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
  group_wire_dtypes_.clear();
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
      group_wire_dtypes_.push_back(comm_dtype_ && t.scalar_type() == at::kFloat ? *comm_dtype_ : t.scalar_type());
      group_device_index_.push_back(static_cast<size_t>(device - devices_.begin()));
    }
    planned_inputs_.push_back(
        {static_cast<int64_t>(group), t.numel(),
         static_cast<int64_t>(c10::elementSize(group_wire_dtypes_[group]))});
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
  // Zero-copy mode needs no staging: the flat buffers go on the wire themselves.
  staging_.assign(zero_copy_ ? 0 : buffers_in_flight_, std::vector<at::Tensor>(devices_.size()));
  staging_released_.clear();
  staging_released_.resize(devices_.size());
  if (zero_copy_) {
    check_no_shared_memory();
    flatten();
  }
}

void BucketedAverager::check_no_shared_memory() const {
  struct Extent {
    const void* storage;
    int64_t begin;
    int64_t end;
    size_t index;
  };
  std::vector<Extent> extents;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const at::Tensor& t = tensors_[i];
    if (t.numel() == 0) {
      continue;
    }
    // The furthest element reachable through the strides bounds what the tensor can touch.
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      last += (t.size(d) - 1) * std::abs(t.stride(d));
    }
    const int64_t begin = t.storage_offset() * static_cast<int64_t>(t.element_size());
    extents.push_back(
        {t.storage().unsafeGetStorageImpl(), begin, begin + (last + 1) * static_cast<int64_t>(t.element_size()), i});
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

void BucketedAverager::flatten() {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  flat_buffers_.clear();
  flat_buffers_.reserve(buckets_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const Bucket& bucket = buckets_[b];
    const BucketTensors& members = bucket_tensors_[b];
    const c10::ScalarType dtype = group_dtypes_[static_cast<size_t>(bucket.group)];
    const c10::Device device = devices_[group_device_index_[static_cast<size_t>(bucket.group)]];
    // Zeroed: the padding between tensors is never written, so it averages zeros forever.
    at::Tensor flat = at::zeros({bucket.numel}, at::TensorOptions().dtype(dtype).device(device));
    pack_op().call(members.tensors, members.offsets, flat);
    // Rebinding frees each old storage as soon as nothing else holds it, so the peak is about one
    // bucket above the model, not two models.
    for (size_t k = 0; k < members.tensors.size(); ++k) {
      at::Tensor t = members.tensors[k];
      t.set_data(flat.narrow(0, members.offsets[k], t.numel()).view(t.sizes()));
    }
    flat_buffers_.push_back(std::move(flat));
  }
}

bool BucketedAverager::flat_layout_broken() const {
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const c10::StorageImpl* flat_storage = flat_buffers_[b].storage().unsafeGetStorageImpl();
    const BucketTensors& members = bucket_tensors_[b];
    for (size_t k = 0; k < members.tensors.size(); ++k) {
      const at::Tensor& t = members.tensors[k];
      if (!t.has_storage() || t.storage().unsafeGetStorageImpl() != flat_storage ||
          t.storage_offset() != members.offsets[k] || !t.is_contiguous() ||
          t.scalar_type() != flat_buffers_[b].scalar_type()) {
        return true;
      }
    }
  }
  return false;
}

void BucketedAverager::refresh_plan() {
  if (zero_copy_ ? flat_layout_broken() : plan_is_stale()) {
    build_plan();
  }
}

int64_t BucketedAverager::flat_bytes() const {
  int64_t total = 0;
  for (const at::Tensor& flat : flat_buffers_) {
    total += flat.numel() * static_cast<int64_t>(flat.element_size());
  }
  return total;
}

void BucketedAverager::bump_versions(const std::vector<at::Tensor>& tensors) const {
  for (const at::Tensor& t : tensors) {
    if (!t.is_inference()) {
      t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

c10::intrusive_ptr<c10d::Work> BucketedAverager::start_agreement_check(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    c10::Device status_device,
    bool check_finite,
    at::Tensor& status) {
  const int64_t fingerprint = layout_fingerprint();
  const int64_t any_nonfinite = check_finite && first_nonfinite() >= 0 ? 1 : 0;
  status = at::empty({3}, at::TensorOptions().dtype(at::kLong));
  int64_t* values = status.data_ptr<int64_t>();
  values[0] = fingerprint;
  values[1] = -fingerprint;
  values[2] = any_nonfinite;
  if (!status_device.is_cpu()) {
    status = status.to(status_device);
  }
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::MAX;
  std::vector<at::Tensor> wire{status};
  return group->allreduce(wire, options);
}

bool BucketedAverager::agreement_holds(c10d::Work& work, const at::Tensor& status) {
  work.wait();
  // Every rank reads the same reduced values, so every rank takes the same branch.
  const at::Tensor values = status.is_cpu() ? status : status.to(at::kCPU);
  const int64_t* v = values.data_ptr<int64_t>();
  return v[0] == -v[1] && v[2] == 0;
}

bool BucketedAverager::ranks_agree(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    c10::Device status_device,
    bool check_finite) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  at::Tensor status;
  auto work = start_agreement_check(group, status_device, check_finite, status);
  return agreement_holds(*work, status);
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
  // Ranks with different wire dtypes would send buckets of different sizes.
  mix(comm_dtype_ ? static_cast<uint64_t>(*comm_dtype_) + 1 : 0);
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
  return bytes.narrow(0, 0, bucket.nbytes()).view(group_wire_dtypes_[group]);
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

void BucketedAverager::average_zero_copy(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op) {
  c10d::AllreduceOptions options;
  options.reduceOp = use_avg_op ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
  // Nothing to overlap: every flat buffer goes on the wire at once, in place.
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  works.reserve(flat_buffers_.size());
  for (const at::Tensor& flat : flat_buffers_) {
    if (flat.numel() > 0) {
      std::vector<at::Tensor> wire{flat};
      works.push_back(group->allreduce(wire, options));
    }
  }
  for (const auto& work : works) {
    work->wait();
  }
  if (!use_avg_op) {
    for (at::Tensor& flat : flat_buffers_) {
      flat.div_(static_cast<double>(group->getSize()));
    }
  }
  for (const BucketTensors& members : bucket_tensors_) {
    bump_versions(members.tensors);
  }
}

bool BucketedAverager::average(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    bool use_avg_op,
    c10::Device status_device,
    bool check_finite) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  wait_for_previous_average();
  refresh_plan();
  // Parameters are leaves that require grad; the copies must bypass autograd like an optimizer's
  // torch.no_grad() update does. Their version counters are bumped by hand.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  at::Tensor status;
  auto check = start_agreement_check(group, status_device, check_finite, status);
  if (zero_copy_) {
    if (!agreement_holds(*check, status)) {
      return false;
    }
    average_zero_copy(group, use_avg_op);
    mark_staging_released();
    return true;
  }

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
    bump_versions(members.tensors);
  };

  size_t next_slot = 0;
  bool checked = false;
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
    // The first pack overlaps the agreement check; nothing is sent before it passed.
    if (!checked) {
      checked = true;
      if (!agreement_holds(*check, status)) {
        return false;
      }
    }
    std::vector<at::Tensor> wire{buffer};
    in_flight.push_back({b, buffer, group->allreduce(wire, options)});
  }
  if (!checked && !agreement_holds(*check, status)) {
    return false;
  }
  while (!in_flight.empty()) {
    finish_oldest();
  }
  mark_staging_released();
  return true;
}

} // namespace localsgd_ext
