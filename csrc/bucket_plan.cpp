// The bucket planner (see bucket_plan.h); no torch, so ctest checks it in seconds.
#include "bucket_plan.h"

#include <map>
#include <stdexcept>
#include <string>

namespace localsgd_ext {
namespace {

void require(bool condition, const std::string& message) {
  if (!condition) {
    throw std::invalid_argument(message);
  }
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

} // namespace

std::vector<Bucket> plan_buckets(const std::vector<PlanInput>& inputs, int64_t cap_bytes, int64_t alignment_bytes) {
  require(cap_bytes > 0, "cap_bytes must be positive, got " + std::to_string(cap_bytes));
  require(alignment_bytes > 0, "alignment_bytes must be positive, got " + std::to_string(alignment_bytes));

  std::vector<Bucket> closed;
  // One open bucket per group, kept in first-seen order so the output order is deterministic.
  std::vector<Bucket> open;
  std::map<int64_t, size_t> open_slot_of_group;

  for (size_t i = 0; i < inputs.size(); ++i) {
    const PlanInput& in = inputs[i];
    const std::string where = "tensor " + std::to_string(i);
    require(in.numel >= 0, where + ": numel must be non-negative, got " + std::to_string(in.numel));
    require(in.element_size > 0, where + ": element_size must be positive, got " + std::to_string(in.element_size));
    const int64_t index = static_cast<int64_t>(i);

    if (in.numel * in.element_size > cap_bytes) {
      Bucket alone;
      alone.group = in.group;
      alone.element_size = in.element_size;
      alone.numel = in.numel;
      alone.tensor_indices.push_back(index);
      alone.offsets.push_back(0);
      closed.push_back(std::move(alone));
      continue;
    }

    auto found = open_slot_of_group.find(in.group);
    if (found == open_slot_of_group.end()) {
      Bucket fresh;
      fresh.group = in.group;
      fresh.element_size = in.element_size;
      found = open_slot_of_group.emplace(in.group, open.size()).first;
      open.push_back(std::move(fresh));
    }
    Bucket* bucket = &open[found->second];
    require(bucket->element_size == in.element_size, where + ": element_size " + std::to_string(in.element_size) +
                                                         " differs from " + std::to_string(bucket->element_size) +
                                                         " of earlier tensors in group " + std::to_string(in.group));

    // Empty tensors take no room and need no alignment.
    if (in.numel == 0) {
      bucket->tensor_indices.push_back(index);
      bucket->offsets.push_back(bucket->numel);
      continue;
    }
    const int64_t alignment_elements = alignment_bytes % in.element_size == 0 ? alignment_bytes / in.element_size : 1;
    int64_t offset = round_up(bucket->numel, alignment_elements);
    if (bucket->numel > 0 && (offset + in.numel) * in.element_size > cap_bytes) {
      closed.push_back(std::move(*bucket));
      *bucket = Bucket();
      bucket->group = in.group;
      bucket->element_size = in.element_size;
      offset = 0;
    }
    bucket->tensor_indices.push_back(index);
    bucket->offsets.push_back(offset);
    bucket->numel = offset + in.numel;
  }

  for (Bucket& bucket : open) {
    if (!bucket.tensor_indices.empty()) {
      closed.push_back(std::move(bucket));
    }
  }
  return closed;
}

} // namespace localsgd_ext
