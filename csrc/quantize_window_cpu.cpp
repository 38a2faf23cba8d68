// CPU kernels of the quantized wire's window ops: quantize_tensors_change and apply_quantized_mean_to read
// and write the parameters themselves (flat_window.h), a task's blocks at a time, instead of a packed copy
// of them; tensors that are not contiguous take the generic path (quantize_wire_generic.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "flat_window.h"
#include "quantize_cpu_blocks.h"
#include "quantize_window_checks.h"
#include "quantize_wire_generic.h"
#include "vector_clones.h"

namespace localsgd_ext {
namespace {

using namespace cpu;

// One loop over two blocks: the codes (and with error feedback, the residual) of the current block, whose
// scale is known and whose inputs are in cache since its scan, and the scan of the next block, whose
// inputs come from memory. The next block's loads then overlap the current block's arithmetic, instead of
// stalling a loop of their own. Returns the next block's largest magnitude's bits (largest_magnitude_bits).
// The residual pointers are null without error feedback.
template <typename Codec, bool kWithResidual>
LOCALSGD_VECTOR_CLONES int32_t encode_block_and_scan_next(
    const float* __restrict__ snapshot, const float* __restrict__ anchor, float* __restrict__ residual, float scale,
    typename Codec::Storage* __restrict__ codes, const float* __restrict__ next_snapshot,
    const float* __restrict__ next_anchor, const float* __restrict__ next_residual, int64_t block_size) {
  // quantize::change_at's arithmetic, with the residual's presence known at compile time: a pointer tested
  // for null at run time is if-converted into masked loads, which cost a microcode assist each from a
  // null address and are slower than plain loads from any other.
  const auto change_at = [](const float* s, const float* a, const float* r, int64_t k) {
    if constexpr (kWithResidual) {
      return (s[k] - a[k]) + r[k];
    } else {
      return s[k] - a[k];
    }
  };
  int32_t largest_bits = 0;
  for (int64_t k = 0; k < block_size; ++k) {
    const auto bits = static_cast<int32_t>(
        quantize::float_bits(change_at(next_snapshot, next_anchor, next_residual, k)) & 0x7fffffffu);
    largest_bits = bits > largest_bits ? bits : largest_bits;
    const float change = change_at(snapshot, anchor, residual, k);
    const auto code = Codec::encode(change, scale);
    codes[k] = code;
    if constexpr (kWithResidual) {
      residual[k] = quantize::left_out(change, Codec::decode(code), scale);
    }
  }
  return largest_bits;
}

// quantize_tensors_change without a snapshot, for codes of one element per byte: blocks first..last of the
// window, each read where it lies when one tensor holds it (else gathered into one of two block buffers
// that stay in L1), with each block's codes made in the loop that scans the next.
template <typename Codec, bool kWithResidual>
LOCALSGD_VECTOR_CLONES void quantize_window_blocks_overlapped(const std::vector<WindowSegment>& segments,
                                                              const float* anchor, float* residual, int64_t first,
                                                              int64_t last, int64_t block_size,
                                                              typename Codec::Storage* out, float* scale_out) {
  std::vector<float> buffers(2 * block_size);
  const auto stretch = [&](int64_t b) {
    return window_stretch(segments, b * block_size, (b + 1) * block_size,
                          buffers.data() + ((b - first) & 1) * block_size);
  };
  // A compile-time null without error feedback, so that the inner loops have no branch on it.
  const auto residual_of = [&](int64_t b) { return kWithResidual ? residual + b * block_size : nullptr; };
  const auto change_of = [](const float* s, const float* a, const float* r) {
    return [s, a, r](int64_t k) { return quantize::change_at(s, a, r, k); };
  };
  const float* s = stretch(first);
  const float* a = anchor + first * block_size;
  float* r = residual_of(first);
  int32_t largest_bits = largest_magnitude_bits(change_of(s, a, r), block_size);
  for (int64_t b = first; b < last; ++b) {
    const float scale = scale_of_largest_bits<Codec>(largest_bits);
    scale_out[b] = scale;
    typename Codec::Storage* codes = quantize::storage_at<Codec>(out, b * block_size);
    const bool has_next = b + 1 < last;
    const float* next_s = has_next ? stretch(b + 1) : nullptr;
    const float* next_a = anchor + (b + 1) * block_size;
    float* next_r = residual_of(b + 1);
    if (has_next && quantize::scale_gives_codes(scale)) {
      largest_bits =
          encode_block_and_scan_next<Codec, kWithResidual>(s, a, r, scale, codes, next_s, next_a, next_r, block_size);
    } else {
      encode_block<Codec>(change_of(s, a, r), block_size, scale, codes);
      if constexpr (kWithResidual) {
        write_left_out<Codec>(change_of(s, a, r), codes, scale, r, block_size);
      }
      if (has_next) {
        largest_bits = largest_magnitude_bits(change_of(next_s, next_a, next_r), block_size);
      }
    }
    s = next_s;
    a = next_a;
    r = next_r;
  }
}

// quantize_tensors_change: without a snapshot, for codes of one element per byte, as above; else (a
// snapshot asked for, or int4's two codes per byte) block by block, gathered from the tensors into the
// snapshot or into one block's buffer that stays in L1 (a task-sized one would cost a page fault per
// task), then quantized as quantize_change.
template <typename Codec, bool kWithResidual>
void quantize_tensors_change_all(const std::vector<WindowSegment>& segments, const float* anchor, float* residual,
                                 int64_t num_blocks, int64_t block_size, void* codes, float* scale_out,
                                 float* snapshot) {
  auto* out = static_cast<typename Codec::Storage*>(codes);
  at::parallel_for(0, num_blocks, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    if constexpr (Codec::kPerStorage == 1) {
      if (snapshot == nullptr) {
        quantize_window_blocks_overlapped<Codec, kWithResidual>(segments, anchor, residual, first, last, block_size,
                                                                out, scale_out);
        return;
      }
    }
    std::vector<float> block(snapshot == nullptr ? block_size : 0);
    for (int64_t b = first; b < last; ++b) {
      const int64_t offset = b * block_size;
      float* gathered = snapshot == nullptr ? block.data() : snapshot + offset;
      gather_window(segments, offset, offset + block_size, gathered);
      quantize_change_blocks<Codec, kWithResidual>(gathered, anchor + offset,
                                                   kWithResidual ? residual + offset : nullptr, 1, block_size,
                                                   quantize::storage_at<Codec>(out, offset), scale_out + b);
    }
  });
}

// apply_quantized_mean_to: each block of the moved anchor is also written into the tensors while it is in L1.
template <typename Codec>
void apply_mean_to_all(const void* codes, const float* scales, int64_t length, int64_t block_size, float* anchor,
                       const std::vector<WindowSegment>& segments) {
  const auto* in = static_cast<const typename Codec::Storage*>(codes);
  at::parallel_for(0, length / block_size, blocks_per_task(block_size), [&](int64_t first, int64_t last) {
    // The tensors are only written: past a cache's size, around it (streaming_stores.h).
    const bool stream = use_streaming_stores(length * static_cast<int64_t>(sizeof(float)));
    for (int64_t b = first; b < last; ++b) {
      apply_mean_blocks<Codec>(in, scales, b, b + 1, block_size, anchor);
      const int64_t lo = b * block_size;
      if (stream) {
        scatter_window<true>(segments, lo, lo + block_size, anchor + lo);
      } else {
        scatter_window(segments, lo, lo + block_size, anchor + lo);
      }
    }
    if (stream) {
      streaming_fence();
    }
  });
}

// The window's segments, or nothing if a tensor is not contiguous: those calls take the generic path.
std::optional<std::vector<WindowSegment>> contiguous_window(at::TensorList tensors, at::IntArrayRef offsets,
                                                            int64_t start, int64_t length) {
  std::vector<TensorSlot> slots;
  slots.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() == 0) {
      continue;
    }
    if (!tensors[i].is_contiguous()) {
      return std::nullopt;
    }
    // const_cast: apply_quantized_mean_to's schema declares the tensors mutable (Tensor(b!)[]); the send
    // side only reads them.
    slots.push_back({offsets[i], tensors[i].numel(), const_cast<float*>(tensors[i].const_data_ptr<float>())});
  }
  return window_segments(std::move(slots), start, length);
}

void quantize_tensors_change_cpu(at::TensorList tensors, at::IntArrayRef offsets, int64_t start,
                                 const at::Tensor& anchor, const std::optional<at::Tensor>& residual,
                                 int64_t block_size, const at::Tensor& codes, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& snapshot) {
  check_quantize_tensors_change_arguments(tensors, offsets, start, anchor, residual, block_size, codes, scales,
                                          snapshot);
  const auto segments = contiguous_window(tensors, offsets, start, anchor.numel());
  if (!segments) {
    quantize_tensors_change_generic(tensors, offsets, start, anchor, residual, block_size, codes, scales, snapshot);
    return;
  }
  with_codec(codes.scalar_type(), [&](auto codec) {
    using Codec = decltype(codec);
    const auto run = residual ? &quantize_tensors_change_all<Codec, true> : &quantize_tensors_change_all<Codec, false>;
    // const_cast: the schema declares the outputs mutable.
    run(*segments, anchor.const_data_ptr<float>(), residual ? residual->mutable_data_ptr<float>() : nullptr,
        anchor.numel() / block_size, block_size, const_cast<at::Tensor&>(codes).mutable_data_ptr(),
        const_cast<at::Tensor&>(scales).mutable_data_ptr<float>(),
        snapshot ? const_cast<at::Tensor&>(*snapshot).mutable_data_ptr<float>() : nullptr);
  });
}

void apply_quantized_mean_to_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                 const at::Tensor& anchor, at::IntArrayRef offsets, int64_t start,
                                 at::TensorList tensors) {
  check_apply_quantized_mean_to_arguments(codes, scales, block_size, anchor, offsets, start, tensors);
  const auto segments = contiguous_window(tensors, offsets, start, anchor.numel());
  if (!segments) {
    apply_quantized_mean_to_generic(codes, scales, block_size, anchor, offsets, start, tensors);
    return;
  }
  with_codec(codes.scalar_type(), [&](auto codec) {
    // const_cast: the schema declares `anchor` mutable (Tensor(a!)).
    apply_mean_to_all<decltype(codec)>(codes.const_data_ptr(), scales.const_data_ptr<float>(), anchor.numel(),
                                       block_size, const_cast<at::Tensor&>(anchor).mutable_data_ptr<float>(),
                                       *segments);
  });
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) {
  m.impl("quantize_tensors_change", &quantize_tensors_change_cpu);
  m.impl("apply_quantized_mean_to", &apply_quantized_mean_to_cpu);
}

} // namespace localsgd_ext
