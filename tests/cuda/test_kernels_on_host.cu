// The fused pack/unpack kernels' per-thread code, run on the host: every chunk of a launch, every thread
// of its block, through the same copy_chunk() the kernels call. No GPU is needed (built with nvcc, run
// on the CPU), so this checks the chunk numbering, the slot search, the vector/scalar split at every
// alignment and the unpack rounding on any machine with a CUDA toolkit. The kernels on a real GPU are
// tested against torch by tests/test_cuda.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "../cpp/expect.h"
#include "multi_tensor_copy.cuh"
#include "quantize_blocks.cuh"

#include <cuda_fp8.h>
#include "slot_table.h"

using namespace localsgd_ext::cuda;

namespace {

constexpr unsigned char kBufferPoison = 0xAB;
constexpr unsigned char kTensorPoison = 0xCD;

// Memory with a 16-byte-aligned start, like a CUDA allocation.
struct AlignedBytes {
  std::vector<uint4> words;
  explicit AlignedBytes(size_t bytes) : words((bytes + 15) / 16 + 1) {}
  unsigned char* data() { return reinterpret_cast<unsigned char*>(words.data()); }
  size_t size() const { return words.size() * sizeof(uint4); }
};

// A tensor placed `misalign` elements past an aligned start, with poisoned slack on both sides.
struct HostTensor {
  AlignedBytes storage;
  int64_t misalign;
  int64_t numel;
  HostTensor(int64_t numel_, int64_t misalign_, size_t element_size)
      : storage((numel_ + misalign_ + 8) * element_size), misalign(misalign_), numel(numel_) {}
  template <typename T>
  T* elements() {
    return reinterpret_cast<T*>(storage.data()) + misalign;
  }
};

// Every byte of `t`'s storage outside its elements still holds the poison.
bool slack_untouched(HostTensor& t, size_t element_size) {
  const unsigned char* bytes = t.storage.data();
  const size_t first = t.misalign * element_size;
  const size_t last = first + t.numel * element_size;
  bool untouched = true;
  for (size_t b = 0; b < t.storage.size(); ++b) {
    untouched &= (b >= first && b < last) || bytes[b] == kTensorPoison;
  }
  return untouched;
}

// Every byte of the buffer outside the slots (`in_slot` false) still holds the poison.
bool padding_untouched(AlignedBytes& buffer, const std::vector<bool>& in_slot) {
  bool untouched = true;
  for (size_t b = 0; b < buffer.size(); ++b) {
    untouched &= in_slot[b] || buffer.data()[b] == kBufferPoison;
  }
  return untouched;
}

// What the kernel grid does, one block and one thread at a time.
template <typename TensorElement, typename BufferElement, bool kIntoBuffer, typename Transform>
void run_launch_on_host(const std::vector<TensorSlot>& slots, int64_t total_chunks, void* buffer, const Transform& op) {
  for (int64_t chunk = 0; chunk < total_chunks; ++chunk) {
    for (int thread = 0; thread < kThreadsPerBlock; ++thread) {
      copy_chunk<TensorElement, BufferElement, kIntoBuffer>(slots.data(), static_cast<int64_t>(slots.size()),
                                                            static_cast<BufferElement*>(buffer), chunk, thread,
                                                            kThreadsPerBlock, op);
    }
  }
}

template <typename Element>
void run_copy_on_host(const std::vector<TensorSlot>& slots, int64_t total_chunks, void* buffer, bool into_buffer) {
  if (into_buffer) {
    run_launch_on_host<Element, Element, true>(slots, total_chunks, buffer, CopyBits{});
  } else {
    run_launch_on_host<Element, Element, false>(slots, total_chunks, buffer, CopyBits{});
  }
}

template <typename Element>
Element random_value(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 100.0f);
  return from_opmath<Element>(static_cast<decltype(to_opmath(Element{}))>(normal(rng)));
}

int64_t pick_numel(std::mt19937& rng, int64_t chunk) {
  const int64_t sizes[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 33, chunk - 1, chunk, chunk + 1, 2 * chunk + 3};
  std::uniform_int_distribution<int> pick(0, static_cast<int>(std::size(sizes)));
  const int i = pick(rng);
  if (i == static_cast<int>(std::size(sizes))) {
    return std::uniform_int_distribution<int64_t>(1, 3 * chunk)(rng);
  }
  return sizes[i];
}

// Packs random tensors at random alignments into a poisoned buffer, unpacks into poisoned tensors
// (plain copy when divisor is 1, else the fused reciprocal multiply), and checks every byte.
template <typename Element, typename Word>
void check_pack_and_unpack(std::mt19937& rng, double divisor) {
  static_assert(sizeof(Element) == sizeof(Word));
  using Opmath = decltype(to_opmath(Element{}));
  const int64_t chunk = chunk_elements(sizeof(Element));
  const int count = std::uniform_int_distribution<int>(1, 12)(rng);
  const int64_t per_vector = kVectorBytes / sizeof(Element);

  std::vector<HostTensor> tensors;
  std::vector<int64_t> offsets;
  int64_t cursor = 0;
  for (int i = 0; i < count; ++i) {
    const int64_t numel = pick_numel(rng, chunk);
    // Mostly aligned tensors and slots (the fast path), sometimes off by a few elements.
    const int64_t misalign = std::uniform_int_distribution<int>(0, 3)(rng) == 0
                                 ? std::uniform_int_distribution<int64_t>(1, per_vector - 1)(rng)
                                 : 0;
    tensors.emplace_back(numel, misalign, sizeof(Element));
    cursor = (cursor + per_vector - 1) / per_vector * per_vector;
    if (std::uniform_int_distribution<int>(0, 3)(rng) == 0) {
      cursor += 1;
    }
    offsets.push_back(cursor);
    cursor += numel;
  }
  AlignedBytes buffer((cursor + 1) * sizeof(Element));
  std::memset(buffer.data(), kBufferPoison, buffer.size());

  std::vector<std::vector<Element>> originals;
  std::vector<TensorSlot> slots;
  for (int i = 0; i < count; ++i) {
    HostTensor& t = tensors[i];
    std::memset(t.storage.data(), kTensorPoison, t.storage.size());
    std::vector<Element> values(t.numel);
    for (auto& v : values) {
      v = random_value<Element>(rng);
    }
    std::memcpy(t.elements<Element>(), values.data(), t.numel * sizeof(Element));
    originals.push_back(std::move(values));
    slots.push_back({t.elements<Element>(), offsets[i], t.numel, 0});
  }
  const int64_t total_chunks = assign_chunks(slots.data(), static_cast<int64_t>(slots.size()), chunk);

  run_copy_on_host<Word>(slots, total_chunks, buffer.data(), /*into_buffer=*/true);

  std::vector<bool> in_slot(buffer.size(), false);
  for (int i = 0; i < count; ++i) {
    const unsigned char* slot_bytes = buffer.data() + offsets[i] * sizeof(Element);
    EXPECT(std::memcmp(slot_bytes, originals[i].data(), originals[i].size() * sizeof(Element)) == 0);
    for (size_t b = 0; b < originals[i].size() * sizeof(Element); ++b) {
      in_slot[offsets[i] * sizeof(Element) + b] = true;
    }
  }
  EXPECT(padding_untouched(buffer, in_slot));

  for (HostTensor& t : tensors) {
    std::memset(t.storage.data(), kTensorPoison, t.storage.size());
  }
  const Opmath factor = Opmath(1) / static_cast<Opmath>(divisor);
  if (divisor == 1.0) {
    run_copy_on_host<Word>(slots, total_chunks, buffer.data(), /*into_buffer=*/false);
  } else {
    run_launch_on_host<Element, Element, false>(slots, total_chunks, buffer.data(), MultiplyBy<Opmath>{factor});
  }
  for (int i = 0; i < count; ++i) {
    HostTensor& t = tensors[i];
    std::vector<Element> expected = originals[i];
    if (divisor != 1.0) {
      for (auto& v : expected) {
        v = from_opmath<Element>(to_opmath(v) * factor);
      }
    }
    EXPECT(std::memcmp(t.elements<Element>(), expected.data(), expected.size() * sizeof(Element)) == 0);
    EXPECT(slack_untouched(t, sizeof(Element)));
  }
}

// A 16-bit float format: `mantissa_bits` stored mantissa bits, exponent bias `bias` (float16: 10, 15;
// bfloat16: 7, 127). Written from the definition, apart from the toolkit's intrinsics the kernels use.
struct NarrowFormat {
  int mantissa_bits;
  int bias;
  uint16_t infinity() const { return static_cast<uint16_t>((2 * bias + 1) << mantissa_bits); }
};
constexpr NarrowFormat kHalfFormat{10, 15};
constexpr NarrowFormat kBFloat16Format{7, 127};

template <typename Wire>
constexpr NarrowFormat format_of() {
  return sizeof(Wire) == 2 && std::is_same_v<Wire, __half> ? kHalfFormat : kBFloat16Format;
}

// Round-to-nearest-even of a non-NaN float into the format, in double (exact for float inputs):
// count the value's units in the last place of its binade (or of the subnormal range) and round that.
uint16_t reference_narrow_bits(float value, NarrowFormat format) {
  const uint16_t sign = std::signbit(value) ? 0x8000 : 0;
  const double magnitude = std::fabs(static_cast<double>(value));
  if (std::isinf(magnitude)) {
    return sign | format.infinity();
  }
  if (magnitude == 0.0) {
    return sign;
  }
  int binade = 0;
  std::frexp(magnitude, &binade);
  int exponent = binade - 1; // magnitude in [2^exponent, 2^(exponent + 1))
  const int min_exponent = 1 - format.bias;
  const int ulp_exponent = std::max(exponent, min_exponent) - format.mantissa_bits;
  double units = std::nearbyint(std::ldexp(magnitude, -ulp_exponent)); // ties to even (default mode)
  const double implicit = std::ldexp(1.0, format.mantissa_bits);
  if (exponent < min_exponent) {
    return sign | static_cast<uint16_t>(units); // subnormal (2^m units is the smallest normal: same bits)
  }
  if (units == 2 * implicit) {
    ++exponent;
    units = implicit;
  }
  if (exponent + format.bias >= 2 * format.bias + 1) {
    return sign | format.infinity();
  }
  return sign |
         static_cast<uint16_t>(((exponent + format.bias) << format.mantissa_bits) + static_cast<int>(units - implicit));
}

// The value of a non-NaN code of the format, in double (exact).
double reference_widen(uint16_t bits, NarrowFormat format) {
  const double sign = bits & 0x8000 ? -1.0 : 1.0;
  const int biased = (bits & 0x7FFF) >> format.mantissa_bits;
  const int mantissa = bits & ((1 << format.mantissa_bits) - 1);
  if (biased == 2 * format.bias + 1) {
    return sign * std::numeric_limits<double>::infinity();
  }
  if (biased == 0) {
    return sign * std::ldexp(mantissa, 1 - format.bias - format.mantissa_bits);
  }
  return sign *
         std::ldexp(mantissa + std::ldexp(1.0, format.mantissa_bits), biased - format.bias - format.mantissa_bits);
}

bool is_nan_code(uint16_t bits, NarrowFormat format) { return (bits & 0x7FFF) > format.infinity(); }

// float32 values that exercise the rounding: ordinary ones, random bit patterns over every exponent,
// exact ties between neighbouring codes (which must go to the even one), the largest finite codes and
// the overflow boundary, subnormals, signed zeros, infinities and NaN.
template <typename Wire>
float cast_probe(std::mt19937& rng) {
  constexpr NarrowFormat format = format_of<Wire>();
  std::uniform_int_distribution<uint32_t> bits;
  std::uniform_int_distribution<int> kind(0, 9);
  const uint16_t code = static_cast<uint16_t>(bits(rng) & 0xFFFF);
  switch (kind(rng)) {
    case 0:
    case 1: {
      uint32_t u = bits(rng);
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case 2:
    case 3:
      if (!is_nan_code(code, format) && (code & 0x7FFF) < format.infinity() - 1) {
        return static_cast<float>(0.5 * (reference_widen(code, format) + reference_widen(code + 1, format)));
      }
      return 1.5f;
    case 4:
      return static_cast<float>(reference_widen(static_cast<uint16_t>(format.infinity() - 1), format)) *
             (1.0f + std::uniform_real_distribution<float>(0.0f, 0.002f)(rng));
    case 5:
      return std::ldexp(std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng), -format.bias - 3);
    case 6: {
      const float specials[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
      return specials[bits(rng) % 5];
    }
    default:
      return std::normal_distribution<float>(0.0f, 100.0f)(rng);
  }
}

// The fused casts of a comm_dtype wire: float32 tensors packed into a float16/bfloat16 buffer (times
// `scale`, rounded to nearest even), then unpacked back into float32 (widened, times 1 / divisor in
// float), through the same copy_chunk() schedule, at every alignment and across chunk edges. Every
// byte is checked against the references above; poisoned slack and padding stay untouched.
template <typename Wire>
void check_casts(std::mt19937& rng, float scale, double divisor) {
  constexpr NarrowFormat format = format_of<Wire>();
  const int64_t chunk = chunk_elements(sizeof(Wire)); // chunks count buffer (wire) elements
  const int count = std::uniform_int_distribution<int>(1, 10)(rng);
  std::vector<HostTensor> tensors;
  std::vector<int64_t> offsets;
  std::vector<std::vector<float>> originals;
  std::vector<TensorSlot> slots;
  int64_t cursor = 0;
  for (int i = 0; i < count; ++i) {
    const int64_t numel = pick_numel(rng, chunk);
    const int64_t misalign =
        std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? std::uniform_int_distribution<int64_t>(1, 3)(rng) : 0;
    tensors.emplace_back(numel, misalign, sizeof(float));
    cursor = (cursor + 7) / 8 * 8;
    if (std::uniform_int_distribution<int>(0, 3)(rng) == 0) {
      cursor += std::uniform_int_distribution<int64_t>(1, 7)(rng);
    }
    offsets.push_back(cursor);
    cursor += numel;
  }
  AlignedBytes buffer((cursor + 1) * sizeof(Wire));
  std::memset(buffer.data(), kBufferPoison, buffer.size());
  for (int i = 0; i < count; ++i) {
    HostTensor& t = tensors[i];
    std::memset(t.storage.data(), kTensorPoison, t.storage.size());
    std::vector<float> values(t.numel);
    for (float& v : values) {
      v = cast_probe<Wire>(rng);
    }
    std::memcpy(t.elements<float>(), values.data(), t.numel * sizeof(float));
    originals.push_back(std::move(values));
    slots.push_back({t.elements<float>(), offsets[i], t.numel, 0});
  }
  const int64_t total_chunks = assign_chunks(slots.data(), static_cast<int64_t>(slots.size()), chunk);

  run_launch_on_host<float, Wire, true>(slots, total_chunks, buffer.data(), NarrowScaled<Wire>{scale});
  std::vector<bool> in_slot(buffer.size(), false);
  for (int i = 0; i < count; ++i) {
    const unsigned char* slot_bytes = buffer.data() + offsets[i] * sizeof(Wire);
    bool all_equal = true;
    for (int64_t k = 0; k < tensors[i].numel; ++k) {
      uint16_t got;
      std::memcpy(&got, slot_bytes + k * sizeof(Wire), 2);
      const float scaled = originals[i][k] * scale;
      all_equal &= std::isnan(scaled) ? is_nan_code(got, format) : got == reference_narrow_bits(scaled, format);
      in_slot[offsets[i] * sizeof(Wire) + 2 * k] = in_slot[offsets[i] * sizeof(Wire) + 2 * k + 1] = true;
    }
    EXPECT(all_equal);
  }
  EXPECT(padding_untouched(buffer, in_slot));

  for (HostTensor& t : tensors) {
    std::memset(t.storage.data(), kTensorPoison, t.storage.size());
  }
  const float factor = 1.0f / static_cast<float>(divisor);
  if (divisor == 1.0) {
    run_launch_on_host<float, Wire, false>(slots, total_chunks, buffer.data(), Widen{});
  } else {
    run_launch_on_host<float, Wire, false>(slots, total_chunks, buffer.data(), WidenMultiplied{factor});
  }
  for (int i = 0; i < count; ++i) {
    HostTensor& t = tensors[i];
    const unsigned char* slot_bytes = buffer.data() + offsets[i] * sizeof(Wire);
    bool all_equal = true;
    for (int64_t k = 0; k < t.numel; ++k) {
      uint16_t code;
      std::memcpy(&code, slot_bytes + k * sizeof(Wire), 2);
      const float got = t.elements<float>()[k];
      if (is_nan_code(code, format)) {
        all_equal &= std::isnan(got);
        continue;
      }
      const float widened = static_cast<float>(reference_widen(code, format)); // exact in float
      const float expected = divisor == 1.0 ? widened : widened * factor;
      all_equal &= std::memcmp(&got, &expected, sizeof(float)) == 0;
    }
    EXPECT(all_equal);
    EXPECT(slack_untouched(t, sizeof(float)));
  }
}

// The references themselves, on values whose codes are known.
void check_cast_references() {
  EXPECT(reference_narrow_bits(1.0f, kHalfFormat) == 0x3C00 && reference_narrow_bits(-2.0f, kHalfFormat) == 0xC000);
  EXPECT(reference_narrow_bits(65504.0f, kHalfFormat) == 0x7BFF &&
         reference_narrow_bits(65520.0f, kHalfFormat) == 0x7C00);
  EXPECT(reference_narrow_bits(65519.0f, kHalfFormat) == 0x7BFF);
  EXPECT(reference_narrow_bits(std::ldexp(1.0f, -24), kHalfFormat) == 0x0001);
  EXPECT(reference_narrow_bits(std::ldexp(1.0f, -25), kHalfFormat) == 0x0000);        // a tie: to even (zero)
  EXPECT(reference_narrow_bits(std::ldexp(3.0f, -25), kHalfFormat) == 0x0002);        // a tie: to even (two units)
  EXPECT(reference_narrow_bits(1.0f + std::ldexp(1.0f, -11), kHalfFormat) == 0x3C00); // a tie: to even
  EXPECT(reference_narrow_bits(1.0f, kBFloat16Format) == 0x3F80 &&
         reference_narrow_bits(-0.0f, kBFloat16Format) == 0x8000);
  EXPECT(reference_narrow_bits(1.0f + std::ldexp(1.0f, -8), kBFloat16Format) == 0x3F80);
  EXPECT(reference_narrow_bits(1.0f + std::ldexp(3.0f, -8), kBFloat16Format) == 0x3F82);
  EXPECT(reference_widen(0x3C00, kHalfFormat) == 1.0 && reference_widen(0x0001, kHalfFormat) == std::ldexp(1.0, -24));
  EXPECT(reference_widen(0x7BFF, kHalfFormat) == 65504.0 && reference_widen(0xBF80, kBFloat16Format) == -1.0);
  // The bf16 reference agrees with the integer round-to-nearest-even trick over random bit patterns.
  std::mt19937 rng(99);
  std::uniform_int_distribution<uint32_t> bits;
  bool agree = true;
  for (int i = 0; i < 100000; ++i) {
    const uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (f == f) {
      agree &=
          reference_narrow_bits(f, kBFloat16Format) == static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
  EXPECT(agree);
}

void check_slot_search() {
  // Sizes 1, chunk, chunk + 1 and 5 with a chunk of 4: chunks 0 | 1 | 2 3 | 4 5.
  std::vector<TensorSlot> slots = {{nullptr, 0, 1, -1}, {nullptr, 0, 4, -1}, {nullptr, 0, 5, -1}, {nullptr, 0, 5, -1}};
  EXPECT(assign_chunks(slots.data(), 4, 4) == 6);
  EXPECT(slots[0].first_chunk == 0 && slots[1].first_chunk == 1 && slots[2].first_chunk == 2 &&
         slots[3].first_chunk == 4);
  const int64_t owner[] = {0, 1, 2, 2, 3, 3};
  for (int64_t c = 0; c < 6; ++c) {
    EXPECT(find_slot(slots.data(), 4, c) == owner[c]);
  }
  EXPECT(find_slot(slots.data(), 1, 0) == 0);
  for (int64_t size : {1, 2, 4, 8}) {
    EXPECT(chunk_elements(size) * size == kChunkBytes);
    EXPECT(chunk_elements(size) % (kVectorBytes / size) == 0);
  }
}

// The toolkit's bf16 rounding on the host is round-to-nearest-even, like c10::BFloat16 and the device.
void check_bfloat16_rounding(std::mt19937& rng) {
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 100000; ++i) {
    uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (f != f) {
      continue;
    }
    const uint16_t expected = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    const __nv_bfloat16 rounded = from_opmath<__nv_bfloat16>(f);
    uint16_t got;
    std::memcpy(&got, &rounded, 2);
    EXPECT(got == expected);
  }
}

// The quantize kernel's schedule on the host: each thread's partial max, the shared-memory tree, then
// each thread's codes; checked against a plain reference (max |x| / 127, nearest-even codes).
void check_quantize_blocks(std::mt19937& rng, int64_t block_size, int64_t num_blocks) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(block_size * num_blocks);
  for (float& v : x) {
    v = normal(rng);
  }
  x[0] = 0.0f;
  if (num_blocks > 1) {
    std::fill(x.begin() + block_size, x.begin() + 2 * block_size, 0.0f); // an all-zero block
  }
  if (num_blocks > 2) {
    x[2 * block_size + block_size / 2] = std::numeric_limits<float>::quiet_NaN();
  }
  if (num_blocks > 3) {
    x[3 * block_size] = -std::numeric_limits<float>::infinity();
  }
  if (num_blocks > 4 && block_size >= 4) { // max 127, so scale 1 exactly: ties round to even
    float* b = x.data() + 4 * block_size;
    std::fill(b, b + block_size, 0.0f);
    b[0] = 127.0f, b[1] = 2.5f, b[2] = 3.5f, b[3] = -2.5f;
  }
  std::vector<int8_t> codes(x.size(), 99);
  std::vector<float> scales(num_blocks, -1.0f);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const float* block = x.data() + b * block_size;
    float partial[kQuantizeThreads];
    for (int thread = 0; thread < kQuantizeThreads; ++thread) {
      partial[thread] = partial_max_magnitude(block, block_size, thread, kQuantizeThreads);
    }
    for (int stride = kQuantizeThreads / 2; stride > 0; stride /= 2) {
      for (int thread = 0; thread < stride; ++thread) {
        partial[thread] = localsgd_ext::quantize::max_magnitude(partial[thread], partial[thread + stride]);
      }
    }
    scales[b] = localsgd_ext::quantize::block_scale<localsgd_ext::quantize::Int8Codec>(partial[0]);
    for (int thread = 0; thread < kQuantizeThreads; ++thread) {
      write_codes<localsgd_ext::quantize::Int8Codec>(block, codes.data() + b * block_size, block_size, scales[b],
                                                     thread, kQuantizeThreads);
    }
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    float magnitude = 0.0f;
    bool has_nan = false;
    for (int64_t k = 0; k < block_size; ++k) {
      has_nan |= std::isnan(x[b * block_size + k]);
      magnitude = std::max(magnitude, std::fabs(x[b * block_size + k]));
    }
    const float expected_scale = magnitude / 127.0f;
    EXPECT(has_nan ? std::isnan(scales[b]) : scales[b] == expected_scale);
    for (int64_t k = 0; k < block_size; ++k) {
      const float v = x[b * block_size + k];
      int8_t expected = 0;
      if (std::isfinite(expected_scale) && expected_scale > 0.0f && !has_nan) {
        expected = static_cast<int8_t>(std::clamp(std::nearbyint(v / expected_scale), -127.0f, 127.0f));
      }
      EXPECT(codes[b * block_size + k] == expected);
    }
  }
  if (num_blocks > 4 && block_size >= 4) {
    const int8_t* ties = codes.data() + 4 * block_size;
    EXPECT(scales[4] == 1.0f && ties[0] == 127 && ties[1] == 2 && ties[2] == 4 && ties[3] == -2);
  }

  // Dequantize three rows (this one and two more) and average them, element by element as the kernel does.
  const int64_t rows = 3, length = block_size * num_blocks;
  std::vector<int8_t> all_codes(rows * length);
  std::vector<float> all_scales(rows * num_blocks);
  std::uniform_int_distribution<int> code(-127, 127);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < length; ++k) {
      all_codes[r * length + k] = r == 0 ? codes[k] : static_cast<int8_t>(code(rng));
    }
    for (int64_t b = 0; b < num_blocks; ++b) {
      all_scales[r * num_blocks + b] = r == 0 ? scales[b] : std::fabs(normal(rng));
    }
  }
  for (int64_t k = 0; k < length; ++k) {
    const int64_t b = k / block_size;
    float sum = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      // Each row scaled by 1/3 before the sum, so that rows of finite values cannot overflow it.
      sum = sum + static_cast<float>(all_codes[r * length + k]) * (all_scales[r * num_blocks + b] / 3.0f);
    }
    const float got = dequantized_sum_at<localsgd_ext::quantize::Int8Codec>(all_codes.data(), all_scales.data(), rows,
                                                                            length, block_size, 3.0f, k);
    EXPECT((std::isnan(sum) && std::isnan(got)) || got == sum);
  }
}

// quantize_change's schedule on the host (each thread's partial max of the change, the tree, each thread's
// codes and residual), against the references of check_quantize_blocks applied to the change computed
// apart; then apply_quantized_mean's element function against anchor + code * scale.
// A snapshot, an anchor and a small residual of n random elements each.
struct ChangeInputs {
  std::vector<float> snapshot, anchor, residual;
};

ChangeInputs change_inputs(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  ChangeInputs inputs{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
  for (int64_t k = 0; k < n; ++k) {
    inputs.snapshot[k] = normal(rng), inputs.anchor[k] = normal(rng), inputs.residual[k] = 0.01f * normal(rng);
  }
  return inputs;
}

// quantize_change's block max as the kernel computes it: each thread's partial max of the change, then the
// shared-memory tree.
float block_max_change(const float* snapshot, const float* anchor, const float* residual, int64_t block_size) {
  float partial[kQuantizeThreads];
  for (int thread = 0; thread < kQuantizeThreads; ++thread) {
    partial[thread] = partial_max_change(snapshot, anchor, residual, block_size, thread, kQuantizeThreads);
  }
  for (int stride = kQuantizeThreads / 2; stride > 0; stride /= 2) {
    for (int thread = 0; thread < stride; ++thread) {
      partial[thread] = localsgd_ext::quantize::max_magnitude(partial[thread], partial[thread + stride]);
    }
  }
  return partial[0];
}

void check_quantize_change(std::mt19937& rng, int64_t block_size, int64_t num_blocks) {
  using localsgd_ext::quantize::Int8Codec;
  const int64_t n = block_size * num_blocks;
  auto [snapshot, anchor, residual] = change_inputs(rng, n);
  std::copy(anchor.begin(), anchor.begin() + block_size, snapshot.begin()); // a block that did not move...
  std::fill(residual.begin(), residual.begin() + block_size, 0.0f);         // ...and has nothing left over
  if (num_blocks > 1) {
    snapshot[block_size + block_size / 2] = std::numeric_limits<float>::quiet_NaN();
  }
  std::vector<float> change(n);
  for (int64_t k = 0; k < n; ++k) {
    change[k] = (snapshot[k] - anchor[k]) + residual[k];
  }
  std::vector<int8_t> codes(n, 99);
  std::vector<float> scales(num_blocks, -1.0f);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t first = b * block_size;
    scales[b] = localsgd_ext::quantize::block_scale<Int8Codec>(
        block_max_change(snapshot.data() + first, anchor.data() + first, residual.data() + first, block_size));
    for (int thread = 0; thread < kQuantizeThreads; ++thread) {
      write_change_codes<Int8Codec>(snapshot.data() + first, anchor.data() + first, residual.data() + first,
                                    codes.data() + first, block_size, scales[b], thread, kQuantizeThreads);
    }
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    float magnitude = 0.0f;
    bool has_nan = false;
    for (int64_t k = b * block_size; k < (b + 1) * block_size; ++k) {
      has_nan |= std::isnan(change[k]);
      magnitude = std::max(magnitude, std::fabs(change[k]));
    }
    const float expected_scale = magnitude / 127.0f;
    EXPECT(has_nan ? std::isnan(scales[b]) : scales[b] == expected_scale);
    for (int64_t k = b * block_size; k < (b + 1) * block_size; ++k) {
      int8_t expected = 0;
      if (std::isfinite(expected_scale) && expected_scale > 0.0f && !has_nan) {
        expected = static_cast<int8_t>(std::clamp(std::nearbyint(change[k] / expected_scale), -127.0f, 127.0f));
      }
      EXPECT(codes[k] == expected);
      const float left_out = change[k] - static_cast<float>(expected) * scales[b];
      EXPECT((std::isnan(left_out) && std::isnan(residual[k])) || residual[k] == left_out);
      const float moved = moved_anchor_at<Int8Codec>(codes.data(), scales.data(), anchor.data(), block_size, k);
      const float expected_anchor = anchor[k] + static_cast<float>(codes[k]) * scales[b];
      EXPECT((std::isnan(moved) && std::isnan(expected_anchor)) || moved == expected_anchor);
    }
  }
  EXPECT(scales[0] == 0.0f); // the block that did not move sends nothing
}

// requantize_mean's schedule on the host: each thread's partial max of the rows' mean, the tree, each
// thread's codes; against check_quantize_blocks' reference applied to the mean computed element by element.
void check_requantize_mean(std::mt19937& rng, int64_t block_size, int64_t num_blocks, int64_t rows) {
  using localsgd_ext::quantize::Int8Codec;
  const int64_t length = block_size * num_blocks;
  std::uniform_int_distribution<int> code(-127, 127);
  std::uniform_real_distribution<float> scale(0.0f, 2.0f);
  std::vector<int8_t> codes(rows * length);
  std::vector<float> scales(rows * num_blocks);
  for (int8_t& c : codes) {
    c = static_cast<int8_t>(code(rng));
  }
  for (float& s : scales) {
    s = scale(rng);
  }
  for (int64_t r = 0; r < rows; ++r) {
    scales[r * num_blocks] = 0.0f; // block 0 is all zero on every row
  }
  std::vector<int8_t> mean_codes(length, 99);
  std::vector<float> mean_scales(num_blocks, -1.0f);
  for (int64_t b = 0; b < num_blocks; ++b) {
    float partial[kQuantizeThreads];
    for (int thread = 0; thread < kQuantizeThreads; ++thread) {
      partial[thread] = partial_max_mean<Int8Codec>(codes.data(), scales.data(), rows, length, block_size, b, thread,
                                                    kQuantizeThreads);
    }
    for (int stride = kQuantizeThreads / 2; stride > 0; stride /= 2) {
      for (int thread = 0; thread < stride; ++thread) {
        partial[thread] = localsgd_ext::quantize::max_magnitude(partial[thread], partial[thread + stride]);
      }
    }
    mean_scales[b] = localsgd_ext::quantize::block_scale<Int8Codec>(partial[0]);
    for (int thread = 0; thread < kQuantizeThreads; ++thread) {
      write_mean_codes<Int8Codec>(codes.data(), scales.data(), rows, length, block_size, b, mean_scales[b],
                                  mean_codes.data(), thread, kQuantizeThreads);
    }
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    std::vector<float> mean(block_size);
    float magnitude = 0.0f;
    for (int64_t k = 0; k < block_size; ++k) {
      float sum = 0.0f;
      for (int64_t r = 0; r < rows; ++r) {
        sum = sum + static_cast<float>(codes[r * length + b * block_size + k]) *
                        (scales[r * num_blocks + b] / static_cast<float>(rows));
      }
      mean[k] = sum;
      magnitude = std::max(magnitude, std::fabs(sum));
    }
    const float expected_scale = magnitude / 127.0f;
    EXPECT(mean_scales[b] == expected_scale);
    for (int64_t k = 0; k < block_size; ++k) {
      const int8_t expected =
          expected_scale > 0.0f
              ? static_cast<int8_t>(std::clamp(std::nearbyint(mean[k] / expected_scale), -127.0f, 127.0f))
              : int8_t{0};
      EXPECT(mean_codes[b * block_size + k] == expected);
    }
  }
  EXPECT(mean_scales[0] == 0.0f);
}

// The e4m3 codec against the CUDA toolkit's own conversions (cuda_fp8.h, callable on the host): every
// code decodes to the toolkit's value, and floats in -448..448 (random, every code's value, the ties
// halfway between neighbours, subnormals) encode to the toolkit's saturating round-to-nearest-even code.
void check_e4m3_codec(std::mt19937& rng) {
  using localsgd_ext::quantize::E4M3Codec;
  auto toolkit_code = [](float v) { return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3)); };
  auto toolkit_value = [](uint8_t code) { return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3))); };
  std::vector<float> probes = {0.0f, -0.0f, 448.0f, -448.0f, 1.0f, 0.001953125f, 0.0009765625f, 0.0029296875f};
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) {
      // Never produced, but a NaN code received must stay NaN (not decode as 480).
      EXPECT(std::isnan(E4M3Codec::decode(static_cast<uint8_t>(code))));
      continue;
    }
    const float value = toolkit_value(static_cast<uint8_t>(code));
    EXPECT(E4M3Codec::decode(static_cast<uint8_t>(code)) == value || (value == 0.0f && code == 0x80));
    probes.push_back(value);
    if ((code & 0x7f) < 0x7e) { // the tie with the next code up
      const float next = toolkit_value(static_cast<uint8_t>(code + 1));
      probes.push_back(0.5f * (value + next));
    }
  }
  std::uniform_real_distribution<float> uniform(-448.0f, 448.0f);
  std::uniform_real_distribution<float> tiny(-0.02f, 0.02f);
  for (int i = 0; i < 200000; ++i) {
    probes.push_back(i % 2 ? uniform(rng) : tiny(rng));
  }
  for (float v : probes) {
    EXPECT(E4M3Codec::from_float(v) == toolkit_code(v));
  }
}

// int4: the kernels' schedule with each thread writing whole bytes (two codes), against codes computed one
// by one with the int8 rounding clamped to +-7; the residual with it; and the packed codes read back.
void check_int4_schedule(std::mt19937& rng, int64_t block_size, int64_t num_blocks) {
  using localsgd_ext::quantize::Int4Codec;
  const int64_t n = block_size * num_blocks;
  auto [snapshot, anchor, residual] = change_inputs(rng, n);
  std::fill(snapshot.begin(), snapshot.begin() + block_size, 0.0f);
  std::fill(anchor.begin(), anchor.begin() + block_size, 0.0f);
  std::fill(residual.begin(), residual.begin() + block_size, 0.0f); // an all-zero change
  const std::vector<float> residual_before = residual;
  std::vector<uint8_t> codes(n / 2, 0xAA);
  std::vector<float> scales(num_blocks);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t first = b * block_size;
    scales[b] = localsgd_ext::quantize::block_scale<Int4Codec>(
        block_max_change(snapshot.data() + first, anchor.data() + first, residual.data() + first, block_size));
    for (int thread = 0; thread < kQuantizeThreads; ++thread) {
      write_change_codes<Int4Codec>(snapshot.data() + first, anchor.data() + first, residual.data() + first,
                                    localsgd_ext::quantize::storage_at<Int4Codec>(codes.data(), first), block_size,
                                    scales[b], thread, kQuantizeThreads);
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    const float scale = scales[k / block_size];
    const float change = snapshot[k] - anchor[k] + residual_before[k];
    int8_t expected = 0;
    if (scale > 0.0f) {
      expected = static_cast<int8_t>(std::clamp(std::nearbyint(change / scale), -7.0f, 7.0f));
    }
    EXPECT(Int4Codec::load(codes.data(), k) == expected);
    EXPECT(residual[k] == change - static_cast<float>(expected) * scale);
  }
  EXPECT(scales[0] == 0.0f);
}

} // namespace

int main() {
  std::mt19937 rng(1234);
  check_slot_search();
  check_bfloat16_rounding(rng);
  for (int round = 0; round < 8; ++round) {
    for (double divisor : {1.0, 2.0, 3.0, 7.0}) {
      check_pack_and_unpack<float, uint32_t>(rng, divisor);
      check_pack_and_unpack<double, uint64_t>(rng, divisor);
      check_pack_and_unpack<__half, uint16_t>(rng, divisor);
      check_pack_and_unpack<__nv_bfloat16, uint16_t>(rng, divisor);
    }
  }
  check_cast_references();
  for (int round = 0; round < 6; ++round) {
    for (double divisor : {1.0, 2.0, 3.0, 7.0}) {
      for (float scale : {1.0f, 0.5f, 0.0009765625f}) {
        check_casts<__half>(rng, scale, divisor);
        check_casts<__nv_bfloat16>(rng, scale, divisor);
      }
    }
  }
  check_e4m3_codec(rng);
  for (int64_t block_size : {1, 7, 256, 300, 1024}) {
    check_quantize_blocks(rng, block_size, 6);
    check_quantize_change(rng, block_size, 4);
    for (int64_t rows : {1, 2, 3}) {
      check_requantize_mean(rng, block_size, 3, rows);
    }
  }
  for (int64_t block_size : {2, 256, 300, 1024}) {
    check_int4_schedule(rng, block_size, 5);
  }
  return localsgd_ext::testing::finish_tests("multi-tensor pack/unpack and int8/e4m3/int4 quantization on the host");
}
