// The dispatcher handles of localsgd_ext's own operators (schemas in ops.cpp), looked up once, so the
// engine reaches each device's kernel (CPU, CUDA, generic) by the tensors' device.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace localsgd_ext {

using PackFn = void(at::TensorList, at::IntArrayRef, const at::Tensor&, double);
using UnpackFn = void(const at::Tensor&, at::IntArrayRef, double, at::TensorList);
using MergeFn = void(const at::Tensor&, const at::Tensor&, at::IntArrayRef, double, at::TensorList);

inline const c10::TypedOperatorHandle<PackFn>& pack_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("localsgd_ext::pack_into", "").typed<PackFn>();
  return op;
}

inline const c10::TypedOperatorHandle<UnpackFn>& unpack_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("localsgd_ext::unpack_from", "").typed<UnpackFn>();
  return op;
}

inline const c10::TypedOperatorHandle<MergeFn>& merge_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("localsgd_ext::merge_into", "").typed<MergeFn>();
  return op;
}

} // namespace localsgd_ext
