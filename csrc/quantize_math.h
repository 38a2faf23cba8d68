// The arithmetic of the int8 wire (per-block scales), written once for the CPU kernel and the CUDA
// kernels (host/device functions), so that both devices quantize and dequantize to the same bits.
// Plain C++: no torch, no CUDA header.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LOCALSGD_HOST_DEVICE __host__ __device__
#else
#define LOCALSGD_HOST_DEVICE
#endif

namespace localsgd_ext::quantize {

// Symmetric int8: -127..127, so that negating a block negates its codes (no -128).
constexpr float kLevels = 127.0f;

// One step of a block's max |x|. NaN wins (a block holding one quantizes to a NaN scale and dequantizes
// to NaN), and the result does not depend on the order of the steps, so any reduction tree agrees.
LOCALSGD_HOST_DEVICE inline float max_magnitude(float running, float x) {
  const float magnitude = fabsf(x);
  return (magnitude > running || magnitude != magnitude) ? magnitude : running;
}

LOCALSGD_HOST_DEVICE inline float block_scale(float max_magnitude_of_block) {
  return max_magnitude_of_block / kLevels;
}

// Whether a block's scale gives codes: a zero scale (an all-zero block, or one so small that max / 127
// underflows) and a non-finite one give codes 0, and the scale alone then carries the block.
LOCALSGD_HOST_DEVICE inline bool scale_gives_codes(float scale) {
  return scale > 0.0f && scale <= 3.402823466e38f;
}

// Round half to even, for |v| <= 2^22, by the float adder itself: once 1.5 * 2^23 is added no fraction
// bits remain, and the addition rounds as IEEE does (to nearest, ties to even), like rintf. Unlike a
// call to rintf it vectorizes on any x86-64 (SSE2 has no rounding instruction).
LOCALSGD_HOST_DEVICE inline float round_half_even(float v) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  return (v + kShift) - kShift;
}

// round-half-even(x / scale), within +-127, for a scale that gives codes (|x| <= 127 * scale then).
LOCALSGD_HOST_DEVICE inline int8_t quantize_value(float x, float scale) {
  float code = round_half_even(x / scale);
  code = code < -kLevels ? -kLevels : code;
  code = code > kLevels ? kLevels : code;
  return static_cast<int8_t>(static_cast<int>(code));
}

// running + code * scale, each operation rounded on its own: no fused multiply-add on the device, so
// that the CPU (which has none without -mfma) and the GPU round alike.
LOCALSGD_HOST_DEVICE inline float add_dequantized(float running, int8_t code, float scale) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(running, __fmul_rn(static_cast<float>(code), scale));
#else
  return running + static_cast<float>(code) * scale;
#endif
}

// 0 * inf and 0 * NaN are NaN: a block whose scale is not finite dequantizes to NaN, as it should.
LOCALSGD_HOST_DEVICE inline float divide_sum(float sum, float divisor) {
  return divisor == 1.0f ? sum : sum / divisor;
}

} // namespace localsgd_ext::quantize
