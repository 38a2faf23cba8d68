// The work list of one multi-tensor launch, shared by the host code that builds it and the kernel
// that walks it. Plain C++ (no torch, no CUDA runtime calls) so that the glue, the kernels and the
// host-side kernel test all include it.
#pragma once

#include <cstdint>

#include "../host_device.h"

namespace localsgd_ext::cuda {

// One contiguous tensor of a bucket. A launch cuts every tensor into chunks of `chunk_elements`;
// one block copies one chunk at a time, so chunk c belongs to the last slot whose first_chunk <= c.
struct TensorSlot {
  void* data;            // the tensor's first element
  int64_t buffer_offset; // where it lives in the flat buffer, in elements
  int64_t numel;         // at least 1: empty tensors are left out of the table
  int64_t first_chunk;   // chunks owned by the slots before this one
};

// 16 KiB of work per chunk: 256 threads moving one 16-byte vector four times. Small enough that a 4 MB
// bucket spreads over hundreds of blocks, large enough that the per-chunk slot search is noise.
constexpr int64_t kChunkBytes = 16 * 1024;
constexpr int kThreadsPerBlock = 256;

// A multiple of every vector width (16 bytes), so each chunk of an aligned tensor starts aligned.
LOCALSGD_HOST_DEVICE constexpr int64_t chunk_elements(int64_t element_size) { return kChunkBytes / element_size; }

// Numbers the chunks of `slots` in order (fills first_chunk); returns how many there are in all.
inline int64_t assign_chunks(TensorSlot* slots, int64_t num_slots, int64_t chunk_elems) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < num_slots; ++i) {
    slots[i].first_chunk = chunks;
    chunks += (slots[i].numel + chunk_elems - 1) / chunk_elems;
  }
  return chunks;
}

// The slot that owns `chunk`: binary search over the ascending first_chunk values.
LOCALSGD_HOST_DEVICE inline int64_t find_slot(const TensorSlot* slots, int64_t num_slots, int64_t chunk) {
  int64_t lo = 0;
  int64_t hi = num_slots - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (slots[mid].first_chunk <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

} // namespace localsgd_ext::cuda
