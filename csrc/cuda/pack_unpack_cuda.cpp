// CUDA implementations of localsgd_ext::pack_into / unpack_from: the torch side of the fused kernels.
// Checks the arguments, lists the contiguous tensors in a work table, uploads it and launches one
// kernel per call on the current stream. Tensors the kernels cannot take (non-contiguous views, odd
// element sizes) are copied by ATen on the same stream, as the CPU kernels do.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../pack_common.h"
#include "pack_unpack_kernels.h"

namespace localsgd_ext {
namespace {

using cuda::TensorSlot;

// Casts (float32 tensors on a bfloat16/float16 wire) go through ATen, one tensor at a time: the fused
// kernels copy bits of one dtype.
bool kernel_can_take(const at::Tensor& t, const at::Tensor& buffer) {
  return t.scalar_type() == buffer.scalar_type() && t.is_contiguous() &&
      cuda::packable_element_size(t.element_size());
}

// The kernel's work list, on the device. One launch covers any number of tensors because the list
// lives in device memory: it goes up through pinned memory with a non-blocking copy (no host sync;
// torch's host allocator keeps the pinned block alive until the copy has run). The device copy is
// freed when the caller drops it, and the caching allocator hands it out again only to work queued
// after the launch on the same stream.
struct DeviceWorkList {
  at::Tensor table;  // TensorSlot[num_slots], undefined when there is nothing for the kernel
  int64_t num_slots = 0;
  int64_t total_chunks = 0;

  const TensorSlot* slots() const { return static_cast<const TensorSlot*>(table.const_data_ptr()); }
};

// Lists the non-empty tensors the kernel takes (their data written by the kernel when `writes_tensors`)
// and hands each of the others to `copy_with_aten(i)`, on the same stream.
template <typename CopyWithAten>
DeviceWorkList list_work(
    at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, bool writes_tensors,
    const CopyWithAten& copy_with_aten) {
  std::vector<TensorSlot> slots;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    if (!kernel_can_take(t, buffer)) {
      copy_with_aten(i);
      continue;
    }
    void* data = writes_tensors ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
    slots.push_back({data, offsets[i], t.numel(), 0});
  }
  DeviceWorkList work;
  if (slots.empty()) {
    return work;
  }
  work.num_slots = static_cast<int64_t>(slots.size());
  work.total_chunks = cuda::assign_chunks(slots.data(), work.num_slots, cuda::chunk_elements(buffer.element_size()));
  const auto bytes = static_cast<int64_t>(slots.size() * sizeof(TensorSlot));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), slots.data(), bytes);
  work.table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(buffer.device()));
  work.table.copy_(host, /*non_blocking=*/true);
  return work;
}

cuda::FloatKind float_kind(const at::Tensor& buffer) {
  switch (buffer.scalar_type()) {
    case at::kHalf:
      return cuda::FloatKind::kFloat16;
    case at::kBFloat16:
      return cuda::FloatKind::kBFloat16;
    case at::kFloat:
      return cuda::FloatKind::kFloat32;
    case at::kDouble:
      return cuda::FloatKind::kFloat64;
    default:
      TORCH_CHECK_TYPE(
          false, "unpack_from: buffer must be float16, bfloat16, float32 or float64 on CUDA, got ",
          buffer.scalar_type(), ".");
  }
}

cudaStream_t current_stream(const at::Tensor& buffer) {
  return c10::cuda::getCurrentCUDAStream(buffer.device().index()).stream();
}

void pack_into_cuda(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, double scale) {
  check_pack_arguments("pack_into", tensors, offsets, buffer);
  check_scale("pack_into", tensors, buffer, scale);
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  // A scale applies only to casts, which the kernel leaves to ATen.
  const DeviceWorkList work = list_work(tensors, offsets, buffer, /*writes_tensors=*/false, [&](size_t i) {
    pack_one_with_aten(tensors[i], offsets[i], buffer, scale);
  });
  if (work.num_slots > 0) {
    C10_CUDA_CHECK(cuda::launch_pack(
        work.slots(), work.num_slots, work.total_chunks, buffer.mutable_data_ptr(), buffer.element_size(),
        current_stream(buffer)));
  }
}

void unpack_from_cuda(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors) {
  check_pack_arguments("unpack_from", tensors, offsets, buffer);
  check_divisor("unpack_from", divisor);
  const cuda::FloatKind kind = float_kind(buffer);
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  const DeviceWorkList work = list_work(tensors, offsets, buffer, /*writes_tensors=*/true, [&](size_t i) {
    unpack_one_with_aten(buffer, offsets[i], divisor, tensors[i]);
  });
  if (work.num_slots > 0) {
    C10_CUDA_CHECK(cuda::launch_unpack(
        work.slots(), work.num_slots, work.total_chunks, buffer.const_data_ptr(), kind, divisor,
        current_stream(buffer)));
  }
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CUDA, m) {
  m.impl("pack_into", &pack_into_cuda);
  m.impl("unpack_from", &unpack_from_cuda);
}

} // namespace localsgd_ext
