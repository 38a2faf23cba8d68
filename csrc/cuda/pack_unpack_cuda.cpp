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

struct WorkTable {
  std::vector<TensorSlot> slots;
  int64_t total_chunks = 0;
};

bool kernel_can_take(const at::Tensor& t) {
  return t.is_contiguous() && cuda::packable_element_size(t.element_size());
}

// The table lives in device memory so that one launch covers any number of tensors. It goes up
// through pinned memory with a non-blocking copy: no host sync, and torch's host allocator keeps the
// pinned block alive until the copy has run. The device copy is freed on return; the caching
// allocator hands it out again only to work queued after this launch on the same stream.
at::Tensor upload(const WorkTable& table, const at::Device& device) {
  const auto bytes = static_cast<int64_t>(table.slots.size() * sizeof(TensorSlot));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), table.slots.data(), bytes);
  at::Tensor on_device = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  on_device.copy_(host, /*non_blocking=*/true);
  return on_device;
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

void pack_into_cuda(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer) {
  check_pack_arguments("pack_into", tensors, offsets, buffer);
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  WorkTable table;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    if (!kernel_can_take(t)) {
      pack_one_with_aten(t, offsets[i], buffer);
      continue;
    }
    table.slots.push_back({const_cast<void*>(t.const_data_ptr()), offsets[i], t.numel(), 0});
  }
  if (table.slots.empty()) {
    return;
  }
  const int64_t element_size = buffer.element_size();
  table.total_chunks = cuda::assign_chunks(
      table.slots.data(), static_cast<int64_t>(table.slots.size()), cuda::chunk_elements(element_size));
  const at::Tensor device_table = upload(table, buffer.device());
  C10_CUDA_CHECK(cuda::launch_pack(
      static_cast<const TensorSlot*>(device_table.const_data_ptr()), static_cast<int64_t>(table.slots.size()),
      table.total_chunks, buffer.mutable_data_ptr(), element_size,
      c10::cuda::getCurrentCUDAStream(buffer.device().index()).stream()));
}

void unpack_from_cuda(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors) {
  check_pack_arguments("unpack_from", tensors, offsets, buffer);
  check_divisor("unpack_from", divisor);
  const cuda::FloatKind kind = float_kind(buffer);
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  WorkTable table;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    if (!kernel_can_take(t)) {
      unpack_one_with_aten(buffer, offsets[i], divisor, t);
      continue;
    }
    table.slots.push_back({t.mutable_data_ptr(), offsets[i], t.numel(), 0});
  }
  if (table.slots.empty()) {
    return;
  }
  table.total_chunks = cuda::assign_chunks(
      table.slots.data(), static_cast<int64_t>(table.slots.size()), cuda::chunk_elements(buffer.element_size()));
  const at::Tensor device_table = upload(table, buffer.device());
  C10_CUDA_CHECK(cuda::launch_unpack(
      static_cast<const TensorSlot*>(device_table.const_data_ptr()), static_cast<int64_t>(table.slots.size()),
      table.total_chunks, buffer.const_data_ptr(), kind, divisor,
      c10::cuda::getCurrentCUDAStream(buffer.device().index()).stream()));
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CUDA, m) {
  m.impl("pack_into", &pack_into_cuda);
  m.impl("unpack_from", &unpack_from_cuda);
}

} // namespace localsgd_ext
