// The one small collective before every average: each rank contributes what decides what it would
// send (a fingerprint of its layout, plan and settings), whether it found NaN/Inf, whether it failed
// to prepare, and the largest magnitude it would put on an fp16 wire. One MAX all_reduce of five
// int64 gives every rank the same max and min fingerprint, the same flags and the same maximum, so
// every rank takes the same branch. The size never varies, so even a rank that failed before it
// could plan takes part with a matching message.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace localsgd_ext {

// This rank's contribution.
struct AgreementInput {
  int64_t fingerprint = 0;
  bool nonfinite = false;
  bool local_error = false;
  // The largest |value| of the tensors that travel as fp16 (0 when none; infinity or NaN when one is
  // not finite).
  double narrow_wire_amax = 0;
};

// What every rank reads back, identically.
struct AgreementOutcome {
  bool fingerprints_equal = true;
  bool any_nonfinite = false;
  bool any_local_error = false;
  double narrow_wire_amax = 0; // over the group; infinity when any rank's was not finite

  bool holds() const { return fingerprints_equal && !any_nonfinite && !any_local_error; }
  // The power of two every fp16-bound value is multiplied by on the wire (1 without an fp16 wire).
  double narrow_wire_scale(int64_t group_size) const;
};

class AgreementCheck {
 public:
  // Starts the MAX all_reduce on `status_device` (where the group's backend takes tensors).
  AgreementCheck(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::Device status_device,
                 const AgreementInput& mine);
  // Waits for it (interruptibly on CPU) and decodes it.
  AgreementOutcome finish();

 private:
  at::Tensor status_;
  c10::intrusive_ptr<c10d::Work> work_;
};

// For a rank that failed before it could plan: takes part in the check, flagged as failed, so that
// the others stop at once instead of waiting for buckets that will never come.
void join_agreement_check_as_failed(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::Device status_device);

} // namespace localsgd_ext
