// Building an AveragingPlan from the tensors, and telling when it went stale.
#include "averaging_plan.h"

#include <algorithm>

namespace localsgd_ext {

AveragingPlan::AveragingPlan(const std::vector<at::Tensor>& tensors, int64_t bucket_cap_bytes,
                             std::optional<c10::ScalarType> comm_dtype) {
  for (const at::Tensor& t : tensors) {
    const auto same_group = [&](const TensorGroup& g) {
      return g.dtype == t.scalar_type() && devices[g.device] == t.device();
    };
    size_t group = static_cast<size_t>(std::find_if(groups.begin(), groups.end(), same_group) - groups.begin());
    if (group == groups.size()) {
      auto device = std::find(devices.begin(), devices.end(), t.device());
      if (device == devices.end()) {
        device = devices.insert(devices.end(), t.device());
      }
      const c10::ScalarType wire = comm_dtype && t.scalar_type() == at::kFloat ? *comm_dtype : t.scalar_type();
      groups.push_back({t.scalar_type(), wire, static_cast<size_t>(device - devices.begin())});
    }
    inputs.push_back(
        {static_cast<int64_t>(group), t.numel(), static_cast<int64_t>(c10::elementSize(groups[group].wire_dtype))});
  }
  buckets = plan_buckets(inputs, bucket_cap_bytes, kBucketAlignmentBytes);
  members.reserve(buckets.size());
  for (const Bucket& bucket : buckets) {
    BucketTensors bucket_members;
    for (int64_t index : bucket.tensor_indices) {
      bucket_members.tensors.push_back(tensors[index]);
    }
    bucket_members.offsets = bucket.offsets;
    members.push_back(std::move(bucket_members));
  }
}

bool AveragingPlan::stale(const std::vector<at::Tensor>& tensors) const {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const TensorGroup& group = groups[static_cast<size_t>(inputs[i].group)];
    if (t.numel() != inputs[i].numel || t.scalar_type() != group.dtype || t.device() != devices[group.device]) {
      return true;
    }
  }
  return false;
}

void AveragingPlan::mix_into(WordHash& hash) const {
  hash.mix(buckets.size());
  for (const Bucket& bucket : buckets) {
    hash.mix(static_cast<uint64_t>(bucket.numel));
    hash.mix(static_cast<uint64_t>(group_of(bucket).wire_dtype));
    hash.mix(bucket.tensor_indices.size());
    for (size_t k = 0; k < bucket.tensor_indices.size(); ++k) {
      hash.mix(static_cast<uint64_t>(bucket.tensor_indices[k]));
      hash.mix(static_cast<uint64_t>(bucket.offsets[k]));
    }
  }
}

void bump_versions(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.is_inference()) {
      t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

} // namespace localsgd_ext
