// The averaging engine: a bucket plan over a fixed list of tensors, reusable staging buffers, and the
// pack -> all_reduce -> unpack pipeline through a torch.distributed ProcessGroup.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <optional>
#include <vector>

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
      std::optional<c10::ScalarType> comm_dtype = std::nullopt);

  // Replaces every tensor by its mean across `group`, in place, after checking with one small
  // all_reduce (on `status_device`) that every rank holds the same layout and, with `check_finite`,
  // only finite values. Returns false, having averaged nothing, when the ranks disagree: every rank
  // then returns false, and the caller explains. With `use_avg_op` the backend's AVG divides;
  // otherwise the all_reduce is a SUM and the division by the group size is fused into the unpack.
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
      bool check_finite);

  // Only the check average() starts with. A collective: every rank must call it.
  bool ranks_agree(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::Device status_device, bool check_finite);

  // A 62-bit digest of the tensors as they are now: their count, and each one's dtype and shape. Ranks
  // compare it (one small all_reduce) before averaging, so that mismatched models raise, not hang.
  int64_t layout_fingerprint() const;
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
  // Starts the MAX all_reduce of [fingerprint, -fingerprint, non-finite flag] into `status`.
  c10::intrusive_ptr<c10d::Work> start_agreement_check(
      const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::Device status_device, bool check_finite,
      at::Tensor& status);
  static bool agreement_holds(c10d::Work& work, const at::Tensor& status);
  void average_zero_copy(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op);
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
