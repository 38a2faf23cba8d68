// Copies whose stores go around the cache (non-temporal stores), for the copies too large to stay in it.
// A plain store first reads the destination's cache line from memory (read-for-ownership) only to
// overwrite it, so a large plain copy moves three bytes of memory traffic per byte copied; a streamed
// copy moves two. On `wide`'s 99 MiB: a copy 16.3 -> 12.1 ms, a copy times 0.5 21.1 -> 12.5 ms (one core
// of the 2-core dev machine). The values computed are those of the plain loops (the same IEEE
// multiplication or division per element), so the bits are too.
//
// Small copies keep plain stores: their destination is read again soon (the staging buffer by the
// collective, the parameters by the next step) and would have stayed in cache.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h> // SSE2: part of every x86-64 CPU, so no runtime dispatch is needed
#define LOCALSGD_STREAMING_STORES 1
#else
#define LOCALSGD_STREAMING_STORES 0
#endif

namespace localsgd_ext {

// From this many bytes per pack or unpack, the destination cannot stay in a core's cache anyway
// (a few MiB of L2 on current x86 servers), and streaming wins.
constexpr int64_t kStreamingBytes = 8 * 1024 * 1024;

inline bool use_streaming_stores(int64_t total_bytes) {
  return LOCALSGD_STREAMING_STORES && total_bytes >= kStreamingBytes;
}

#if LOCALSGD_STREAMING_STORES

namespace streaming_detail {

constexpr uintptr_t kAlignment = 16;

inline int64_t bytes_to_alignment(const void* p) {
  return static_cast<int64_t>((kAlignment - (reinterpret_cast<uintptr_t>(p) % kAlignment)) % kAlignment);
}

// Applies `op` per float until `dst` is 16-byte aligned, streams four floats at a time, then finishes the
// tail; `vector_op` is `op` on four lanes.
template <typename Op, typename VectorOp>
inline void stream_floats(const float* src, float* dst, int64_t n, const Op& op, const VectorOp& vector_op) {
  int64_t k = 0;
  const int64_t head = bytes_to_alignment(dst);
  if (head % static_cast<int64_t>(sizeof(float)) != 0) {
    for (; k < n; ++k) {
      dst[k] = op(src[k]); // a float not aligned to 4 bytes: no aligned stretch to stream
    }
    return;
  }
  for (const int64_t end = std::min<int64_t>(n, head / static_cast<int64_t>(sizeof(float))); k < end; ++k) {
    dst[k] = op(src[k]);
  }
  for (; k + 4 <= n; k += 4) {
    _mm_stream_ps(dst + k, vector_op(_mm_loadu_ps(src + k)));
  }
  for (; k < n; ++k) {
    dst[k] = op(src[k]);
  }
}

} // namespace streaming_detail

// Streamed stores are weakly ordered: a thread fences once after its last one, before anything that
// publishes the memory (joining the other threads, handing a buffer to a collective).
inline void streaming_fence() { _mm_sfence(); }

inline void stream_copy(const char* src, char* dst, int64_t nbytes) {
  int64_t k = std::min<int64_t>(nbytes, streaming_detail::bytes_to_alignment(dst));
  std::memcpy(dst, src, static_cast<size_t>(k));
  for (; k + 16 <= nbytes; k += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
  }
  std::memcpy(dst + k, src + k, static_cast<size_t>(nbytes - k));
}

inline void stream_multiply(const float* src, float* dst, int64_t n, float factor) {
  const __m128 factors = _mm_set1_ps(factor);
  streaming_detail::stream_floats(
      src, dst, n, [factor](float v) { return v * factor; }, [factors](__m128 v) { return _mm_mul_ps(v, factors); });
}

inline void stream_divide(const float* src, float* dst, int64_t n, float divisor) {
  const __m128 divisors = _mm_set1_ps(divisor);
  streaming_detail::stream_floats(
      src, dst, n, [divisor](float v) { return v / divisor; },
      [divisors](__m128 v) { return _mm_div_ps(v, divisors); });
}

#else

inline void streaming_fence() {}

inline void stream_copy(const char* src, char* dst, int64_t nbytes) {
  std::memcpy(dst, src, static_cast<size_t>(nbytes));
}

inline void stream_multiply(const float* src, float* dst, int64_t n, float factor) {
  for (int64_t k = 0; k < n; ++k) {
    dst[k] = src[k] * factor;
  }
}

inline void stream_divide(const float* src, float* dst, int64_t n, float divisor) {
  for (int64_t k = 0; k < n; ++k) {
    dst[k] = src[k] / divisor;
  }
}

#endif

} // namespace localsgd_ext
