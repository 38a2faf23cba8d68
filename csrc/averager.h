// The averaging engine: a bucket plan over a fixed list of tensors, reusable staging buffers, and the
// pack -> all_reduce -> unpack pipeline through a torch.distributed ProcessGroup.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <exception>
#include <memory>
#include <string>
#include <optional>
#include <vector>

#include "agreement.h"
#include "bucket_plan.h"

namespace localsgd_ext {

// Bucket starts are aligned to this many bytes so vectorized kernels can use 16-byte accesses.
constexpr int64_t kBucketAlignmentBytes = 16;
// Copy mode holds at most this many staging buffers per device, so extra memory stays bounded by
// that many buckets whatever the model size.
constexpr int64_t kMaxBuffersInFlight = 3;

class BucketedAverager {
 public:
  // Plans buckets over `tensors` (kept by reference: in-place updates land in them).
  // Copy mode: staging memory is `buffers_in_flight` buffers per device, each as large as that
  // device's largest bucket. Zero-copy mode: the tensors are moved, here, into one persistent flat
  // buffer per bucket and rebound (like `param.data = ...`) as views of it; no staging.
  // `comm_dtype` (copy mode only): float32 tensors travel in that dtype (BFloat16 or Half), cast by
  // pack and unpack; bucket caps count wire bytes.
  BucketedAverager(
      std::vector<at::Tensor> tensors,
      int64_t bucket_cap_bytes,
      int64_t buffers_in_flight,
      bool zero_copy,
      std::optional<c10::ScalarType> comm_dtype = std::nullopt,
      std::vector<std::string> names = {});

  // Replaces every tensor by its mean across `group`, in place, after checking with one small
  // all_reduce (on `status_device`, see agreement.h) that every rank holds the same layout, plan and
  // settings (`extra_fingerprint`: the caller's, e.g. its sync cadence) and, with `check_finite`, only
  // finite values, and that no rank failed to prepare (`local_error()`). Returns false, having
  // averaged nothing anywhere, when any of that fails: every rank then returns false, and the caller
  // explains. With `use_avg_op` the backend's AVG divides; otherwise the all_reduce is a SUM and the
  // division by the group size is fused into the unpack. `run_check` false skips the check, for a
  // caller that has just checked these tensors' layout within its own check (a local failure then
  // throws at once); it cannot be combined with an fp16 wire, whose scale the check agrees on.
  // Copy mode: bucket 0 is packed while the check is on the wire, and bucket i+1 while bucket i is.
  // Zero-copy mode: one in-place all_reduce per flat buffer; tensors re-pointed since the last sync
  // (`param.data = ...`, `module.to(...)`) are first moved into fresh flat buffers.
  // On CPU it returns when every tensor holds the mean. On CUDA, packs and unpacks run on the current
  // stream and Work::wait() only makes that stream wait for NCCL's: the work is queued, with no host
  // sync between buckets (the check's result is read on the host, a sync on the status device).
  bool average(
      const c10::intrusive_ptr<c10d::ProcessGroup>& group,
      bool use_avg_op,
      c10::Device status_device,
      bool check_finite,
      int64_t extra_fingerprint = 0,
      bool run_check = true);

  // Only the check average() starts with. A collective: every rank must call it.
  bool ranks_agree(
      const c10::intrusive_ptr<c10d::ProcessGroup>& group,
      bool use_avg_op,
      c10::Device status_device,
      bool check_finite,
      int64_t extra_fingerprint = 0);

  // A 62-bit digest of everything that decides what this rank would send: the tensors' count, dtypes
  // and shapes, the bucket plan (sizes, offsets, wire dtypes), zero_copy, the reduce op, and the
  // caller's `extra_fingerprint`.
  int64_t fingerprint(bool use_avg_op, int64_t extra_fingerprint) const;
  // Why this rank could not take part in the last check ("" when it could), and that error rethrown.
  std::string local_error() const;
  void rethrow_local_error() const;
  // The index of the first tensor holding a NaN or an infinity, or -1 when all are finite.
  int64_t first_nonfinite() const;

  const std::vector<Bucket>& buckets() const { return buckets_; }
  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  // Bytes of staging buffers allocated so far (they are allocated at the first average()).
  int64_t staging_bytes() const;
  // Zero-copy mode: bytes of the flat buffers the tensors live in (0 in copy mode).
  int64_t flat_bytes() const;

 private:
  struct BucketTensors {
    std::vector<at::Tensor> tensors;
    std::vector<int64_t> offsets;
  };

  // Refuses tensors that cannot be averaged: undefined, not dense, on the meta device, not floating.
  void check_tensors() const;
  // Refuses tensors whose elements share memory (an expanded view: `param.data = t.expand(...)` keeps
  // numel and dtype, so no re-plan notices) or whose storage no longer holds them (freed, e.g.
  // resize_(0)): run before anything reads or writes them, at every plan and every sync.
  void check_memory() const;
  std::string label(size_t index) const;
  // Everything a sync does locally before anything is sent: re-plan, check storage, allocate staging,
  // scan for NaN/Inf and the fp16 range. A failure is kept in local_error_ and flagged in the check,
  // so that every rank stops before any bucket is on the wire.
  AgreementInput prepare(bool use_avg_op, bool check_finite, int64_t extra_fingerprint, bool for_average);
  void allocate_staging();
  // The largest |value| among the float32 tensors that travel as fp16 (0 when there are none).
  double narrow_wire_amax() const;
  bool bucket_is_scaled(const Bucket& bucket) const;
  // A sync that threw with buckets on the wire (Ctrl-C, a failed collective) leaves them to finish
  // in the background; the engine refuses to be used again.
  void refuse_after_abandoned_sync() const;
  // In zero-copy mode also moves the tensors into fresh flat buffers.
  void build_plan();
  // Zero-copy: refuses tensors that share memory (flattening would untie them).
  void check_no_shared_memory() const;
  // Zero-copy: copies every tensor into a fresh flat buffer per bucket and rebinds it as a view there.
  void flatten();
  // Zero-copy: true when some tensor is no longer the view flatten() made of it (re-pointed).
  bool flat_layout_broken() const;
  // Re-plans (so, in zero-copy mode, re-flattens) when the tensors changed since the plan.
  void refresh_plan();
  void average_zero_copy(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op);
  // False when the check (still pending in `check`) failed: nothing was sent.
  bool average_copy_mode(
      const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op, std::optional<AgreementCheck>& check,
      double narrow_wire_scale);
  void bump_versions(const std::vector<at::Tensor>& tensors) const;
  // True when a tensor's numel, dtype or device no longer matches the plan (e.g. `param.data = ...`).
  bool plan_is_stale() const;
  at::Tensor staging_view(size_t slot, const Bucket& bucket);
  // Stream-ordered devices (CUDA): the next average() may run on another current stream, so it first
  // waits for the point where this one's last unpack has read the staging buffers.
  void wait_for_previous_average();
  void mark_staging_released();

  std::vector<at::Tensor> tensors_;
  int64_t bucket_cap_bytes_;
  int64_t buffers_in_flight_;
  bool zero_copy_;
  std::optional<c10::ScalarType> comm_dtype_;
  std::vector<std::string> names_;
  std::exception_ptr local_error_;
  bool sync_abandoned_ = false;

  // Per tensor, what the plan was built from.
  std::vector<PlanInput> planned_inputs_;
  // Per group (index = PlanInput::group): its dtype, its dtype on the wire, and the index of its device
  // in devices_.
  std::vector<c10::ScalarType> group_dtypes_;
  std::vector<c10::ScalarType> group_wire_dtypes_;
  std::vector<size_t> group_device_index_;
  std::vector<c10::Device> devices_;
  std::vector<Bucket> buckets_;
  std::vector<BucketTensors> bucket_tensors_;
  // staging_[slot][device index]: a byte buffer as large as that device's largest bucket, allocated on
  // first use and shared by every dtype on the device (viewed as the bucket's dtype).
  std::vector<std::vector<at::Tensor>> staging_;
  // Zero-copy: per bucket, the flat buffer its tensors are views of.
  std::vector<at::Tensor> flat_buffers_;
  // Per device index: recorded on the current stream at the end of average(); null on CPU.
  std::vector<std::unique_ptr<c10::Event>> staging_released_;
};

} // namespace localsgd_ext
