// float32 <-> bfloat16 for the bf16 wire's pack and unpack, with the bits of c10::BFloat16: narrowing
// rounds to nearest even and makes every NaN 0x7FC0; widening moves the 16 bits up, NaN payloads
// included. c10's scalar narrowing has a NaN branch that keeps the compiler from vectorizing it (26 ms on
// `wide`'s 26M floats on one core; 20 ms here, vectorized); the widening stores around the cache when asked
// (`stream`; streaming_stores.h, the caller fences): 17 -> 11 ms.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "streaming_stores.h"
#include "vector_clones.h"

namespace localsgd_ext {

// dst[k] = bfloat16(src[k] * scale), as `(tensor * scale).to(torch.bfloat16)`: c10's rounding written
// without its branch, so that the loop vectorizes (8 lanes in the AVX2 clone). Plain stores: streamed,
// this narrowing measured slower (26 against 22 ms on `wide`).
LOCALSGD_VECTOR_CLONES inline void narrow_to_bfloat16(const float* src, c10::BFloat16* dst, int64_t n, float scale) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t k = 0; k < n; ++k) {
    const float value = src[k] * scale;
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    const uint32_t rounded = (bits + ((bits >> 16) & 1u) + 0x7fffu) >> 16;
    out[k] = static_cast<uint16_t>(value != value ? 0x7fc0u : rounded);
  }
}

#if LOCALSGD_STREAMING_STORES

namespace bfloat16_detail {

inline int64_t elements_to_alignment(const void* p, int64_t element_size) {
  return streaming_detail::bytes_to_alignment(p) / element_size;
}

} // namespace bfloat16_detail

// dst[k] = float(src[k]) / divisor, as `slot.float() / divisor`; not divided when `divisor` is 1 (a
// division would quiet a signalling NaN that the widening keeps).
inline void widen_from_bfloat16(const c10::BFloat16* src, float* dst, int64_t n, float divisor, bool stream) {
  const bool divide = divisor != 1.0f;
  const __m128 divisors = _mm_set1_ps(divisor);
  const auto one = [&](int64_t k) {
    const float value = static_cast<float>(src[k]);
    dst[k] = divide ? value / divisor : value;
  };
  int64_t k = 0;
  if (reinterpret_cast<uintptr_t>(dst) % sizeof(float) == 0) {
    for (const int64_t head = std::min(n, bfloat16_detail::elements_to_alignment(dst, 4)); k < head; ++k) {
      one(k);
    }
    for (; k + 4 <= n; k += 4) {
      const __m128i four = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k));
      const __m128 values = _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), four));
      const __m128 out = divide ? _mm_div_ps(values, divisors) : values;
      if (stream) {
        _mm_stream_ps(dst + k, out);
      } else {
        _mm_store_ps(dst + k, out);
      }
    }
  }
  for (; k < n; ++k) {
    one(k);
  }
}

#else

inline void widen_from_bfloat16(const c10::BFloat16* src, float* dst, int64_t n, float divisor, bool /*stream*/) {
  for (int64_t k = 0; k < n; ++k) {
    const float value = static_cast<float>(src[k]);
    dst[k] = divisor != 1.0f ? value / divisor : value;
  }
}

#endif

} // namespace localsgd_ext
