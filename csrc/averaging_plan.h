// The plan one engine averages by: the tensors grouped by (device, dtype), each group's wire dtype,
// the buckets (bucket_plan.h) and, per bucket, its tensors and their offsets. Built from the tensors
// as they are; rebuilt when one changes numel, dtype or device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "bucket_plan.h"
#include "fingerprint.h"

namespace localsgd_ext {

// Bucket starts are aligned to this many bytes so vectorized kernels can use 16-byte accesses.
constexpr int64_t kBucketAlignmentBytes = 16;

// Tensors of one device and dtype: only they may share a bucket.
struct TensorGroup {
  c10::ScalarType dtype;
  // What goes on the wire: `dtype`, or comm_dtype for float32 groups when one is set.
  c10::ScalarType wire_dtype;
  // Index into AveragingPlan::devices.
  size_t device;
};

struct BucketTensors {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> offsets;
};

struct AveragingPlan {
  AveragingPlan() = default;
  // `comm_dtype`: float32 groups travel in it (bucket caps then count wire bytes).
  AveragingPlan(const std::vector<at::Tensor>& tensors, int64_t bucket_cap_bytes,
                std::optional<c10::ScalarType> comm_dtype);

  // True when a tensor's numel, dtype or device no longer matches the plan (e.g. `param.data = ...`).
  bool stale(const std::vector<at::Tensor>& tensors) const;
  const TensorGroup& group_of(const Bucket& bucket) const { return groups[static_cast<size_t>(bucket.group)]; }
  const c10::Device& device_of(const Bucket& bucket) const { return devices[group_of(bucket).device]; }
  // float32 on an fp16 wire: packed with the group-agreed scale (see BucketedAverager::average).
  bool scaled(const Bucket& bucket) const {
    return group_of(bucket).wire_dtype == at::kHalf && group_of(bucket).dtype == at::kFloat;
  }
  // Every message's size and layout: ranks that differ here must not meet on the wire.
  void mix_into(WordHash& hash) const;

  std::vector<PlanInput> inputs; // per tensor
  std::vector<TensorGroup> groups;
  std::vector<c10::Device> devices;
  std::vector<Bucket> buckets;
  std::vector<BucketTensors> members; // per bucket
};

// After writing tensors in place below autograd: what an in-place op would do to their versions.
void bump_versions(const std::vector<at::Tensor>& tensors);

} // namespace localsgd_ext
