// The arithmetic of the quantized wires (per-block scales), written once for the CPU kernel and the CUDA
// kernels (host/device functions), so that both devices quantize and dequantize to the same bits.
// Plain C++: no torch, no CUDA header. Three code formats:
//   Int8Codec: symmetric int8, -127..127 (no -128, so negating a block negates its codes), one byte each;
//   E4M3Codec: float8 e4m3fn (4 exponent bits, 3 mantissa bits, largest 448, no infinities), as bits;
//   Int4Codec: symmetric int4, -7..7, two codes per byte (element 2i in the low nibble, 2i + 1 in the high).
// Each says how its codes are stored: `Storage` holds `kPerStorage` codes, `load(storage, k)` reads code k
// (k counted in elements), `pack` makes one Storage of kPerStorage codes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace localsgd_ext::quantize {

LOCALSGD_HOST_DEVICE inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LOCALSGD_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// One step of a block's max |x|. NaN wins (a block holding one quantizes to a NaN scale and dequantizes
// to NaN), and the result does not depend on the order of the steps, so any reduction tree agrees.
LOCALSGD_HOST_DEVICE inline float max_magnitude(float running, float x) {
  const float magnitude = fabsf(x);
  return (magnitude > running || magnitude != magnitude) ? magnitude : running;
}

// Whether a block's scale gives codes: a zero scale (an all-zero block, or one so small that the
// division underflows) and a non-finite one give codes 0, and the scale alone then carries the block.
LOCALSGD_HOST_DEVICE inline bool scale_gives_codes(float scale) { return scale > 0.0f && scale <= 3.402823466e38f; }

// Round half to even, for |v| <= 2^22, by the float adder itself: once 1.5 * 2^23 is added no fraction
// bits remain, and the addition rounds as IEEE does (to nearest, ties to even), like rintf. Unlike a
// call to rintf it vectorizes on any x86-64 (SSE2 has no rounding instruction).
LOCALSGD_HOST_DEVICE inline float round_half_even(float v) {
  constexpr float kShift = 12582912.0f; // 1.5 * 2^23
  return (v + kShift) - kShift;
}

LOCALSGD_HOST_DEVICE inline float clamp_magnitude(float v, float largest) {
  v = v < -largest ? -largest : v;
  return v > largest ? largest : v;
}

// round-half-even(x / scale), within +-largest, for a scale that gives codes.
LOCALSGD_HOST_DEVICE inline int8_t symmetric_code(float x, float scale, float largest) {
  return static_cast<int8_t>(static_cast<int>(clamp_magnitude(round_half_even(x / scale), largest)));
}

struct Int8Codec {
  using Code = int8_t;
  using Storage = int8_t;
  static constexpr int kPerStorage = 1;
  static constexpr float kLargest = 127.0f;

  LOCALSGD_HOST_DEVICE static Code encode(float x, float scale) { return symmetric_code(x, scale, kLargest); }
  LOCALSGD_HOST_DEVICE static float decode(Code code) { return static_cast<float>(code); }
  LOCALSGD_HOST_DEVICE static Code load(const Storage* storage, int64_t k) { return storage[k]; }
};

struct Int4Codec {
  using Code = int8_t; // one code, -7..7, while it is computed with
  using Storage = uint8_t;
  static constexpr int kPerStorage = 2;
  static constexpr float kLargest = 7.0f;

  LOCALSGD_HOST_DEVICE static Code encode(float x, float scale) { return symmetric_code(x, scale, kLargest); }
  LOCALSGD_HOST_DEVICE static float decode(Code code) { return static_cast<float>(code); }
  // The nibble, sign-extended by an arithmetic shift of the byte that holds it in its top bits.
  LOCALSGD_HOST_DEVICE static Code load(const Storage* storage, int64_t k) {
    const uint8_t byte = storage[k >> 1];
    return static_cast<Code>(static_cast<int8_t>((k & 1) ? byte : static_cast<uint8_t>(byte << 4)) >> 4);
  }
  LOCALSGD_HOST_DEVICE static Storage pack(Code low, Code high) {
    return static_cast<Storage>((static_cast<uint8_t>(low) & 0x0fu) | (static_cast<uint8_t>(high) << 4));
  }
};

struct E4M3Codec {
  using Code = uint8_t;
  using Storage = uint8_t;
  static constexpr int kPerStorage = 1;
  static constexpr float kLargest = 448.0f;

  LOCALSGD_HOST_DEVICE static Code load(const Storage* storage, int64_t k) { return storage[k]; }

  // v, finite with |v| <= 448, rounded to the nearest e4m3fn value (ties to even), as bits: the same
  // rounding as torch's `.to(torch.float8_e4m3fn)` and CUDA's __nv_cvt_float_to_fp8 in that range.
  LOCALSGD_HOST_DEVICE static Code from_float(float v) {
    const uint32_t u = float_bits(v);
    const uint32_t sign = (u >> 24) & 0x80u;
    const uint32_t magnitude = u & 0x7fffffffu;
    // Below 2^-6, e4m3's subnormals: steps of 2^-9. A result of 8 steps is 2^-6, whose code is 8 too.
    // Through int32, which (unlike uint32) x86's vector conversions have: the value is 0..8.
    const auto subnormal = static_cast<uint32_t>(static_cast<int32_t>(round_half_even(bits_float(magnitude) * 512.0f)));
    // Above: 23 mantissa bits rounded to 3, ties to even; a carry moves into the exponent, as it should.
    // The float exponent (bias 127) becomes e4m3's (bias 7). Both are computed and one is selected, so
    // that the CPU loop has no branch to keep it from vectorizing.
    const uint32_t rounded = magnitude + 0x7ffffu + ((magnitude >> 20) & 1u);
    const uint32_t normal = (rounded >> 20) - (120u << 3);
    // Compared as int32 (the sign is cleared), for the same reason.
    const bool is_subnormal = static_cast<int32_t>(magnitude) < 0x3c800000;
    return static_cast<Code>(sign | ((is_subnormal ? subnormal : normal) & 0x7fu));
  }

  LOCALSGD_HOST_DEVICE static float decode(Code code) {
    const uint32_t exponent = (code >> 3) & 15u;
    const uint32_t mantissa = code & 7u;
    const float magnitude = exponent == 0 ? static_cast<float>(mantissa) * (1.0f / 512.0f)
                                          : bits_float(((exponent + 120u) << 23) | (mantissa << 20));
    const float value = bits_float(float_bits(magnitude) | (static_cast<uint32_t>(code & 0x80u) << 24));
    // e4m3fn has no infinities: its one code of exponent 15 and mantissa 7 (0x7f, 0xff) is NaN.
    return (code & 0x7fu) == 0x7fu ? bits_float(0x7fc00000u) : value;
  }

  // (x / scale) within +-448, to e4m3, for a scale that gives codes.
  LOCALSGD_HOST_DEVICE static Code encode(float x, float scale) {
    return from_float(clamp_magnitude(x / scale, kLargest));
  }
};

// Where element `element`'s code is stored (element a multiple of Codec::kPerStorage).
template <typename Codec, typename Storage>
LOCALSGD_HOST_DEVICE inline Storage* storage_at(Storage* base, int64_t element) {
  return base + element / Codec::kPerStorage;
}

template <typename Codec>
LOCALSGD_HOST_DEVICE inline float block_scale(float max_magnitude_of_block) {
  return max_magnitude_of_block / Codec::kLargest;
}

// running + value * scale, each operation rounded on its own: no fused multiply-add on the device, so
// that the CPU (which has none without -mfma) and the GPU round alike. 0 * inf and 0 * NaN are NaN: a
// block whose scale is not finite dequantizes to NaN, as it should.
LOCALSGD_HOST_DEVICE inline float add_dequantized(float running, float value, float scale) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(running, __fmul_rn(value, scale));
#else
  return running + value * scale;
#endif
}

// What a rank's quantized wire sends for element k: its change since the anchor, plus (error feedback)
// what earlier quantization left out. `residual` may be null.
LOCALSGD_HOST_DEVICE inline float change_at(const float* snapshot, const float* anchor, const float* residual,
                                            int64_t k) {
  const float change = snapshot[k] - anchor[k];
  return residual == nullptr ? change : change + residual[k];
}

// What a code leaves out of the change it carries: the next residual. Each operation rounded on its
// own (no fused multiply-add on the device), as add_dequantized.
LOCALSGD_HOST_DEVICE inline float left_out(float change, float value, float scale) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(change, __fmul_rn(value, scale));
#else
  return change - value * scale;
#endif
}

// A row's scale for a mean over `divisor` rows: each row is divided before the rows are summed, so that
// the sum of rows whose own values are finite stays finite (2e38 + 2.5e38 would overflow, their mean
// does not).
LOCALSGD_HOST_DEVICE inline float scale_for_mean(float scale, float divisor) {
  return divisor == 1.0f ? scale : scale / divisor;
}

} // namespace localsgd_ext::quantize
