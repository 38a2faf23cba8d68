// CPU kernels for pack_into / unpack_from: one call walks every tensor of a bucket. Contiguous
// tensors are cut into chunks copied by raw loops across intra-op threads (no per-tensor
// TensorIterator, which costs microseconds per tiny tensor); float32 tensors in a bfloat16/float16
// buffer (comm_dtype) are converted by wire_casts_cpu.cpp; strided ones go through ATen's copy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "pack_common.h"
#include "streaming_stores.h"
#include "vector_clones.h"
#include "wire_casts_cpu.h"

namespace localsgd_ext {
namespace {

// Small enough to spread a large tensor over threads, large enough to keep per-chunk overhead low.
constexpr int64_t kChunkBytes = 256 * 1024;
// Below this many bytes in a bucket, threading costs more than it saves.
constexpr int64_t kParallelBytes = 1024 * 1024;

struct CopyChunk {
  const char* src;
  char* dst;
  int64_t nbytes;
};

void add_chunks(std::vector<CopyChunk>& chunks, const char* src, char* dst, int64_t nbytes) {
  for (int64_t done = 0; done < nbytes; done += kChunkBytes) {
    chunks.push_back({src + done, dst + done, std::min(kChunkBytes, nbytes - done)});
  }
}

template <typename Body>
void for_each_chunk(const std::vector<CopyChunk>& chunks, int64_t total_bytes, const Body& body) {
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      body(chunks[i]);
    }
  };
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (total_bytes < kParallelBytes) {
    run(0, n);
  } else {
    at::parallel_for(0, n, 1, run);
  }
}

// The raw copies for the contiguous tensors of a bucket (to or from the buffer), and the indices of
// the strided ones, which the caller copies through ATen.
struct BucketCopies {
  std::vector<CopyChunk> chunks;
  int64_t total_bytes = 0;
  std::vector<size_t> strided;
  // Contiguous float32 tensors in a narrower buffer (comm_dtype): converted, not copied.
  std::vector<size_t> casts;
};

enum class Direction { kIntoBuffer, kFromBuffer };

BucketCopies plan_copies(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer,
                         Direction direction) {
  BucketCopies copies;
  const int64_t element_size = buffer.element_size();
  char* base = static_cast<char*>(buffer.data_ptr());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    if (!t.is_contiguous()) {
      copies.strided.push_back(i);
      continue;
    }
    if (t.scalar_type() != buffer.scalar_type()) {
      copies.casts.push_back(i);
      continue;
    }
    const int64_t nbytes = t.numel() * element_size;
    char* slot = base + offsets[i] * element_size;
    char* data = static_cast<char*>(t.data_ptr());
    if (direction == Direction::kIntoBuffer) {
      add_chunks(copies.chunks, data, slot, nbytes);
    } else {
      add_chunks(copies.chunks, slot, data, nbytes);
    }
    copies.total_bytes += nbytes;
  }
  return copies;
}

void copy_chunk(const CopyChunk& c) { std::memcpy(c.dst, c.src, c.nbytes); }

void stream_chunk(const CopyChunk& c) {
  stream_copy(c.src, c.dst, c.nbytes);
  streaming_fence();
}

void copy_chunks(const BucketCopies& copies) {
  for_each_chunk(copies.chunks, copies.total_bytes,
                 use_streaming_stores(copies.total_bytes) ? stream_chunk : copy_chunk);
}

void pack_into_cpu(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, double scale) {
  check_pack_arguments("pack_into", tensors, offsets, buffer);
  check_disjoint_slots("pack_into", tensors, offsets);
  check_scale("pack_into", tensors, buffer, scale);
  const BucketCopies copies = plan_copies(tensors, offsets, buffer, Direction::kIntoBuffer);
  copy_chunks(copies);
  if (!copies.casts.empty()) {
    cpu::pack_casts(tensors, offsets, buffer, scale, copies.casts);
  }
  for (size_t i : copies.strided) {
    pack_one_with_aten(tensors[i], offsets[i], buffer, scale);
  }
}

// A divisor that is a power of two (a group of 2, 4, 8... ranks) divides as a multiplication by its
// reciprocal, which is exact: the same real number, rounded once, so the same bits as `/ divisor`, at a
// fraction of a division's cost.
bool is_power_of_two(double divisor) {
  int exponent = 0;
  return std::frexp(divisor, &exponent) == 0.5;
}

template <bool kByReciprocal, typename scalar_t>
LOCALSGD_VECTOR_CLONES void divide_copy_n(const scalar_t* src, scalar_t* dst, int64_t n, double divisor) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t d = static_cast<opmath_t>(divisor);
  const opmath_t reciprocal = static_cast<opmath_t>(1.0 / divisor);
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t value = static_cast<opmath_t>(src[k]);
    dst[k] = static_cast<scalar_t>(kByReciprocal ? value * reciprocal : value / d);
  }
}

// `stream`: float32 stores around the cache (streaming_stores.h), the same bits.
template <typename scalar_t>
void divide_copy(const CopyChunk& chunk, double divisor, bool by_reciprocal, bool stream) {
  const auto* src = reinterpret_cast<const scalar_t*>(chunk.src);
  auto* dst = reinterpret_cast<scalar_t*>(chunk.dst);
  const int64_t n = chunk.nbytes / static_cast<int64_t>(sizeof(scalar_t));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream) {
      if (by_reciprocal) {
        stream_multiply(src, dst, n, static_cast<float>(1.0 / divisor));
      } else {
        stream_divide(src, dst, n, static_cast<float>(divisor));
      }
      streaming_fence();
      return;
    }
  }
  if (by_reciprocal) {
    divide_copy_n<true>(src, dst, n, divisor);
  } else {
    divide_copy_n<false>(src, dst, n, divisor);
  }
}

void unpack_from_cpu(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors) {
  check_pack_arguments("unpack_from", tensors, offsets, buffer);
  check_divisor("unpack_from", divisor);
  const BucketCopies copies = plan_copies(tensors, offsets, buffer, Direction::kFromBuffer);
  if (divisor == 1.0) {
    copy_chunks(copies);
  } else {
    const bool by_reciprocal = is_power_of_two(divisor);
    const bool stream = use_streaming_stores(copies.total_bytes);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "unpack_from", [&] {
      for_each_chunk(copies.chunks, copies.total_bytes, [divisor, by_reciprocal, stream](const CopyChunk& c) {
        divide_copy<scalar_t>(c, divisor, by_reciprocal, stream);
      });
    });
  }
  if (!copies.casts.empty()) {
    cpu::unpack_casts(buffer, offsets, divisor, tensors, copies.casts);
  }
  for (size_t i : copies.strided) {
    unpack_one_with_aten(buffer, offsets[i], divisor, tensors[i]);
  }
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) {
  m.impl("pack_into", &pack_into_cpu);
  m.impl("unpack_from", &unpack_from_cpu);
}

} // namespace localsgd_ext
