// BucketedAverager: one sync, from local preparation through the check to the ring or the flat buffers.
#include "averager.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "fingerprint.h"
#include "tensor_checks.h"
#include "tensor_scans.h"

namespace localsgd_ext {

BucketedAverager::BucketedAverager(std::vector<at::Tensor> tensors, int64_t bucket_cap_bytes, int64_t buffers_in_flight,
                                   bool zero_copy, std::optional<c10::ScalarType> comm_dtype,
                                   std::vector<std::string> names)
    : tensors_(std::move(tensors)),
      names_(std::move(names)),
      bucket_cap_bytes_(bucket_cap_bytes),
      zero_copy_(zero_copy),
      comm_dtype_(comm_dtype),
      ring_(buffers_in_flight) {
  TORCH_CHECK_VALUE(names_.empty() || names_.size() == tensors_.size(),
                    "names must be empty or have one entry per tensor, got ", names_.size(), " names for ",
                    tensors_.size(), " tensors.");
  TORCH_CHECK_VALUE(!comm_dtype_ || *comm_dtype_ == at::kBFloat16 || *comm_dtype_ == at::kHalf,
                    "comm_dtype must be BFloat16 or Half, got ", *comm_dtype_, ".");
  TORCH_CHECK_VALUE(!(comm_dtype_ && zero_copy_),
                    "comm_dtype needs copy mode: zero_copy all-reduces the parameters' own memory, in their dtype.");
  TORCH_CHECK_VALUE(bucket_cap_bytes_ > 0, "bucket_cap_bytes must be positive, got ", bucket_cap_bytes_, ".");
  build_plan();
}

void BucketedAverager::build_plan() {
  // Checked at every (re)plan: a tensor re-pointed since (`param.data = ...`) may no longer qualify.
  check_averageable(tensors_);
  check_memory(tensors_, names_);
  plan_ = AveragingPlan(tensors_, bucket_cap_bytes_, comm_dtype_);
  check_no_shared_memory(tensors_, names_, zero_copy_);
  ring_.reset(plan_);
  delayed_.reset();
  if (zero_copy_) {
    flat_.flatten(plan_);
  }
  ++plans_built_;
}

void BucketedAverager::keep_flat() {
  TORCH_CHECK(zero_copy_, "keep_flat() needs an averager built with zero_copy=True.");
  at::AutoDispatchBelowADInplaceOrView below_autograd; // re-flattening rebinds parameters
  check_memory(tensors_, names_);
  if (flat_.broken(plan_)) {
    build_plan();
  }
}

int64_t BucketedAverager::fingerprint(bool use_avg_op, int64_t extra_fingerprint) const {
  WordHash hash;
  mix_layout(hash, tensors_);
  hash.mix(zero_copy_ ? 1 : 0);
  hash.mix(comm_dtype_ ? static_cast<uint64_t>(*comm_dtype_) + 1 : 0);
  hash.mix(use_avg_op ? 1 : 0);
  plan_.mix_into(hash);
  hash.mix(static_cast<uint64_t>(extra_fingerprint));
  return hash.digest();
}

int64_t BucketedAverager::first_nonfinite() const { return localsgd_ext::first_nonfinite(tensors_); }

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
  TORCH_CHECK(!sync_abandoned_,
              "a previous average() was interrupted (KeyboardInterrupt, or a collective that failed) while its "
              "collectives were in flight: the tensors may be partly averaged and the other ranks were left waiting. "
              "This averager cannot be used again; restart the group and resume from a checkpoint.");
}

AgreementInput BucketedAverager::prepare(bool use_avg_op, bool check_finite, int64_t extra_fingerprint,
                                         bool for_average, bool allocate_staging) {
  local_error_ = nullptr;
  AgreementInput mine;
  try {
    check_memory(tensors_, names_);
    if (zero_copy_ ? flat_.broken(plan_) : plan_.stale(tensors_)) {
      build_plan();
    }
    if (for_average && allocate_staging && !zero_copy_) {
      ring_.allocate(plan_);
    }
    if (for_average && comm_dtype_ == at::kHalf) {
      std::vector<at::Tensor> scaled;
      for (size_t b = 0; b < plan_.buckets.size(); ++b) {
        if (plan_.scaled(plan_.buckets[b])) {
          scaled.insert(scaled.end(), plan_.members[b].tensors.begin(), plan_.members[b].tensors.end());
        }
      }
      mine.narrow_wire_amax = largest_magnitude(scaled);
    }
    mine.nonfinite = check_finite && first_nonfinite() >= 0;
    mine.fingerprint = fingerprint(use_avg_op, extra_fingerprint);
  } catch (const std::exception&) {
    local_error_ = std::current_exception();
    mine.local_error = true;
  }
  return mine;
}

bool BucketedAverager::ranks_agree(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op,
                                   c10::Device status_device, bool check_finite, int64_t extra_fingerprint) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  refuse_after_abandoned_sync();
  at::AutoDispatchBelowADInplaceOrView below_autograd; // zero-copy re-flattening rebinds parameters
  const AgreementInput mine = prepare(use_avg_op, check_finite, extra_fingerprint, /*for_average=*/false);
  sync_abandoned_ = true;
  const bool holds = AgreementCheck(group, status_device, mine).finish().holds();
  sync_abandoned_ = false;
  return holds;
}

bool BucketedAverager::average(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op,
                               c10::Device status_device, bool check_finite, int64_t extra_fingerprint,
                               bool run_check) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  TORCH_CHECK_VALUE(!(use_avg_op && comm_dtype_),
                    "use_avg_op cannot be combined with comm_dtype: the division must happen in float32.");
  TORCH_CHECK_VALUE(run_check || comm_dtype_ != at::kHalf,
                    "run_check=false cannot be combined with an fp16 wire, whose scale the check agrees on.");
  refuse_after_abandoned_sync();
  ring_.wait_for_previous_run(plan_);
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
      scale = outcome.narrow_wire_scale(group->getSize());
    }
  }
  bool averaged;
  if (zero_copy_) {
    averaged = !check || check->finish().holds();
    if (averaged) {
      flat_.all_reduce(group, use_avg_op, plan_);
    }
  } else {
    averaged = ring_.run(group, plan_, use_avg_op, check, scale);
    if (averaged) {
      ring_.mark_released(plan_);
    }
  }
  sync_abandoned_ = false;
  return averaged;
}

} // namespace localsgd_ext
