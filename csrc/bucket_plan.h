// Bucket planning: which tensors share a flat buffer, and where each one sits in it.
// Pure C++ (no torch) so the planner is unit-tested by ctest in seconds.
#pragma once

#include <cstdint>
#include <vector>

namespace localsgd_ext {

// What the planner needs to know about one tensor. `group` stands for its (device, dtype) pair:
// only tensors of the same group may share a bucket.
struct PlanInput {
  int64_t group = 0;
  int64_t numel = 0;
  int64_t element_size = 0;
};

struct Bucket {
  int64_t group = 0;
  int64_t element_size = 0;
  // Elements the bucket's flat buffer holds, alignment padding included.
  int64_t numel = 0;
  // Positions in the planner's input, ascending, and each tensor's element offset in the buffer.
  std::vector<int64_t> tensor_indices;
  std::vector<int64_t> offsets;

  int64_t nbytes() const { return numel * element_size; }
};

// Groups `inputs` into buckets of at most `cap_bytes` each, walking them in order, so every rank that
// sees the same inputs builds the same plan. A tensor larger than the cap gets a bucket of its own.
// Each non-empty tensor starts at a multiple of `alignment_bytes` (when its element size divides it)
// so that vectorized kernels can use aligned accesses. Every input lands in exactly one bucket.
// Throws std::invalid_argument on a non-positive cap or alignment, a negative numel, or a
// non-positive element size.
std::vector<Bucket> plan_buckets(const std::vector<PlanInput>& inputs, int64_t cap_bytes, int64_t alignment_bytes);

} // namespace localsgd_ext
