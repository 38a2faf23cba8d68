// The agreement check's collective: encoding, the MAX all_reduce, decoding (see agreement.h).
#include "agreement.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "interruptible_wait.h"

namespace localsgd_ext {
namespace {

enum Slot { kFingerprint, kNegatedFingerprint, kNonfinite, kLocalError, kAmax, kSlots };

// A non-negative finite double's bits order like the double, so MAX over int64 is MAX over the values.
// Anything else (NaN, infinity) becomes the largest key.
int64_t amax_key(double amax) {
  if (!std::isfinite(amax)) {
    return std::numeric_limits<int64_t>::max();
  }
  const double magnitude = std::fabs(amax);
  int64_t bits;
  std::memcpy(&bits, &magnitude, sizeof(bits));
  return bits;
}

double amax_from_key(int64_t key) {
  if (key == std::numeric_limits<int64_t>::max()) {
    return std::numeric_limits<double>::infinity();
  }
  double amax;
  std::memcpy(&amax, &key, sizeof(amax));
  return amax;
}

} // namespace

AgreementCheck::AgreementCheck(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::Device status_device,
                               const AgreementInput& mine) {
  TORCH_CHECK_VALUE(group, "group must be a ProcessGroup, got None.");
  status_ = at::empty({kSlots}, at::TensorOptions().dtype(at::kLong));
  int64_t* values = status_.mutable_data_ptr<int64_t>();
  values[kFingerprint] = mine.fingerprint;
  values[kNegatedFingerprint] = -mine.fingerprint;
  values[kNonfinite] = mine.nonfinite ? 1 : 0;
  values[kLocalError] = mine.local_error ? 1 : 0;
  values[kAmax] = amax_key(mine.narrow_wire_amax);
  if (!status_device.is_cpu()) {
    status_ = status_.to(status_device);
  }
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::MAX;
  std::vector<at::Tensor> wire{status_};
  work_ = group->allreduce(wire, options);
}

AgreementOutcome AgreementCheck::finish() {
  wait_interruptibly(*work_, status_.is_cpu());
  const at::Tensor host = status_.is_cpu() ? status_ : status_.to(at::kCPU);
  const int64_t* v = host.const_data_ptr<int64_t>();
  AgreementOutcome outcome;
  outcome.fingerprints_equal = v[kFingerprint] == -v[kNegatedFingerprint];
  outcome.any_nonfinite = v[kNonfinite] != 0;
  outcome.any_local_error = v[kLocalError] != 0;
  outcome.narrow_wire_amax = amax_from_key(v[kAmax]);
  return outcome;
}

// fp16 holds magnitudes up to 65504. A power-of-two scale that brings the group's largest |value|
// times the group size to at most 2^15 keeps every partial sum finite, and lifts small values out of
// fp16's subnormal range. Powers of two scale without rounding, so wherever the unscaled values were
// in fp16's normal range, the result has the same bits as without scaling.
double AgreementOutcome::narrow_wire_scale(int64_t group_size) const {
  const double amax = narrow_wire_amax;
  if (!(amax > 0) || !std::isfinite(amax)) {
    return 1.0;
  }
  const int exponent = std::ilogb(32768.0 / (amax * static_cast<double>(group_size)));
  return std::ldexp(1.0, std::clamp(exponent, -100, 100));
}

void join_agreement_check_as_failed(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::Device status_device) {
  AgreementInput failed;
  failed.local_error = true;
  AgreementCheck(group, status_device, failed).finish();
}

} // namespace localsgd_ext
