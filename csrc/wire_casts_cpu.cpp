// The bf16 and fp16 wires' casts on the CPU (see wire_casts_cpu.h). bfloat16 goes through
// bfloat16_casts.h's vectorized loops; float16 through ATen's kernels for large tensors (built for the
// CPU's vector units, which this extension's scalar fp16 conversion is not: 2-4x slower on `wide`) and
// raw loops for small ones, where ATen's per-call cost (microseconds) outweighs that.
#include "wire_casts_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include "bfloat16_casts.h"
#include "pack_common.h"
#include "streaming_stores.h"

namespace localsgd_ext::cpu {
namespace {

// Elements per task when a cast is spread over intra-op threads.
constexpr int64_t kCastGrain = 64 * 1024;
// From this many elements an fp16 cast goes through ATen.
constexpr int64_t kAtenCastElements = 16 * 1024;

int64_t cast_elements(at::TensorList tensors, const std::vector<size_t>& casts) {
  int64_t total = 0;
  for (size_t i : casts) {
    total += tensors[i].numel();
  }
  return total;
}

} // namespace

void pack_casts(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, double scale,
                const std::vector<size_t>& casts) {
  const float s = static_cast<float>(scale);
  if (buffer.scalar_type() == at::kBFloat16) {
    auto* base = buffer.mutable_data_ptr<c10::BFloat16>();
    for (size_t i : casts) {
      const float* src = tensors[i].const_data_ptr<float>();
      c10::BFloat16* dst = base + offsets[i];
      at::parallel_for(0, tensors[i].numel(), kCastGrain, [&](int64_t begin, int64_t end) {
        narrow_to_bfloat16(src + begin, dst + begin, end - begin, s);
      });
    }
    return;
  }
  auto* base = buffer.mutable_data_ptr<c10::Half>();
  for (size_t i : casts) {
    if (tensors[i].numel() >= kAtenCastElements) {
      // Multiplied in float32 (a power of two: exact), rounded once to float16.
      pack_one_with_aten(tensors[i], offsets[i], buffer, scale);
      continue;
    }
    const float* src = tensors[i].const_data_ptr<float>();
    c10::Half* dst = base + offsets[i];
    at::parallel_for(0, tensors[i].numel(), kCastGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        dst[k] = static_cast<c10::Half>(src[k] * s);
      }
    });
  }
}

void unpack_casts(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors,
                  const std::vector<size_t>& casts) {
  const float d = static_cast<float>(divisor);
  if (buffer.scalar_type() == at::kBFloat16) {
    const auto* base = buffer.const_data_ptr<c10::BFloat16>();
    const bool stream = use_streaming_stores(cast_elements(tensors, casts) * static_cast<int64_t>(sizeof(float)));
    for (size_t i : casts) {
      float* dst = tensors[i].mutable_data_ptr<float>();
      const c10::BFloat16* src = base + offsets[i];
      at::parallel_for(0, tensors[i].numel(), kCastGrain, [&](int64_t begin, int64_t end) {
        widen_from_bfloat16(src + begin, dst + begin, end - begin, d, stream);
        if (stream) {
          streaming_fence();
        }
      });
    }
    return;
  }
  const auto* base = buffer.const_data_ptr<c10::Half>();
  for (size_t i : casts) {
    float* dst = tensors[i].mutable_data_ptr<float>();
    if (tensors[i].numel() >= kAtenCastElements) {
      // Widened by ATen's vectorized copy, then divided in place here, as `slot.float() / divisor`.
      const_cast<at::Tensor&>(tensors[i]).copy_(slot_in_buffer(buffer, offsets[i], tensors[i]));
      if (divisor != 1.0) {
        at::parallel_for(0, tensors[i].numel(), kCastGrain, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            dst[k] = dst[k] / d;
          }
        });
      }
      continue;
    }
    const c10::Half* src = base + offsets[i];
    at::parallel_for(0, tensors[i].numel(), kCastGrain, [&](int64_t begin, int64_t end) {
      if (divisor == 1.0) {
        for (int64_t k = begin; k < end; ++k) {
          dst[k] = static_cast<float>(src[k]);
        }
      } else {
        for (int64_t k = begin; k < end; ++k) {
          dst[k] = static_cast<float>(src[k]) / d;
        }
      }
    });
  }
}

} // namespace localsgd_ext::cpu
