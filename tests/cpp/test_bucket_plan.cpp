// C++ tests of the bucket planner (run by ctest). Self-contained: no test framework to install.
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "bucket_plan.h"
#include "expect.h"

using localsgd_ext::Bucket;
using localsgd_ext::plan_buckets;
using localsgd_ext::PlanInput;

namespace {

constexpr int64_t kMiB = 1 << 20;

std::vector<std::vector<int64_t>> indices(const std::vector<Bucket>& buckets) {
  std::vector<std::vector<int64_t>> out;
  for (const Bucket& b : buckets) {
    out.push_back(b.tensor_indices);
  }
  return out;
}

// Every input exactly once; buckets within the cap unless they hold a single non-empty tensor.
void expect_invariants(const std::vector<PlanInput>& inputs, const std::vector<Bucket>& buckets, int64_t cap) {
  std::vector<int> seen(inputs.size(), 0);
  for (const Bucket& b : buckets) {
    int non_empty = 0;
    for (size_t k = 0; k < b.tensor_indices.size(); ++k) {
      const PlanInput& in = inputs[b.tensor_indices[k]];
      ++seen[b.tensor_indices[k]];
      EXPECT(in.group == b.group);
      EXPECT(b.offsets[k] + in.numel <= b.numel);
      non_empty += in.numel > 0;
    }
    EXPECT(b.nbytes() <= cap || non_empty == 1);
  }
  for (int count : seen) {
    EXPECT(count == 1);
  }
}

void test_uneven_packing() {
  const std::vector<PlanInput> inputs{{0, 100000, 4}, {0, 60000, 4}, {0, 100000, 4}, {0, 30000, 4}};
  const auto buckets = plan_buckets(inputs, kMiB / 2, 16);
  EXPECT((indices(buckets) == std::vector<std::vector<int64_t>>{{0}, {1}, {2, 3}}));
  EXPECT((buckets[2].offsets == std::vector<int64_t>{0, 100000}));
  expect_invariants(inputs, buckets, kMiB / 2);
}

void test_larger_than_cap() {
  const std::vector<PlanInput> inputs{{0, 10, 4}, {0, kMiB, 4}, {0, 10, 4}};
  const auto buckets = plan_buckets(inputs, kMiB, 16);
  EXPECT((indices(buckets) == std::vector<std::vector<int64_t>>{{1}, {0, 2}}));
  EXPECT(buckets[0].numel == kMiB);
  expect_invariants(inputs, buckets, kMiB);
}

void test_mixed_groups_and_alignment() {
  const std::vector<PlanInput> inputs{{0, 3, 4}, {1, 3, 2}, {0, 3, 4}, {1, 1, 2}, {2, 1, 8}};
  const auto buckets = plan_buckets(inputs, kMiB, 16);
  EXPECT((indices(buckets) == std::vector<std::vector<int64_t>>{{0, 2}, {1, 3}, {4}}));
  EXPECT((buckets[0].offsets == std::vector<int64_t>{0, 4})); // 16 bytes = 4 fp32
  EXPECT((buckets[1].offsets == std::vector<int64_t>{0, 8})); // 16 bytes = 8 bf16
  EXPECT(buckets[1].numel == 9);
  expect_invariants(inputs, buckets, kMiB);
}

void test_zero_size() {
  const std::vector<PlanInput> inputs{{0, 0, 4}, {0, 5, 4}, {0, 0, 4}, {1, 0, 2}};
  const auto buckets = plan_buckets(inputs, kMiB, 16);
  EXPECT((indices(buckets) == std::vector<std::vector<int64_t>>{{0, 1, 2}, {3}}));
  EXPECT((buckets[0].offsets == std::vector<int64_t>{0, 0, 5}));
  EXPECT(buckets[1].numel == 0);
  expect_invariants(inputs, buckets, kMiB);
}

void test_many_tiny() {
  std::vector<PlanInput> inputs;
  for (int i = 0; i < 2000; ++i) {
    inputs.push_back({0, i % 2 ? 24 : 576, 4});
  }
  auto buckets = plan_buckets(inputs, 25 * kMiB, 16);
  EXPECT(buckets.size() == 1);
  expect_invariants(inputs, buckets, 25 * kMiB);
  buckets = plan_buckets(inputs, 64 * 1024, 16);
  EXPECT(buckets.size() > 30);
  expect_invariants(inputs, buckets, 64 * 1024);
  EXPECT(indices(buckets) == indices(plan_buckets(inputs, 64 * 1024, 16))); // deterministic
}

void expect_invalid(const std::vector<PlanInput>& inputs, int64_t cap, int64_t alignment, const std::string& text) {
  try {
    plan_buckets(inputs, cap, alignment);
    std::fprintf(stderr, "expected std::invalid_argument containing '%s'\n", text.c_str());
    ++localsgd_ext::testing::failures;
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).find(text) == std::string::npos) {
      std::fprintf(stderr, "message '%s' lacks '%s'\n", e.what(), text.c_str());
      ++localsgd_ext::testing::failures;
    }
  }
}

void test_bad_input() {
  expect_invalid({{0, 1, 4}}, 0, 16, "cap_bytes must be positive, got 0");
  expect_invalid({{0, 1, 4}}, 64, 0, "alignment_bytes must be positive, got 0");
  expect_invalid({{0, -3, 4}}, 64, 16, "tensor 0: numel must be non-negative, got -3");
  expect_invalid({{0, 1, 4}, {0, 1, 0}}, 64, 16, "tensor 1: element_size must be positive, got 0");
}

} // namespace

int main() {
  test_uneven_packing();
  test_larger_than_cap();
  test_mixed_groups_and_alignment();
  test_zero_size();
  test_many_tiny();
  test_bad_input();
  return localsgd_ext::testing::finish_tests("bucket plan");
}
