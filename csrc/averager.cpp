#include "averager.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/max.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <utility>

#include "fingerprint.h"
#include "interruptible_wait.h"

namespace localsgd_ext {
namespace {

using PackFn = void(at::TensorList, at::IntArrayRef, const at::Tensor&, double);
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

// The furthest element a tensor can reach through its strides, in elements past its storage offset.
int64_t last_reachable_element(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * std::abs(t.stride(d));
  }
  return last;
}

// fp16 holds magnitudes up to 65504. A power-of-two scale that brings the group's largest |value|
// times the group size to at most 2^15 keeps every partial sum finite, and lifts small values out of
// fp16's subnormal range. Powers of two scale without rounding, so wherever the unscaled values were
// in fp16's normal range, the result has the same bits as without scaling.
double narrow_wire_scale(double amax, int64_t world_size) {
  if (!(amax > 0) || !std::isfinite(amax)) {
    return 1.0;
  }
  const int exponent = std::ilogb(32768.0 / (amax * static_cast<double>(world_size)));
  return std::ldexp(1.0, std::clamp(exponent, -100, 100));
}

} // namespace

BucketedAverager::BucketedAverager(
    std::vector<at::Tensor> tensors,
    int64_t bucket_cap_bytes,
    int64_t buffers_in_flight,
    bool zero_copy,
    std::optional<c10::ScalarType> comm_dtype,
    std::vector<std::string> names)
    : tensors_(std::move(tensors)),
      bucket_cap_bytes_(bucket_cap_bytes),
      buffers_in_flight_(buffers_in_flight),
      zero_copy_(zero_copy),
      comm_dtype_(comm_dtype),
      names_(std::move(names)) {
  TORCH_CHECK_VALUE(
      names_.empty() || names_.size() == tensors_.size(),
      "names must be empty or have one entry per tensor, got ", names_.size(), " names for ", tensors_.size(),
      " tensors.");
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

std::string BucketedAverager::label(size_t index) const {
  std::string text = "tensors[" + std::to_string(index) + "]";
  return names_.empty() ? text : text + " ('" + names_[index] + "')";
}

void BucketedAverager::check_memory() const {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const at::Tensor& t = tensors_[i];
    if (t.numel() == 0) {
      continue;
    }
    const int64_t needed =
        (t.storage_offset() + last_reachable_element(t) + 1) * static_cast<int64_t>(t.element_size());
    const int64_t held = t.has_storage() ? static_cast<int64_t>(t.storage().nbytes()) : 0;
    TORCH_CHECK_VALUE(
        at::has_internal_overlap(t) != at::MemOverlap::Yes,
        label(i), " has elements that share memory (sizes ", t.sizes(), ", strides ", t.strides(),
        ", e.g. an expanded view): averaging writes every element, so it cannot be averaged in place. "
        "Give it memory of its own (e.g. .contiguous()).");
    TORCH_CHECK_VALUE(
        held >= needed,
        label(i), " needs ", needed, " bytes of storage but its storage holds ", held,
        ": its memory was freed or shrunk (e.g. by untyped_storage().resize_(0), as FSDP does to sharded "
        "parameters). Restore it before averaging.");
  }
}

void BucketedAverager::build_plan() {
  // Checked at every (re)plan: a tensor re-pointed since (`param.data = ...`) may no longer qualify.
  check_tensors();
  check_memory();
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
    const int64_t last = last_reachable_element(t);
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
    pack_op().call(members.tensors, members.offsets, flat, 1.0);
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


int64_t BucketedAverager::fingerprint(bool use_avg_op, int64_t extra_fingerprint) const {
  WordHash hash;
  mix_layout(hash, tensors_);
  hash.mix(zero_copy_ ? 1 : 0);
  hash.mix(comm_dtype_ ? static_cast<uint64_t>(*comm_dtype_) + 1 : 0);
  hash.mix(use_avg_op ? 1 : 0);
  // The plan decides the size of every message: ranks with other bucket caps must not meet on the wire.
  hash.mix(buckets_.size());
  for (const Bucket& bucket : buckets_) {
    hash.mix(static_cast<uint64_t>(bucket.numel));
    hash.mix(static_cast<uint64_t>(group_wire_dtypes_[static_cast<size_t>(bucket.group)]));
    hash.mix(bucket.tensor_indices.size());
    for (size_t k = 0; k < bucket.tensor_indices.size(); ++k) {
      hash.mix(static_cast<uint64_t>(bucket.tensor_indices[k]));
      hash.mix(static_cast<uint64_t>(bucket.offsets[k]));
    }
  }
  hash.mix(static_cast<uint64_t>(extra_fingerprint));
  return hash.digest();
}

std::string BucketedAverager::local_error() const {
  if (!local_error_) {
    return "";
  }
  try {
    std::rethrow_exception(local_error_);
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  } catch (const std::exception& error) {
    return error.what();
  }
}

void BucketedAverager::rethrow_local_error() const {
  if (local_error_) {
    std::rethrow_exception(local_error_);
  }
}

void BucketedAverager::refuse_after_abandoned_sync() const {
  TORCH_CHECK(
      !sync_abandoned_,
      "a previous average() was interrupted (KeyboardInterrupt, or a collective that failed) while its "
      "collectives were in flight: the tensors may be partly averaged and the other ranks were left waiting. "
      "This averager cannot be used again; restart the group and resume from a checkpoint.");
}

void BucketedAverager::allocate_staging() {
  // The slots average() will take, in its order (round-robin over non-empty buckets), allocated now so
  // that a failed allocation stops this rank before anything is on the wire.
  size_t slot = 0;
  for (const Bucket& bucket : buckets_) {
    if (bucket.numel > 0 && !zero_copy_) {
      staging_view(slot, bucket);
      slot = (slot + 1) % static_cast<size_t>(buffers_in_flight_);
    }
  }
}

bool BucketedAverager::bucket_is_scaled(const Bucket& bucket) const {
  const size_t group = static_cast<size_t>(bucket.group);
  return group_wire_dtypes_[group] == at::kHalf && group_dtypes_[group] == at::kFloat;
}

double BucketedAverager::narrow_wire_amax() const {
  // Indexed like devices_.
  std::vector<std::vector<at::Tensor>> by_device(devices_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (!bucket_is_scaled(buckets_[b])) {
      continue;
    }
    for (const at::Tensor& t : bucket_tensors_[b].tensors) {
      if (t.numel() > 0) {
        by_device[group_device_index_[static_cast<size_t>(buckets_[b].group)]].push_back(t);
      }
    }
  }
  double amax = 0;
  for (const std::vector<at::Tensor>& tensors : by_device) {
    if (tensors.empty()) {
      continue;
    }
    // One host sync per device, not per tensor; NaN propagates through aminmax and max. (aminmax reads
    // at memory speed on CPU; _foreach_norm(inf) measured 10x slower.)
    std::vector<at::Tensor> extremes;
    extremes.reserve(2 * tensors.size());
    for (const at::Tensor& t : tensors) {
      auto [smallest, largest] = at::aminmax(t);
      extremes.push_back(largest);
      extremes.push_back(at::neg(smallest));
    }
    const double device_amax = at::max(at::stack(extremes)).item<double>();
    amax = std::isnan(device_amax) || std::isnan(amax) ? device_amax + amax : std::max(amax, device_amax);
  }
  return amax;
}

AgreementInput BucketedAverager::prepare(
    bool use_avg_op,
    bool check_finite,
    int64_t extra_fingerprint,
    bool for_average) {
  local_error_ = nullptr;
  AgreementInput mine;
  try {
    check_memory();
    refresh_plan();
    if (for_average) {
      allocate_staging();
      mine.narrow_wire_amax = narrow_wire_amax();
    }
    mine.nonfinite = check_finite && first_nonfinite() >= 0;
    mine.fingerprint = fingerprint(use_avg_op, extra_fingerprint);
  } catch (const std::exception&) {
    local_error_ = std::current_exception();
    mine.local_error = true;
  }
  return mine;
}

bool BucketedAverager::ranks_agree(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    bool use_avg_op,
    c10::Device status_device,
    bool check_finite,
    int64_t extra_fingerprint) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  refuse_after_abandoned_sync();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // zero-copy re-flattening rebinds parameters
  const AgreementInput mine = prepare(use_avg_op, check_finite, extra_fingerprint, /*for_average=*/false);
  sync_abandoned_ = true;
  const bool holds = AgreementCheck(group, status_device, mine).finish().holds();
  sync_abandoned_ = false;
  return holds;
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
  std::vector<std::pair<c10::intrusive_ptr<c10d::Work>, bool>> works;
  works.reserve(flat_buffers_.size());
  for (const at::Tensor& flat : flat_buffers_) {
    if (flat.numel() > 0) {
      std::vector<at::Tensor> wire{flat};
      works.emplace_back(group->allreduce(wire, options), flat.is_cpu());
    }
  }
  for (const auto& [work, on_host] : works) {
    wait_interruptibly(*work, on_host);
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

bool BucketedAverager::average_copy_mode(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    bool use_avg_op,
    std::optional<AgreementCheck>& check,
    double narrow_wire_scale) {
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
    wait_interruptibly(*done.work, done.buffer.is_cpu());
    const BucketTensors& members = bucket_tensors_[done.bucket];
    const double scale = bucket_is_scaled(buckets_[done.bucket]) ? narrow_wire_scale : 1.0;
    unpack_op().call(done.buffer, members.offsets, divisor * scale, members.tensors);
    bump_versions(members.tensors);
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
    pack_op().call(members.tensors, members.offsets, buffer, bucket_is_scaled(buckets_[b]) ? narrow_wire_scale : 1.0);
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

bool BucketedAverager::average(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    bool use_avg_op,
    c10::Device status_device,
    bool check_finite,
    int64_t extra_fingerprint,
    bool run_check) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  TORCH_CHECK_VALUE(
      !(use_avg_op && comm_dtype_), "use_avg_op cannot be combined with comm_dtype: the division must happen in float32.");
  TORCH_CHECK_VALUE(
      run_check || comm_dtype_ != at::kHalf, "run_check=false cannot be combined with an fp16 wire, whose scale the check agrees on.");
  refuse_after_abandoned_sync();
  wait_for_previous_average();
  // Parameters are leaves that require grad; the copies must bypass autograd like an optimizer's
  // torch.no_grad() update does. Their version counters are bumped by hand.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const AgreementInput mine = prepare(use_avg_op, check_finite, extra_fingerprint, /*for_average=*/true);
  if (!run_check) {
    rethrow_local_error();
  }
  // Until this sync ends normally, an exception leaves collectives behind (see refuse_after_abandoned_sync).
  sync_abandoned_ = true;
  std::optional<AgreementCheck> check;
  double scale = 1.0;
  if (run_check) {
    check.emplace(group, status_device, mine);
    // A rank that failed to prepare packs nothing (its plan may be stale); the fp16 scale must be the
    // same on every rank before the first fp16 bucket is packed.
    if (mine.local_error || comm_dtype_ == at::kHalf) {
      const AgreementOutcome outcome = check->finish();
      check.reset();
      if (!outcome.holds()) {
        sync_abandoned_ = false;
        return false;
      }
      scale = narrow_wire_scale(outcome.narrow_wire_amax, group->getSize());
    }
  }
  bool averaged;
  if (zero_copy_) {
    averaged = !check || check->finish().holds();
    if (averaged) {
      average_zero_copy(group, use_avg_op);
    }
  } else {
    averaged = average_copy_mode(group, use_avg_op, check, scale);
  }
  sync_abandoned_ = false;
  if (averaged) {
    mark_staging_released();
  }
  return averaged;
}

} // namespace localsgd_ext
