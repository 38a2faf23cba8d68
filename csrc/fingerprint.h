// Digests that ranks compare before averaging: what a list of tensors looks like (count, dtypes,
// shapes), and, where ranks must start from equal values (DiLoCo's anchor), what the tensors hold.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace localsgd_ext {

// FNV-1a over 64-bit words, byte by byte: stable across processes and builds (unlike std::hash).
class Fnv1a {
 public:
  void mix(uint64_t value) {
    for (int byte = 0; byte < 8; ++byte) {
      hash_ ^= (value >> (8 * byte)) & 0xFF;
      hash_ *= 1099511628211ULL;
    }
  }
  // 62 bits: the value and its negation both fit in int64, so one MAX all_reduce gives max and min.
  int64_t digest() const { return static_cast<int64_t>(hash_ >> 2); }

 private:
  uint64_t hash_ = 1469598103934665603ULL;
};

// Mixes the count, then each tensor's dtype, rank and sizes.
void mix_layout(Fnv1a& hash, at::TensorList tensors);
int64_t layout_fingerprint(at::TensorList tensors);

// One 62-bit digest of each tensor's bytes, in its logical (row-major) order; tensors on other
// devices are copied to the host first. Equal digests on two ranks mean equal bits, but for
// collisions.
std::vector<int64_t> content_fingerprints(at::TensorList tensors);

} // namespace localsgd_ext
