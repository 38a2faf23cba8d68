// Launchers of the fused multi-tensor pack/unpack kernels. Plain C++ with CUDA runtime types only, so
// that the kernels (pack_unpack_kernels.cu) compile without torch and the torch glue
// (pack_unpack_cuda.cpp) calls them without seeing any device code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "slot_table.h"

namespace localsgd_ext::cuda {

enum class FloatKind { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Copies every slot's tensor into `buffer` at its offset, in one kernel launch on `stream`.
// `device_slots` lives in device memory and was numbered by assign_chunks(chunk_elements(element_size)).
// Any element size of 1, 2, 4 or 8 bytes (the bits are moved as they are).
cudaError_t launch_pack(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks, void* buffer,
                        int64_t element_size, cudaStream_t stream);

// Copies `buffer` back into every slot's tensor, in one kernel launch on `stream`, multiplied by
// 1 / divisor in float (double for kFloat64) unless divisor is 1, in which case the bits are copied.
cudaError_t launch_unpack(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks, const void* buffer,
                          FloatKind kind, double divisor, cudaStream_t stream);

// Casts onto and off a narrower wire (comm_dtype), one launch each way. Pack: float32 tensors into a
// float16/bfloat16 buffer, each element times `scale` in float and rounded to nearest even. Unpack:
// the buffer widened into float32 tensors, times 1 / divisor in float unless divisor is 1. The slots
// were numbered by assign_chunks(chunk_elements(2)): chunks count buffer elements.
cudaError_t launch_pack_narrowing(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks, void* buffer,
                                  FloatKind wire, double scale, cudaStream_t stream);

cudaError_t launch_unpack_widening(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks,
                                   const void* buffer, FloatKind wire, double divisor, cudaStream_t stream);

// Element sizes launch_pack accepts.
constexpr bool packable_element_size(int64_t element_size) {
  return element_size == 1 || element_size == 2 || element_size == 4 || element_size == 8;
}

} // namespace localsgd_ext::cuda
