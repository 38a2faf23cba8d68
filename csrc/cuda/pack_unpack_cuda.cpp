// CUDA implementations of localsgd_ext::pack_into / unpack_from: the torch side of the fused kernels.
// Checks the arguments, sorts the contiguous tensors into work tables (bit copies; float32 casts onto
// and off a float16/bfloat16 wire), uploads them and launches one kernel per table on the current
// stream. Tensors the kernels cannot take (non-contiguous views, other dtype pairs) are copied by ATen
// on the same stream, as the CPU kernels do.
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

bool is_narrow_wire(const at::Tensor& buffer) {
  return buffer.scalar_type() == at::kHalf || buffer.scalar_type() == at::kBFloat16;
}

// The tensors of one call, by the kernel that moves them (a bucket's tensors all land in one table:
// the engine buckets by dtype).
struct SortedWork {
  std::vector<TensorSlot> bit_copies; // the buffer's own dtype
  std::vector<TensorSlot> casts;      // float32 tensors, float16/bfloat16 buffer
};

// Sorts the non-empty tensors the kernels take (their data written by the kernel when
// `writes_tensors`) and hands each of the others to `copy_with_aten(i)`, on the same stream.
template <typename CopyWithAten>
SortedWork sort_work(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, bool writes_tensors,
                     const CopyWithAten& copy_with_aten) {
  SortedWork work;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    std::vector<TensorSlot>* table = nullptr;
    if (t.is_contiguous()) {
      if (t.scalar_type() == buffer.scalar_type() && cuda::packable_element_size(t.element_size())) {
        table = &work.bit_copies;
      } else if (t.scalar_type() == at::kFloat && is_narrow_wire(buffer)) {
        table = &work.casts;
      }
    }
    if (table == nullptr) {
      copy_with_aten(i);
      continue;
    }
    void* data = writes_tensors ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
    table->push_back({data, offsets[i], t.numel(), 0});
  }
  return work;
}

// A kernel's work list, on the device. One launch covers any number of tensors because the list lives
// in device memory: it goes up through pinned memory with a non-blocking copy (no host sync; torch's
// host allocator keeps the pinned block alive until the copy has run). The device copy is freed when
// the caller drops it, and the caching allocator hands it out again only to work queued after the
// launch on the same stream.
struct DeviceWorkList {
  at::Tensor table; // TensorSlot[num_slots], undefined when there is nothing for the kernel
  int64_t num_slots = 0;
  int64_t total_chunks = 0;

  const TensorSlot* slots() const { return static_cast<const TensorSlot*>(table.const_data_ptr()); }
};

DeviceWorkList upload(std::vector<TensorSlot>& slots, const at::Tensor& buffer) {
  DeviceWorkList work;
  if (slots.empty()) {
    return work;
  }
  work.num_slots = static_cast<int64_t>(slots.size());
  // Chunks count buffer elements, whatever the tensors' dtype (the kernels cut them the same way).
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
      TORCH_CHECK_TYPE(false, "unpack_from: buffer must be float16, bfloat16, float32 or float64 on CUDA, got ",
                       buffer.scalar_type(), ".");
  }
}

cudaStream_t current_stream(const at::Tensor& buffer) {
  return c10::cuda::getCurrentCUDAStream(buffer.device().index()).stream();
}

void pack_into_cuda(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& buffer, double scale) {
  check_pack_arguments("pack_into", tensors, offsets, buffer);
  check_disjoint_slots("pack_into", tensors, offsets);
  check_scale("pack_into", tensors, buffer, scale);
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  SortedWork work = sort_work(tensors, offsets, buffer, /*writes_tensors=*/false,
                              [&](size_t i) { pack_one_with_aten(tensors[i], offsets[i], buffer, scale); });
  const DeviceWorkList copies = upload(work.bit_copies, buffer);
  if (copies.num_slots > 0) {
    C10_CUDA_CHECK(cuda::launch_pack(copies.slots(), copies.num_slots, copies.total_chunks, buffer.mutable_data_ptr(),
                                     buffer.element_size(), current_stream(buffer)));
  }
  const DeviceWorkList casts = upload(work.casts, buffer);
  if (casts.num_slots > 0) {
    C10_CUDA_CHECK(cuda::launch_pack_narrowing(casts.slots(), casts.num_slots, casts.total_chunks,
                                               buffer.mutable_data_ptr(), float_kind(buffer), scale,
                                               current_stream(buffer)));
  }
}

void unpack_from_cuda(const at::Tensor& buffer, at::IntArrayRef offsets, double divisor, at::TensorList tensors) {
  check_pack_arguments("unpack_from", tensors, offsets, buffer);
  check_divisor("unpack_from", divisor);
  const cuda::FloatKind kind = float_kind(buffer);
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  SortedWork work = sort_work(tensors, offsets, buffer, /*writes_tensors=*/true,
                              [&](size_t i) { unpack_one_with_aten(buffer, offsets[i], divisor, tensors[i]); });
  const DeviceWorkList copies = upload(work.bit_copies, buffer);
  if (copies.num_slots > 0) {
    C10_CUDA_CHECK(cuda::launch_unpack(copies.slots(), copies.num_slots, copies.total_chunks, buffer.const_data_ptr(),
                                       kind, divisor, current_stream(buffer)));
  }
  const DeviceWorkList casts = upload(work.casts, buffer);
  if (casts.num_slots > 0) {
    C10_CUDA_CHECK(cuda::launch_unpack_widening(casts.slots(), casts.num_slots, casts.total_chunks,
                                                buffer.const_data_ptr(), kind, divisor, current_stream(buffer)));
  }
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CUDA, m) {
  m.impl("pack_into", &pack_into_cuda);
  m.impl("unpack_from", &unpack_from_cuda);
}

} // namespace localsgd_ext
