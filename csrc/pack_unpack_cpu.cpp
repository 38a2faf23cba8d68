// CPU kernels for pack_into / unpack_from: one call walks every tensor of a bucket. Contiguous
// tensors are cut into chunks copied by raw loops across intra-op threads (no per-tensor
// TensorIterator, which costs microseconds per tiny tensor); strided ones go through ATen's copy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/div.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "pack_common.h"

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

void pack_into_cpu(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer) {
  check_pack_arguments("pack_into", tensors, offsets, buffer);
  const int64_t element_size = buffer.element_size();
  char* base = static_cast<char*>(buffer.data_ptr());
  std::vector<CopyChunk> chunks;
  int64_t total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    if (t.is_contiguous()) {
      const int64_t nbytes = t.numel() * element_size;
      add_chunks(chunks, static_cast<const char*>(t.const_data_ptr()), base + offsets[i] * element_size, nbytes);
      total_bytes += nbytes;
    } else {
      slot_in_buffer(buffer, offsets[i], t).copy_(t);
    }
  }
  for_each_chunk(chunks, total_bytes, [](const CopyChunk& c) { std::memcpy(c.dst, c.src, c.nbytes); });
}

template <typename scalar_t>
void divide_copy(const CopyChunk& chunk, double divisor) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t d = static_cast<opmath_t>(divisor);
  const auto* src = reinterpret_cast<const scalar_t*>(chunk.src);
  auto* dst = reinterpret_cast<scalar_t*>(chunk.dst);
  const int64_t n = chunk.nbytes / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t k = 0; k < n; ++k) {
    dst[k] = static_cast<scalar_t>(static_cast<opmath_t>(src[k]) / d);
  }
}

void unpack_from_cpu(
    const at::Tensor& buffer,
    at::IntArrayRef offsets,
    double divisor,
    at::TensorList tensors) {
  check_pack_arguments("unpack_from", tensors, offsets, buffer);
  check_divisor("unpack_from", divisor);
  const bool plain_copy = divisor == 1.0;
  const int64_t element_size = buffer.element_size();
  const char* base = static_cast<const char*>(buffer.const_data_ptr());
  std::vector<CopyChunk> chunks;
  int64_t total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    if (t.is_contiguous()) {
      const int64_t nbytes = t.numel() * element_size;
      add_chunks(chunks, base + offsets[i] * element_size, static_cast<char*>(t.data_ptr()), nbytes);
      total_bytes += nbytes;
    } else if (plain_copy) {
      // const_cast: copy_ into the tensor the caller declared mutable (Tensor(a!)[]).
      const_cast<at::Tensor&>(t).copy_(slot_in_buffer(buffer, offsets[i], t));
    } else {
      const_cast<at::Tensor&>(t).copy_(at::div(slot_in_buffer(buffer, offsets[i], t), divisor));
    }
  }
  if (plain_copy) {
    for_each_chunk(chunks, total_bytes, [](const CopyChunk& c) { std::memcpy(c.dst, c.src, c.nbytes); });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "unpack_from", [&] {
    for_each_chunk(chunks, total_bytes, [divisor](const CopyChunk& c) { divide_copy<scalar_t>(c, divisor); });
  });
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) {
  m.impl("pack_into", &pack_into_cpu);
  m.impl("unpack_from", &unpack_from_cpu);
}

} // namespace localsgd_ext
