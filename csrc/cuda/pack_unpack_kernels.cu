// The fused pack/unpack kernels: one launch per bucket and direction, whatever the number of tensors
// (the multi-tensor idea of apex's multi_tensor_apply, with the work list in device memory instead of
// kernel arguments, so that it has no size limit). Includes only CUDA toolkit headers: `nvcc -c`
// compiles this file on a machine whose torch has no CUDA (scripts/check_cuda_kernels.sh).
#include "multi_tensor_copy.cuh"
#include "pack_unpack_kernels.h"

#include <algorithm>
#include <cstdint>

namespace localsgd_ext::cuda {
namespace {

// Blocks beyond this loop over chunks instead (grid-stride), which keeps huge buckets launchable.
constexpr int64_t kMaxBlocks = 1 << 16;

template <typename TensorElement, typename BufferElement, bool kIntoBuffer, typename Transform>
__global__ void __launch_bounds__(kThreadsPerBlock)
    multi_tensor_copy_kernel(const TensorSlot* slots, int64_t num_slots, int64_t total_chunks, BufferElement* buffer,
                             Transform op) {
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    copy_chunk<TensorElement, BufferElement, kIntoBuffer>(
        slots, num_slots, buffer, chunk, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), op);
  }
}

template <typename TensorElement, typename BufferElement, bool kIntoBuffer, typename Transform>
cudaError_t launch(const TensorSlot* slots, int64_t num_slots, int64_t total_chunks, void* buffer, Transform op,
                   cudaStream_t stream) {
  if (total_chunks == 0) {
    return cudaSuccess;
  }
  if (slots == nullptr || num_slots <= 0 || buffer == nullptr) {
    return cudaErrorInvalidValue;
  }
  const auto blocks = static_cast<unsigned int>(std::min(total_chunks, kMaxBlocks));
  multi_tensor_copy_kernel<TensorElement, BufferElement, kIntoBuffer, Transform>
      <<<blocks, kThreadsPerBlock, 0, stream>>>(slots, num_slots, total_chunks, static_cast<BufferElement*>(buffer),
                                                op);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t launch_scaled_unpack(const TensorSlot* slots, int64_t num_slots, int64_t total_chunks, const void* buffer,
                                 double divisor, cudaStream_t stream) {
  using Opmath = decltype(to_opmath(Element{}));
  // As torch does: the Python number becomes an Opmath value first, then its reciprocal.
  const Opmath factor = Opmath(1) / static_cast<Opmath>(divisor);
  return launch<Element, Element, /*kIntoBuffer=*/false>(slots, num_slots, total_chunks, const_cast<void*>(buffer),
                                                         MultiplyBy<Opmath>{factor}, stream);
}

template <typename Word>
cudaError_t launch_bit_copy(const TensorSlot* slots, int64_t num_slots, int64_t total_chunks, void* buffer,
                            bool into_buffer, cudaStream_t stream) {
  if (into_buffer) {
    return launch<Word, Word, true>(slots, num_slots, total_chunks, buffer, CopyBits{}, stream);
  }
  return launch<Word, Word, false>(slots, num_slots, total_chunks, buffer, CopyBits{}, stream);
}

cudaError_t launch_bit_copy_of_size(const TensorSlot* slots, int64_t num_slots, int64_t total_chunks, void* buffer,
                                    int64_t element_size, bool into_buffer, cudaStream_t stream) {
  switch (element_size) {
    case 1:
      return launch_bit_copy<uint8_t>(slots, num_slots, total_chunks, buffer, into_buffer, stream);
    case 2:
      return launch_bit_copy<uint16_t>(slots, num_slots, total_chunks, buffer, into_buffer, stream);
    case 4:
      return launch_bit_copy<uint32_t>(slots, num_slots, total_chunks, buffer, into_buffer, stream);
    case 8:
      return launch_bit_copy<uint64_t>(slots, num_slots, total_chunks, buffer, into_buffer, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int64_t element_size_of(FloatKind kind) {
  switch (kind) {
    case FloatKind::kFloat16:
    case FloatKind::kBFloat16:
      return 2;
    case FloatKind::kFloat32:
      return 4;
    case FloatKind::kFloat64:
      return 8;
  }
  return 0;
}

template <typename Wire>
cudaError_t launch_narrowing_pack(const TensorSlot* slots, int64_t num_slots, int64_t total_chunks, void* buffer,
                                  double scale, cudaStream_t stream) {
  return launch<float, Wire, /*kIntoBuffer=*/true>(slots, num_slots, total_chunks, buffer,
                                                   NarrowScaled<Wire>{static_cast<float>(scale)}, stream);
}

template <typename Wire>
cudaError_t launch_widening_unpack(const TensorSlot* slots, int64_t num_slots, int64_t total_chunks, const void* buffer,
                                   double divisor, cudaStream_t stream) {
  void* source = const_cast<void*>(buffer);
  if (divisor == 1.0) {
    return launch<float, Wire, /*kIntoBuffer=*/false>(slots, num_slots, total_chunks, source, Widen{}, stream);
  }
  // The division happens on the widened float32 value, as torch's `float32_tensor / python_number`.
  const float factor = 1.0f / static_cast<float>(divisor);
  return launch<float, Wire, /*kIntoBuffer=*/false>(slots, num_slots, total_chunks, source, WidenMultiplied{factor},
                                                    stream);
}

// Calls `launch` with a value of the narrow wire's element type.
template <typename Launch>
cudaError_t on_narrow_wire(FloatKind wire, const Launch& launch) {
  switch (wire) {
    case FloatKind::kFloat16:
      return launch(__half{});
    case FloatKind::kBFloat16:
      return launch(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

} // namespace

cudaError_t launch_pack_narrowing(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks, void* buffer,
                                  FloatKind wire, double scale, cudaStream_t stream) {
  return on_narrow_wire(wire, [&](auto wire_element) {
    using Wire = decltype(wire_element);
    return launch_narrowing_pack<Wire>(device_slots, num_slots, total_chunks, buffer, scale, stream);
  });
}

cudaError_t launch_unpack_widening(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks,
                                   const void* buffer, FloatKind wire, double divisor, cudaStream_t stream) {
  return on_narrow_wire(wire, [&](auto wire_element) {
    using Wire = decltype(wire_element);
    return launch_widening_unpack<Wire>(device_slots, num_slots, total_chunks, buffer, divisor, stream);
  });
}

cudaError_t launch_pack(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks, void* buffer,
                        int64_t element_size, cudaStream_t stream) {
  return launch_bit_copy_of_size(device_slots, num_slots, total_chunks, buffer, element_size, /*into_buffer=*/true,
                                 stream);
}

cudaError_t launch_unpack(const TensorSlot* device_slots, int64_t num_slots, int64_t total_chunks, const void* buffer,
                          FloatKind kind, double divisor, cudaStream_t stream) {
  if (divisor == 1.0) {
    return launch_bit_copy_of_size(device_slots, num_slots, total_chunks, const_cast<void*>(buffer),
                                   element_size_of(kind),
                                   /*into_buffer=*/false, stream);
  }
  switch (kind) {
    case FloatKind::kFloat16:
      return launch_scaled_unpack<__half>(device_slots, num_slots, total_chunks, buffer, divisor, stream);
    case FloatKind::kBFloat16:
      return launch_scaled_unpack<__nv_bfloat16>(device_slots, num_slots, total_chunks, buffer, divisor, stream);
    case FloatKind::kFloat32:
      return launch_scaled_unpack<float>(device_slots, num_slots, total_chunks, buffer, divisor, stream);
    case FloatKind::kFloat64:
      return launch_scaled_unpack<double>(device_slots, num_slots, total_chunks, buffer, divisor, stream);
  }
  return cudaErrorInvalidValue;
}

} // namespace localsgd_ext::cuda
