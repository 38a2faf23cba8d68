// CPU kernel for merge_into (an overlapped sync's merge): one pass over each contiguous tensor reads
// the all-reduced sum and the snapshot from the buffers and writes t + (sum / divisor - snapshot), both
// buffers first divided by the fp16 wire's scale when they were packed with one; strided tensors go
// through ATen with the same arithmetic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pack_common.h"

namespace localsgd_ext {
namespace {

constexpr int64_t kMergeGrain = 64 * 1024;

template <bool kScaled, typename scalar_t, typename wire_t>
void merge_contiguous(const wire_t* sum, const wire_t* snapshot, scalar_t* tensor, int64_t n, double divisor,
                      double scale) {
  using math_t = at::opmath_type<scalar_t>;
  const math_t d = static_cast<math_t>(divisor * scale);
  const math_t s = static_cast<math_t>(scale);
  at::parallel_for(0, n, kMergeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const math_t mean = static_cast<math_t>(sum[k]) / d;
      const math_t before = kScaled ? static_cast<math_t>(snapshot[k]) / s : static_cast<math_t>(snapshot[k]);
      tensor[k] = static_cast<scalar_t>(static_cast<math_t>(tensor[k]) + (mean - before));
    }
  });
}

template <typename scalar_t, typename wire_t>
void merge_contiguous(const wire_t* sum, const wire_t* snapshot, scalar_t* tensor, int64_t n, double divisor,
                      double scale) {
  if (scale == 1.0) {
    merge_contiguous<false>(sum, snapshot, tensor, n, divisor, scale);
  } else {
    merge_contiguous<true>(sum, snapshot, tensor, n, divisor, scale);
  }
}

void merge_into_cpu(const at::Tensor& sum, const at::Tensor& snapshot, at::IntArrayRef offsets, double divisor,
                    at::TensorList tensors, double scale) {
  check_merge_arguments(sum, snapshot, offsets, divisor, tensors, scale);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) {
      continue;
    }
    if (!t.is_contiguous()) {
      merge_one_with_aten(sum, snapshot, offsets[i], divisor, t, scale);
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "merge_into", [&] {
      scalar_t* data = static_cast<scalar_t*>(t.data_ptr());
      if (sum.scalar_type() == t.scalar_type()) {
        merge_contiguous(sum.const_data_ptr<scalar_t>() + offsets[i], snapshot.const_data_ptr<scalar_t>() + offsets[i],
                         data, t.numel(), divisor, scale);
      } else {
        // A narrow wire (comm_dtype) under float32 tensors.
        AT_DISPATCH_REDUCED_FLOATING_TYPES(sum.scalar_type(), "merge_into", [&] {
          using wire_t = scalar_t;
          merge_contiguous(sum.const_data_ptr<wire_t>() + offsets[i], snapshot.const_data_ptr<wire_t>() + offsets[i],
                           reinterpret_cast<float*>(data), t.numel(), divisor, scale);
        });
      }
    });
  }
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CPU, m) { m.impl("merge_into", &merge_into_cpu); }

} // namespace localsgd_ext
