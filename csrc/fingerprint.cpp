// Layout and content digests that ranks compare (see fingerprint.h).
#include "fingerprint.h"

#include "tensor_checks.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace localsgd_ext {
namespace {

// A multiply-xorshift hash over 8-byte words of the bytes, at about memory speed.
// Chunks are hashed in parallel, then their digests are combined in order, so the result does not
// depend on the thread count.
constexpr int64_t kChunkBytes = 1 << 20;

uint64_t hash_bytes(const unsigned char* data, int64_t nbytes) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ static_cast<uint64_t>(nbytes);
  int64_t k = 0;
  for (; k + 8 <= nbytes; k += 8) {
    uint64_t word;
    std::memcpy(&word, data + k, 8);
    h = ((h ^ word) * 0xFF51AFD7ED558CCDULL);
    h ^= h >> 32;
  }
  for (; k < nbytes; ++k) {
    h = (h ^ data[k]) * 0x100000001B3ULL;
  }
  return h;
}

} // namespace

void mix_layout(WordHash& hash, at::TensorList tensors) {
  hash.mix(tensors.size());
  for (const at::Tensor& t : tensors) {
    hash.mix(static_cast<uint64_t>(t.scalar_type()));
    hash.mix(static_cast<uint64_t>(t.dim()));
    for (int64_t size : t.sizes()) {
      hash.mix(static_cast<uint64_t>(size));
    }
  }
}

int64_t layout_fingerprint(at::TensorList tensors) {
  WordHash hash;
  mix_layout(hash, tensors);
  return hash.digest();
}

std::vector<int64_t> content_fingerprints(at::TensorList tensors) {
  std::vector<int64_t> digests;
  digests.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& tensor = tensors[i];
    TORCH_CHECK_VALUE(tensor.defined(), "tensors[", i, "] is undefined.");
    check_not_python_subclass(tensor, "tensors[" + std::to_string(i) + "]");
    const at::Tensor host = tensor.to(at::kCPU).contiguous();
    const auto* bytes = static_cast<const unsigned char*>(host.const_data_ptr());
    const int64_t nbytes = host.numel() * static_cast<int64_t>(host.element_size());
    const int64_t chunks = (nbytes + kChunkBytes - 1) / kChunkBytes;
    std::vector<uint64_t> chunk_hashes(static_cast<size_t>(chunks));
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t offset = c * kChunkBytes;
        chunk_hashes[c] = hash_bytes(bytes + offset, std::min(kChunkBytes, nbytes - offset));
      }
    });
    WordHash hash;
    hash.mix(static_cast<uint64_t>(host.scalar_type()));
    mix_layout(hash, {host});
    for (uint64_t h : chunk_hashes) {
      hash.mix(h);
    }
    digests.push_back(hash.digest());
  }
  return digests;
}

} // namespace localsgd_ext
