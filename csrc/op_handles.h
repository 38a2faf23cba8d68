// The dispatcher handles of localsgd_ext's own operators (schemas in ops.cpp), looked up once, so the
// engine reaches each device's kernel (CPU, CUDA, generic) by the tensors' device.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace localsgd_ext {

using PackFn = void(at::TensorList, at::IntArrayRef, const at::Tensor&, double);
using UnpackFn = void(const at::Tensor&, at::IntArrayRef, double, at::TensorList);
using MergeFn = void(const at::Tensor&, const at::Tensor&, at::IntArrayRef, double, at::TensorList, double);
using QuantizeChangeFn = void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                              const at::Tensor&, const at::Tensor&);
using ApplyQuantizedMeanFn = void(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&);

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

inline const c10::TypedOperatorHandle<QuantizeChangeFn>& quantize_change_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("localsgd_ext::quantize_change", "").typed<QuantizeChangeFn>();
  return op;
}

inline const c10::TypedOperatorHandle<ApplyQuantizedMeanFn>& apply_quantized_mean_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("localsgd_ext::apply_quantized_mean", "")
                             .typed<ApplyQuantizedMeanFn>();
  return op;
}

} // namespace localsgd_ext
