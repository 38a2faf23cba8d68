// BucketedAverager's overlapped sync (sync_delay): the check, then the buckets left on the wire
// (delayed_average.h), and the merge later.
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>

#include "averager.h"
#include "tensor_checks.h"

namespace localsgd_ext {

bool BucketedAverager::start_delayed(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op,
                                     c10::Device status_device, bool check_finite, int64_t extra_fingerprint) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  TORCH_CHECK_VALUE(!zero_copy_, "a delayed average needs copy mode: zero_copy averages the parameters' own memory.");
  TORCH_CHECK_VALUE(!(use_avg_op && comm_dtype_), "use_avg_op cannot be combined with comm_dtype.");
  TORCH_CHECK(!delayed_.pending(),
              "start_average() while an overlapped average is in flight: call finish_average() first.");
  refuse_after_abandoned_sync();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AgreementInput mine =
      prepare(use_avg_op, check_finite, extra_fingerprint, /*for_average=*/true, /*allocate_staging=*/false);
  sync_abandoned_ = true;
  const AgreementOutcome outcome = AgreementCheck(group, status_device, mine).finish();
  const bool holds = outcome.holds();
  if (holds) {
    delayed_.start(group, plan_, use_avg_op, outcome.narrow_wire_scale(group->getSize()));
  }
  sync_abandoned_ = false;
  return holds;
}

void BucketedAverager::finish_delayed() {
  TORCH_CHECK(delayed_.pending(),
              "finish_average() without an overlapped average in flight: call start_average() first.");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  refuse_stale_delayed();
  sync_abandoned_ = true;
  delayed_.finish(plan_);
  sync_abandoned_ = false;
}

void BucketedAverager::refuse_stale_delayed() {
  if (plan_.stale(tensors_)) {
    delayed_.drain();
    TORCH_CHECK_VALUE(
        false,
        "a tensor changed numel, dtype or device while a delayed average was in flight; its correction cannot be "
        "merged. Nothing was merged.");
  }
}

void BucketedAverager::check_targets(const std::vector<at::Tensor>& targets) const {
  TORCH_CHECK_VALUE(targets.size() == tensors_.size(), "the outer step's targets must be one per tensor (",
                    tensors_.size(), "), got ", targets.size(), ".");
  for (size_t i = 0; i < targets.size(); ++i) {
    TORCH_CHECK_VALUE(
        targets[i].sizes() == tensors_[i].sizes() && targets[i].scalar_type() == tensors_[i].scalar_type() &&
            targets[i].device() == tensors_[i].device(),
        "the outer step's target for ", tensor_label(names_, i), " must have its shape, dtype and device (",
        tensors_[i].sizes(), ", ", tensors_[i].scalar_type(), ", ", tensors_[i].device(), "), got ", targets[i].sizes(),
        ", ", targets[i].scalar_type(), ", ", targets[i].device(), ".");
  }
}

void BucketedAverager::finish_delayed_into_mean(const std::vector<at::Tensor>& targets) {
  TORCH_CHECK(delayed_.pending(),
              "finish_average() without an overlapped average in flight: call start_average() first.");
  check_targets(targets);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  refuse_stale_delayed();
  sync_abandoned_ = true;
  delayed_.finish_into_mean(plan_, targets);
  sync_abandoned_ = false;
}

void BucketedAverager::merge_delayed_targets(const std::vector<at::Tensor>& targets) {
  TORCH_CHECK(delayed_.awaiting_merge(), "merge_delayed_targets() without finish_delayed_into_mean() first.");
  check_targets(targets);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  delayed_.merge_targets(plan_, targets);
}

} // namespace localsgd_ext
