// Argument checks of quantize_blocks / dequantize_blocks and of the quantized wire's fused steps
// (quantize_change, requantize_mean, apply_quantized_mean), shared by every device's kernels; the window
// ops' own are in quantize_window_checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <utility>

#include "pack_common.h"
#include "storage_checks.h"

namespace localsgd_ext {

// The codes' dtypes: int8, float8_e4m3fn, and uint8 for int4 codes two per byte.
inline bool is_codes_dtype(at::ScalarType t) { return t == at::kChar || t == at::kFloat8_e4m3fn || t == at::kByte; }

inline int64_t codes_per_storage(at::ScalarType t) { return t == at::kByte ? 2 : 1; }

// int4 codes pair up within a block, so its blocks have an even number of elements.
inline void check_block_fits_codes(const char* op, int64_t block_size, at::ScalarType codes_dtype) {
  TORCH_CHECK_VALUE(block_size % codes_per_storage(codes_dtype) == 0, op,
                    ": int4 codes (uint8, two per byte) need an even block_size, got ", block_size, ".");
}

inline void check_block_size(const char* op, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= (1 << 20), op, ": block_size must be between 1 and 1048576, got ",
                    block_size, ".");
}

// The codes' dtype: int8 (the default) or float8_e4m3fn.
inline at::ScalarType check_quantize_arguments(const at::Tensor& x, int64_t block_size,
                                               std::optional<at::ScalarType> code_dtype) {
  const at::ScalarType codes_type = code_dtype.value_or(at::kChar);
  TORCH_CHECK_TYPE(is_codes_dtype(codes_type),
                   "quantize_blocks: code_dtype must be torch.int8, torch.float8_e4m3fn or torch.uint8 (int4, two per "
                   "byte), got ",
                   codes_type, ".");
  check_block_size("quantize_blocks", block_size);
  check_block_fits_codes("quantize_blocks", block_size, codes_type);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "quantize_blocks: x must be float32, got ", x.scalar_type(), ".");
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && x.dim() == 1 && x.is_contiguous(),
                    "quantize_blocks: x must be a 1-D contiguous tensor, got sizes ", x.sizes(), " and strides ",
                    x.strides(), ".");
  TORCH_CHECK_VALUE(x.numel() % block_size == 0,
                    "quantize_blocks: x's length must be a multiple of block_size (pad it), got ", x.numel(),
                    " elements and block_size ", block_size, ".");
  check_storage_holds(x, "quantize_blocks: x");
  return codes_type;
}

inline void check_dequantize_arguments(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                       double divisor) {
  check_block_size("dequantize_blocks", block_size);
  TORCH_CHECK_TYPE(is_codes_dtype(codes.scalar_type()),
                   "dequantize_blocks: codes must be int8, float8_e4m3fn or uint8 (int4), got ", codes.scalar_type(),
                   ".");
  check_block_fits_codes("dequantize_blocks", block_size, codes.scalar_type());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "dequantize_blocks: scales must be float32, got ",
                   scales.scalar_type(), ".");
  TORCH_CHECK_VALUE(codes.layout() == at::kStrided && codes.dim() == 2 && codes.is_contiguous(),
                    "dequantize_blocks: codes must be 2-D (rows to sum, elements) and contiguous, got sizes ",
                    codes.sizes(), " and strides ", codes.strides(), ".");
  const int64_t row_length = codes.size(1) * codes_per_storage(codes.scalar_type());
  TORCH_CHECK_VALUE(row_length % block_size == 0,
                    "dequantize_blocks: codes' row length must be a multiple of block_size, got ", row_length,
                    " and block_size ", block_size, ".");
  TORCH_CHECK_VALUE(scales.layout() == at::kStrided && scales.dim() == 2 && scales.is_contiguous() &&
                        scales.size(0) == codes.size(0) && scales.size(1) == row_length / block_size,
                    "dequantize_blocks: scales must be contiguous with sizes [", codes.size(0), ", ",
                    row_length / block_size, "] (one per block of each row), got sizes ", scales.sizes(), ".");
  TORCH_CHECK_VALUE(codes.device() == scales.device(), "dequantize_blocks: codes are on ", codes.device(),
                    " but scales on ", scales.device(), ".");
  check_divisor("dequantize_blocks", divisor);
  check_storage_holds(codes, "dequantize_blocks: codes");
  check_storage_holds(scales, "dequantize_blocks: scales");
}

inline void check_flat_float32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type(), ".");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
                    " must be a 1-D contiguous tensor, got sizes ", t.sizes(), " and strides ", t.strides(), ".");
  TORCH_CHECK_VALUE(t.numel() == like.numel(), op, ": ", name, " must have the length of the others (", like.numel(),
                    "), got ", t.numel(), ".");
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the others on ",
                    like.device(), ".");
  check_storage_holds(t, [&] { return std::string(op) + ": " + name; });
}

// Codes (int8, float8_e4m3fn, or uint8 holding int4 two per byte) and scales (float32, one per block) an op
// writes: 1-D, contiguous, for `length` elements (`length` codes, `length / 2` bytes of int4) and
// `length / block_size` scales, on `device`.
inline void check_codes_out(const char* op, const at::Tensor& codes, const at::Tensor& scales, int64_t length,
                            int64_t block_size, c10::Device device, const char* codes_name, const char* scales_name) {
  TORCH_CHECK_TYPE(is_codes_dtype(codes.scalar_type()), op, ": ", codes_name,
                   " must be int8, float8_e4m3fn or uint8 (int4), got ", codes.scalar_type(), ".");
  check_block_fits_codes(op, block_size, codes.scalar_type());
  const int64_t storage = length / codes_per_storage(codes.scalar_type());
  TORCH_CHECK_VALUE(
      codes.layout() == at::kStrided && codes.dim() == 1 && codes.is_contiguous() && codes.numel() == storage, op, ": ",
      codes_name, " must be 1-D and contiguous with ", storage, " elements, got sizes ", codes.sizes(), ".");
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, op, ": ", scales_name, " must be float32, got ",
                   scales.scalar_type(), ".");
  TORCH_CHECK_VALUE(scales.layout() == at::kStrided && scales.dim() == 1 && scales.is_contiguous() &&
                        scales.numel() == length / block_size,
                    op, ": ", scales_name, " must be 1-D and contiguous with ", length / block_size,
                    " entries (one per block), got sizes ", scales.sizes(), ".");
  TORCH_CHECK_VALUE(codes.device() == device && scales.device() == device, op, ": ", codes_name, " and ", scales_name,
                    " must be on ", device, ", got ", codes.device(), " and ", scales.device(), ".");
  check_storage_holds(codes, [&] { return std::string(op) + ": " + codes_name; });
  check_storage_holds(scales, [&] { return std::string(op) + ": " + scales_name; });
}

inline void check_quantize_change_arguments(const at::Tensor& snapshot, const at::Tensor& anchor,
                                            const std::optional<at::Tensor>& residual, int64_t block_size,
                                            const at::Tensor& codes, const at::Tensor& scales) {
  check_block_size("quantize_change", block_size);
  check_flat_float32("quantize_change", "snapshot", snapshot, snapshot);
  TORCH_CHECK_VALUE(snapshot.numel() % block_size == 0,
                    "quantize_change: the length must be a multiple of block_size (pad it), got ", snapshot.numel(),
                    " elements and block_size ", block_size, ".");
  check_flat_float32("quantize_change", "anchor", anchor, snapshot);
  if (residual) {
    check_flat_float32("quantize_change", "residual", *residual, snapshot);
  }
  check_codes_out("quantize_change", codes, scales, snapshot.numel(), block_size, snapshot.device(), "codes", "scales");
}

inline void check_requantize_mean_arguments(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                            const at::Tensor& mean_codes, const at::Tensor& mean_scales) {
  check_dequantize_arguments(codes, scales, block_size, 1.0);
  check_codes_out("requantize_mean", mean_codes, mean_scales, codes.size(1) * codes_per_storage(codes.scalar_type()),
                  block_size, codes.device(), "mean_codes", "mean_scales");
  TORCH_CHECK_TYPE(mean_codes.scalar_type() == codes.scalar_type(),
                   "requantize_mean: mean_codes must have the codes' dtype (", codes.scalar_type(), "), got ",
                   mean_codes.scalar_type(), ".");
}

inline void check_apply_quantized_mean_arguments(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                                 const at::Tensor& anchor) {
  check_block_size("apply_quantized_mean", block_size);
  TORCH_CHECK_TYPE(is_codes_dtype(codes.scalar_type()),
                   "apply_quantized_mean: codes must be int8, float8_e4m3fn or uint8 (int4), got ", codes.scalar_type(),
                   ".");
  check_block_fits_codes("apply_quantized_mean", block_size, codes.scalar_type());
  const int64_t length = codes.numel() * codes_per_storage(codes.scalar_type());
  TORCH_CHECK_VALUE(
      codes.layout() == at::kStrided && codes.dim() == 1 && codes.is_contiguous() && length % block_size == 0,
      "apply_quantized_mean: codes must be 1-D, contiguous, for a multiple of block_size elements, got sizes ",
      codes.sizes(), " and block_size ", block_size, ".");
  TORCH_CHECK_TYPE(anchor.scalar_type() == at::kFloat, "apply_quantized_mean: anchor must be float32, got ",
                   anchor.scalar_type(), ".");
  TORCH_CHECK_VALUE(
      anchor.layout() == at::kStrided && anchor.dim() == 1 && anchor.is_contiguous() && anchor.numel() == length,
      "apply_quantized_mean: anchor must be 1-D and contiguous with the codes' ", length, " elements, got sizes ",
      anchor.sizes(), ".");
  check_storage_holds(anchor, "apply_quantized_mean: anchor");
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "apply_quantized_mean: scales must be float32, got ",
                   scales.scalar_type(), ".");
  TORCH_CHECK_VALUE(scales.layout() == at::kStrided && scales.dim() == 1 && scales.is_contiguous() &&
                        scales.numel() == length / block_size,
                    "apply_quantized_mean: scales must be 1-D and contiguous with ", length / block_size,
                    " entries (one per block), got sizes ", scales.sizes(), ".");
  TORCH_CHECK_VALUE(codes.device() == scales.device() && codes.device() == anchor.device(),
                    "apply_quantized_mean: codes are on ", codes.device(), ", scales on ", scales.device(),
                    " and anchor on ", anchor.device(), "; they must share a device.");
  check_storage_holds(codes, "apply_quantized_mean: codes");
  check_storage_holds(scales, "apply_quantized_mean: scales");
}

} // namespace localsgd_ext
