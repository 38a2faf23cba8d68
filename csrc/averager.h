// The averaging engine: owns the tensors and their plan, and runs one sync: prepare locally, agree
// with the other ranks (agreement.h), then average through the staging ring (copy mode,
// staging_ring.h) or in place (zero-copy mode, flat_storage.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "agreement.h"
#include "averaging_plan.h"
#include "delayed_average.h"
#include "flat_storage.h"
#include "staging_ring.h"

namespace localsgd_ext {

class BucketedAverager {
 public:
  // Plans buckets over `tensors` (kept by reference: in-place updates land in them).
  // Copy mode: staging memory is `buffers_in_flight` buffers per device, each as large as that
  // device's largest bucket. Zero-copy mode: the tensors are moved, here, into one persistent flat
  // buffer per bucket and rebound (like `param.data = ...`) as views of it; no staging.
  // `comm_dtype` (copy mode only): float32 tensors travel in that dtype (BFloat16 or Half), cast by
  // pack and unpack; bucket caps count wire bytes. `names` (optional, one per tensor) label errors.
  BucketedAverager(std::vector<at::Tensor> tensors, int64_t bucket_cap_bytes, int64_t buffers_in_flight, bool zero_copy,
                   std::optional<c10::ScalarType> comm_dtype = std::nullopt, std::vector<std::string> names = {});

  // Replaces every tensor by its mean across `group`, in place, after checking with one small
  // all_reduce (on `status_device`, see agreement.h) that every rank holds the same layout, plan and
  // settings (`extra_fingerprint`: the caller's, e.g. its sync cadence) and, with `check_finite`, only
  // finite values, and that no rank failed to prepare (`local_error()`). Returns false, having
  // averaged nothing anywhere, when any of that fails: every rank then returns false, and the caller
  // explains. With `use_avg_op` the backend's AVG divides; otherwise the all_reduce is a SUM and the
  // division by the group size is fused into the unpack. `run_check` false skips the check, for a
  // caller that has just checked these tensors' layout within its own check (a local failure then
  // throws at once); it cannot be combined with an fp16 wire, whose scale the check agrees on.
  // fp16 wire: every fp16-bound value is multiplied by one power of two, agreed in the check from
  // the group's largest |value|, so that no partial sum overflows and small values are not flushed.
  // On CPU it returns when every tensor holds the mean. On CUDA, packs and unpacks run on the current
  // stream and Work::wait() only makes that stream wait for NCCL's: the work is queued, with no host
  // sync between buckets (the check's result is read on the host, a sync on the status device).
  bool average(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op, c10::Device status_device,
               bool check_finite, int64_t extra_fingerprint = 0, bool run_check = true);

  // The overlapped sync: prepares and checks as average() does (the check is waited for), then packs
  // every bucket into a snapshot and starts its all_reduce, and returns without waiting. Copy mode;
  // an fp16 wire's scale is agreed in that check. False, with nothing started, when the check fails.
  bool start_delayed(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op, c10::Device status_device,
                     bool check_finite, int64_t extra_fingerprint = 0);
  // Waits for the started average and merges it: each tensor t += mean(snapshot) - snapshot. Refuses,
  // after waiting, when a tensor changed numel, dtype or device meanwhile.
  void finish_delayed();
  // finish_delayed() split for an outer step: the mean of the snapshots written into `targets` (one per
  // tensor, of its shape, dtype and device), then t += target - snapshot once the caller replaced them.
  void finish_delayed_into_mean(const std::vector<at::Tensor>& targets);
  void merge_delayed_targets(const std::vector<at::Tensor>& targets);
  // Waits for the started average without merging (after an exception): nothing stays on the wire.
  void drain_delayed() { delayed_.drain(); }
  bool delayed_pending() const { return delayed_.pending(); }
  int64_t delayed_bytes() const { return delayed_.bytes(); }

  // Only the check average() starts with. A collective: every rank must call it.
  bool ranks_agree(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op, c10::Device status_device,
                   bool check_finite, int64_t extra_fingerprint = 0);

  // A 62-bit digest of everything that decides what this rank would send: the tensors' count, dtypes
  // and shapes, the bucket plan (sizes, offsets, wire dtypes), zero_copy, the reduce op, and the
  // caller's `extra_fingerprint`.
  int64_t fingerprint(bool use_avg_op, int64_t extra_fingerprint) const;
  // Why this rank could not take part in the last check ("" when it could), and that error rethrown.
  std::string local_error() const;
  void rethrow_local_error() const;
  // The index of the first tensor holding a NaN or an infinity, or -1 when all are finite.
  int64_t first_nonfinite() const;

  const std::vector<Bucket>& buckets() const { return plan_.buckets; }
  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  // Bytes of staging buffers allocated so far (they are allocated at the first average()).
  int64_t staging_bytes() const { return ring_.bytes(); }
  // Zero-copy mode: bytes of the flat buffers the tensors live in (0 in copy mode).
  int64_t flat_bytes() const { return flat_.bytes(); }
  // How many times the tensors were planned (zero-copy: moved into new flat buffers), the construction
  // included: a caller that keeps other references to the tensors' memory re-points them when it grows.
  int64_t plans_built() const { return plans_built_; }
  // Zero-copy mode, locally: flattens the tensors again if one is no longer the view flatten() made of it
  // (what a sync's preparation does first), for an engine that keeps the layout while another averages.
  void keep_flat();

 private:
  // Plans anew (zero-copy: and flattens again), after refusing tensors that cannot be averaged.
  void build_plan();
  // Everything a sync does locally before anything is sent: check memory, re-plan when the tensors
  // changed, allocate staging, scan for NaN/Inf and the fp16 range. A failure is kept in local_error_
  // and flagged in the check, so that every rank stops before any bucket is on the wire.
  AgreementInput prepare(bool use_avg_op, bool check_finite, int64_t extra_fingerprint, bool for_average,
                         bool allocate_staging = true);
  // A sync that threw with collectives in flight (Ctrl-C, a failed collective) leaves them to finish
  // in the background; the engine refuses to be used again.
  void refuse_after_abandoned_sync() const;

  std::vector<at::Tensor> tensors_;
  std::vector<std::string> names_;
  int64_t bucket_cap_bytes_;
  bool zero_copy_;
  std::optional<c10::ScalarType> comm_dtype_;
  AveragingPlan plan_;
  StagingRing ring_; // copy mode
  FlatStorage flat_; // zero-copy mode
  DelayedAverage delayed_;
  void check_targets(const std::vector<at::Tensor>& targets) const;
  // A tensor re-planned while a delayed average was in flight: drains it and refuses the merge.
  void refuse_stale_delayed();
  std::exception_ptr local_error_;
  bool sync_abandoned_ = false;
  int64_t plans_built_ = 0;
};

} // namespace localsgd_ext
