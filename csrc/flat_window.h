// A window of a flat layout (tensor i's elements at offsets[i] onward) seen through the tensors
// themselves: which stretches of which tensors lie in it, and copies between those stretches and a
// window-sized stretch of memory. The quantized wire's CPU kernels gather a task's blocks from the
// parameters and scatter them back this way, instead of packing the model into a flat copy first; the
// generic path (any device) clips the tensors to the window with the same `window_overlap`.
// Plain C++ over contiguous float32 memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "streaming_stores.h"

namespace localsgd_ext::cpu {

// One tensor's elements within the window: window positions begin..end, starting at `data`.
struct WindowSegment {
  int64_t begin;
  int64_t end;
  float* data;
};

// A tensor's place in the flat layout, and its elements.
struct TensorSlot {
  int64_t offset;
  int64_t numel;
  float* data;
};

// A tensor's stretch of the window start..start + length: its elements first..first + count, at window
// position `position`. Nothing when it lies outside.
struct WindowOverlap {
  int64_t first;
  int64_t count;
  int64_t position;
};

inline std::optional<WindowOverlap> window_overlap(int64_t offset, int64_t numel, int64_t start, int64_t length) {
  const int64_t begin = std::max(offset, start);
  const int64_t end = std::min(offset + numel, start + length);
  if (begin >= end) {
    return std::nullopt;
  }
  return WindowOverlap{begin - offset, end - begin, begin - start};
}

// The segments of the window start..start + length, in order. Slots must not overlap (the ops check that
// first).
inline std::vector<WindowSegment> window_segments(std::vector<TensorSlot> slots, int64_t start, int64_t length) {
  std::sort(slots.begin(), slots.end(), [](const TensorSlot& a, const TensorSlot& b) { return a.offset < b.offset; });
  std::vector<WindowSegment> segments;
  for (const TensorSlot& slot : slots) {
    if (const auto o = window_overlap(slot.offset, slot.numel, start, length)) {
      segments.push_back({o->position, o->position + o->count, slot.data + o->first});
    }
  }
  return segments;
}

// The first segment that ends after window position `position`.
inline size_t first_segment_after(const std::vector<WindowSegment>& segments, int64_t position) {
  return std::upper_bound(segments.begin(), segments.end(), position,
                          [](int64_t p, const WindowSegment& s) { return p < s.end; }) -
         segments.begin();
}

// out[0 .. hi - lo) = the window's elements lo..hi, zero where no tensor lies.
inline void gather_window(const std::vector<WindowSegment>& segments, int64_t lo, int64_t hi, float* out) {
  int64_t filled = lo;
  for (size_t s = first_segment_after(segments, lo); s < segments.size() && segments[s].begin < hi; ++s) {
    const int64_t from = std::max(segments[s].begin, lo);
    const int64_t to = std::min(segments[s].end, hi);
    std::fill(out + (filled - lo), out + (from - lo), 0.0f);
    std::memcpy(out + (from - lo), segments[s].data + (from - segments[s].begin), (to - from) * sizeof(float));
    filled = to;
  }
  std::fill(out + (filled - lo), out + (hi - lo), 0.0f);
}

// The window's elements lo..hi: the tensor's own memory when one tensor holds all of them, else gathered
// into `buffer` (hi - lo floats).
inline const float* window_stretch(const std::vector<WindowSegment>& segments, int64_t lo, int64_t hi, float* buffer) {
  const size_t s = first_segment_after(segments, lo);
  if (s < segments.size() && segments[s].begin <= lo && segments[s].end >= hi) {
    return segments[s].data + (lo - segments[s].begin);
  }
  gather_window(segments, lo, hi, buffer);
  return buffer;
}

// The window's elements lo..hi that lie in a tensor = in[0 .. hi - lo) (the rest of `in` is not written anywhere).
// `kStream`: with streaming stores (streaming_stores.h; the caller fences).
template <bool kStream = false>
inline void scatter_window(const std::vector<WindowSegment>& segments, int64_t lo, int64_t hi, const float* in) {
  for (size_t s = first_segment_after(segments, lo); s < segments.size() && segments[s].begin < hi; ++s) {
    const int64_t from = std::max(segments[s].begin, lo);
    const int64_t to = std::min(segments[s].end, hi);
    float* dst = segments[s].data + (from - segments[s].begin);
    const int64_t nbytes = (to - from) * static_cast<int64_t>(sizeof(float));
    if constexpr (kStream) {
      stream_copy(reinterpret_cast<const char*>(in + (from - lo)), reinterpret_cast<char*>(dst), nbytes);
    } else {
      std::memcpy(dst, in + (from - lo), nbytes);
    }
  }
}

} // namespace localsgd_ext::cpu
