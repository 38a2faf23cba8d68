// The averaging engine: a bucket plan over a fixed list of tensors, reusable staging buffers, and the
// pack -> all_reduce -> unpack pipeline through a torch.distributed ProcessGroup.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <vector>

#include "bucket_plan.h"

namespace localsgd_ext {

// Bucket starts are aligned to this many bytes so vectorized kernels can use 16-byte accesses.
constexpr int64_t kBucketAlignmentBytes = 16;

class BucketedAverager {
 public:
  // Plans buckets over `tensors` (kept by reference: in-place updates land in them). Staging memory is
  // `buffers_in_flight` buffers per device, each as large as that device's largest bucket.
  BucketedAverager(std::vector<at::Tensor> tensors, int64_t bucket_cap_bytes, int64_t buffers_in_flight);

  // Replaces every tensor by its mean across `group`, in place. With `use_avg_op` the backend's AVG
  // does the division; otherwise the all_reduce is a SUM and unpack divides by the group size.
  // Bucket i+1 is packed while bucket i is on the wire. On CPU it returns when every bucket is
  // unpacked. On CUDA, packs and unpacks run on the current stream and Work::wait() only makes that
  // stream wait for NCCL's: it returns with the work queued and no host sync between buckets.
  void average(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op);

  // A 62-bit digest of the tensors as they are now: their count, and each one's dtype and shape. Ranks
  // compare it (one small all_reduce) before averaging, so that mismatched models raise, not hang.
  int64_t layout_fingerprint() const;
  // The index of the first tensor holding a NaN or an infinity, or -1 when all are finite.
  int64_t first_nonfinite() const;

  const std::vector<Bucket>& buckets() const { return buckets_; }
  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  // Bytes of staging buffers allocated so far (they are allocated at the first average()).
  int64_t staging_bytes() const;

 private:
  struct BucketTensors {
    std::vector<at::Tensor> tensors;
    std::vector<int64_t> offsets;
  };

  // Refuses tensors that cannot be averaged: undefined, not dense, on the meta device, not floating.
  void check_tensors() const;
  void build_plan();
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

  // Per tensor, what the plan was built from.
  std::vector<PlanInput> planned_inputs_;
  // Per group (index = PlanInput::group): its dtype and the index of its device in devices_.
  std::vector<c10::ScalarType> group_dtypes_;
  std::vector<size_t> group_device_index_;
  std::vector<c10::Device> devices_;
  std::vector<Bucket> buckets_;
  std::vector<BucketTensors> bucket_tensors_;
  // staging_[slot][device index]: a byte buffer as large as that device's largest bucket, allocated on
  // first use and shared by every dtype on the device (viewed as the bucket's dtype).
  std::vector<std::vector<at::Tensor>> staging_;
  // Per device index: recorded on the current stream at the end of average(); null on CPU.
  std::vector<std::unique_ptr<c10::Event>> staging_released_;
};

} // namespace localsgd_ext
