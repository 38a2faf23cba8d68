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
__host__ __device__ inline __half from_opmath<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__host__ __device__ inline __nv_bfloat16 from_opmath<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__host__ __device__ inline float from_opmath<float>(float x) {
  return x;
}
template <typename T>
__host__ __device__ T from_opmath(double x);
template <>
__host__ __device__ inline double from_opmath<double>(double x) {
  return x;
}

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

// Pack onto a narrower wire (comm_dtype): a float32 element times `scale` in float, rounded to nearest
// even into the wire's type, as `(tensor * scale).to(dtype)` does on a CUDA device (torch's bf16/fp16
// conversions there are these same intrinsics).
template <typename Wire>
struct NarrowScaled {
  float scale;
  __host__ __device__ Wire operator()(float x) const { return from_opmath<Wire>(x * scale); }
};

// Unpack from a narrower wire: widened to float32 exactly (`slot.float()`).
struct Widen {
  template <typename Wire>
  __host__ __device__ float operator()(Wire x) const {
    return to_opmath(x);
  }
};

// ... and times 1 / divisor in float, as `slot.float() / divisor` evaluates on CUDA.
struct WidenMultiplied {
  float factor;
  template <typename Wire>
  __host__ __device__ float operator()(Wire x) const {
    return to_opmath(x) * factor;
  }
};

template <int Bytes>
struct VectorOf;
template <>
struct VectorOf<16> {
  using type = uint4;
};
template <>
struct VectorOf<8> {
  using type = uint2;
};

// Moves `count` elements from src to dst through `op` (which may change the type: a cast), this
// thread's share of `threads`. Vectors of 16 bytes on the wider side (8 on the narrower side of a
// cast) when both ends are aligned to their vector, then the tail (or everything, if misaligned) one
// element at a time; consecutive threads touch consecutive addresses either way.
template <typename Src, typename Dst, typename Transform>
__host__ __device__ inline void copy_run(const Src* src, Dst* dst, int64_t count, int thread, int threads,
                                         const Transform& op) {
  constexpr int kWider = sizeof(Src) > sizeof(Dst) ? static_cast<int>(sizeof(Src)) : static_cast<int>(sizeof(Dst));
  constexpr int kPerVector = kVectorBytes / kWider;
  static_assert(kPerVector * kWider == kVectorBytes, "element size must divide 16");
  using SrcVector = typename VectorOf<kPerVector* static_cast<int>(sizeof(Src))>::type;
  using DstVector = typename VectorOf<kPerVector* static_cast<int>(sizeof(Dst))>::type;
  int64_t scalar_start = 0;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % sizeof(SrcVector) == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % sizeof(DstVector) == 0;
  if (aligned) {
    const int64_t vectors = count / kPerVector;
    const SrcVector* src_vectors = reinterpret_cast<const SrcVector*>(src);
    DstVector* dst_vectors = reinterpret_cast<DstVector*>(dst);
    for (int64_t base = thread; base < vectors; base += static_cast<int64_t>(threads) * kVectorsInFlight) {
      SrcVector loaded[kVectorsInFlight];
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
          Src parts[kPerVector];
          memcpy(parts, &loaded[k], sizeof(SrcVector));
          Dst results[kPerVector];
#pragma unroll
          for (int e = 0; e < kPerVector; ++e) {
            results[e] = op(parts[e]);
          }
          DstVector stored;
          memcpy(&stored, results, sizeof(DstVector));
          dst_vectors[v] = stored;
        }
      }
    }
    scalar_start = vectors * kPerVector;
  }
  for (int64_t i = scalar_start + thread; i < count; i += threads) {
    dst[i] = op(src[i]);
  }
}

// One chunk of a launch: finds its tensor, then copies that stretch in the launch's direction. Chunks
// count buffer elements (the host numbers them with the buffer's element size).
template <typename TensorElement, typename BufferElement, bool kIntoBuffer, typename Transform>
__host__ __device__ inline void copy_chunk(const TensorSlot* slots, int64_t num_slots, BufferElement* buffer,
                                           int64_t chunk, int thread, int threads, const Transform& op) {
  const TensorSlot& slot = slots[find_slot(slots, num_slots, chunk)];
  const int64_t chunk_elems = chunk_elements(static_cast<int64_t>(sizeof(BufferElement)));
  const int64_t start = (chunk - slot.first_chunk) * chunk_elems;
  const int64_t remaining = slot.numel - start;
  const int64_t count = remaining < chunk_elems ? remaining : chunk_elems;
  TensorElement* tensor = static_cast<TensorElement*>(slot.data) + start;
  BufferElement* flat = buffer + slot.buffer_offset + start;
  if constexpr (kIntoBuffer) {
    copy_run(static_cast<const TensorElement*>(tensor), flat, count, thread, threads, op);
  } else {
    copy_run(static_cast<const BufferElement*>(flat), tensor, count, thread, threads, op);
  }
}

} // namespace localsgd_ext::cuda
