// What one thread of a multi-tensor pack/unpack launch does with one chunk. Every function here is
// __host__ __device__: the kernels call them with threadIdx/blockIdx, and tests/cuda/ calls them in
// plain loops on the host to check the indexing, alignment and rounding without a GPU.
// CUDA toolkit headers only (no torch), so nvcc compiles this on a machine whose torch has no CUDA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "slot_table.h"

namespace localsgd_ext::cuda {

constexpr int kVectorBytes = 16;
// Vectors each thread loads before it stores any: several loads in flight per thread hide latency.
constexpr int kVectorsInFlight = 4;

// Pack, and unpack with divisor 1: the bits are moved as they are (NaN payloads too, like copy_).
struct CopyBits {
  template <typename T>
  __host__ __device__ T operator()(T x) const {
    return x;
  }
};

__host__ __device__ inline float to_opmath(__half x) { return __half2float(x); }
__host__ __device__ inline float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ inline float to_opmath(float x) { return x; }
__host__ __device__ inline double to_opmath(double x) { return x; }

template <typename T>
__host__ __device__ T from_opmath(float x);
template <>
__host__ __device__ inline __half from_opmath<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ inline __nv_bfloat16 from_opmath<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__host__ __device__ inline float from_opmath<float>(float x) { return x; }
template <typename T>
__host__ __device__ T from_opmath(double x);
template <>
__host__ __device__ inline double from_opmath<double>(double x) { return x; }

// Unpack after a SUM all_reduce: x * (1 / divisor) computed in Opmath (float for 16-bit types). That is
// how torch evaluates `cuda_tensor / python_number` (a reciprocal multiply), so the fused unpack matches
// the unfused `all_reduce(SUM); t /= world_size` bit for bit on the same device.
template <typename Opmath>
struct MultiplyBy {
  Opmath factor;
  template <typename T>
  __host__ __device__ T operator()(T x) const {
    return from_opmath<T>(to_opmath(x) * factor);
  }
};

// Moves `count` elements from src to dst through `op`, this thread's share of `threads`. Vectors of 16
// bytes when both ends are 16-byte aligned, then the tail (or everything, if misaligned) one element
// at a time; consecutive threads touch consecutive addresses either way.
template <typename Element, typename Transform>
__host__ __device__ inline void copy_run(
    const Element* src, Element* dst, int64_t count, int thread, int threads, const Transform& op) {
  constexpr int kPerVector = kVectorBytes / static_cast<int>(sizeof(Element));
  static_assert(kPerVector * sizeof(Element) == kVectorBytes, "element size must divide 16");
  int64_t scalar_start = 0;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % kVectorBytes == 0 &&
      reinterpret_cast<uintptr_t>(dst) % kVectorBytes == 0;
  if (aligned) {
    const int64_t vectors = count / kPerVector;
    const uint4* src_vectors = reinterpret_cast<const uint4*>(src);
    uint4* dst_vectors = reinterpret_cast<uint4*>(dst);
    for (int64_t base = thread; base < vectors; base += static_cast<int64_t>(threads) * kVectorsInFlight) {
      uint4 loaded[kVectorsInFlight];
#pragma unroll
      for (int k = 0; k < kVectorsInFlight; ++k) {
        const int64_t v = base + static_cast<int64_t>(k) * threads;
        if (v < vectors) {
          loaded[k] = src_vectors[v];
        }
      }
#pragma unroll
      for (int k = 0; k < kVectorsInFlight; ++k) {
        const int64_t v = base + static_cast<int64_t>(k) * threads;
        if (v < vectors) {
          Element parts[kPerVector];
          memcpy(parts, &loaded[k], kVectorBytes);
#pragma unroll
          for (int e = 0; e < kPerVector; ++e) {
            parts[e] = op(parts[e]);
          }
          memcpy(&loaded[k], parts, kVectorBytes);
          dst_vectors[v] = loaded[k];
        }
      }
    }
    scalar_start = vectors * kPerVector;
  }
  for (int64_t i = scalar_start + thread; i < count; i += threads) {
    dst[i] = op(src[i]);
  }
}

// One chunk of a launch: finds its tensor, then copies that stretch in the launch's direction.
template <typename Element, typename Transform>
__host__ __device__ inline void copy_chunk(
    const TensorSlot* slots,
    int64_t num_slots,
    Element* buffer,
    bool into_buffer,
    int64_t chunk,
    int thread,
    int threads,
    const Transform& op) {
  const TensorSlot& slot = slots[find_slot(slots, num_slots, chunk)];
  const int64_t chunk_elems = chunk_elements(static_cast<int64_t>(sizeof(Element)));
  const int64_t start = (chunk - slot.first_chunk) * chunk_elems;
  const int64_t remaining = slot.numel - start;
  const int64_t count = remaining < chunk_elems ? remaining : chunk_elems;
  Element* tensor = static_cast<Element*>(slot.data) + start;
  Element* flat = buffer + slot.buffer_offset + start;
  if (into_buffer) {
    copy_run(tensor, flat, count, thread, threads, op);
  } else {
    copy_run(flat, tensor, count, thread, threads, op);
  }
}

} // namespace localsgd_ext::cuda
