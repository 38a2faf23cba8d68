// Digests that ranks compare before averaging: what a list of tensors looks like (count, dtypes,
// shapes), and, where ranks must start from equal values (DiLoCo's anchor), what the tensors hold.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace localsgd_ext {

// A digest over 64-bit words: xor, multiply by a 64-bit odd constant, fold the high half down. Stable
// across processes and builds (unlike std::hash), and one multiply per word: a sync hashes every
// tensor's layout and the plan (2000 tensors: ~20 us).
class WordHash {
 public:
  void mix(uint64_t value) {
    hash_ = (hash_ ^ value) * 0x9E3779B97F4A7C15ULL;
    hash_ ^= hash_ >> 32;
  }
  // 62 bits: the value and its negation both fit in int64, so one MAX all_reduce gives max and min.
  int64_t digest() const { return static_cast<int64_t>(hash_ >> 2); }

 private:
  uint64_t hash_ = 1469598103934665603ULL;
};

// Mixes the count, then each tensor's dtype, rank and sizes.
void mix_layout(WordHash& hash, at::TensorList tensors);
int64_t layout_fingerprint(at::TensorList tensors);

// One 62-bit digest of each tensor's bytes, in its logical (row-major) order; tensors on other
// devices are copied to the host first. Equal digests on two ranks mean equal bits, but for
// collisions.
std::vector<int64_t> content_fingerprints(at::TensorList tensors);

} // namespace localsgd_ext
