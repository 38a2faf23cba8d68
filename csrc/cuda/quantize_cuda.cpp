// CUDA implementations of localsgd_ext::quantize_blocks / dequantize_blocks (int8 and float8 e4m3
// codes): the torch side of quantize_kernels.cu (argument checks, device guard, outputs, the current stream).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../quantize_checks.h"
#include "quantize_kernels.h"

namespace localsgd_ext {
namespace {

cuda::CodeFormat code_format(at::ScalarType codes_type) {
  if (codes_type == at::kByte) {
    return cuda::CodeFormat::kInt4;
  }
  return codes_type == at::kChar ? cuda::CodeFormat::kInt8 : cuda::CodeFormat::kFloat8E4M3;
}

std::tuple<at::Tensor, at::Tensor> quantize_blocks_cuda(const at::Tensor& x, int64_t block_size,
                                                        std::optional<at::ScalarType> code_dtype) {
  const at::ScalarType codes_type = check_quantize_arguments(x, block_size, code_dtype);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t num_blocks = x.numel() / block_size;
  at::Tensor codes = at::empty({x.numel() / codes_per_storage(codes_type)}, x.options().dtype(codes_type));
  at::Tensor scales = at::empty({num_blocks}, x.options());
  C10_CUDA_CHECK(cuda::launch_quantize_blocks(
      x.const_data_ptr<float>(), num_blocks, block_size, code_format(codes_type), codes.mutable_data_ptr(),
      scales.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
  return {codes, scales};
}

at::Tensor dequantize_blocks_cuda(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                                  double divisor) {
  check_dequantize_arguments(codes, scales, block_size, divisor);
  const c10::cuda::CUDAGuard device_guard(codes.device());
  const int64_t length = codes.size(1) * codes_per_storage(codes.scalar_type());
  at::Tensor out = at::empty({length}, scales.options());
  C10_CUDA_CHECK(cuda::launch_dequantize_blocks(codes.const_data_ptr(), code_format(codes.scalar_type()),
                                                scales.const_data_ptr<float>(), codes.size(0), length, block_size,
                                                static_cast<float>(divisor), out.mutable_data_ptr<float>(),
                                                c10::cuda::getCurrentCUDAStream(codes.device().index()).stream()));
  return out;
}

void quantize_change_cuda(const at::Tensor& snapshot, const at::Tensor& anchor,
                          const std::optional<at::Tensor>& residual, int64_t block_size, const at::Tensor& codes,
                          const at::Tensor& scales) {
  check_quantize_change_arguments(snapshot, anchor, residual, block_size, codes, scales);
  const c10::cuda::CUDAGuard device_guard(snapshot.device());
  C10_CUDA_CHECK(cuda::launch_quantize_change(
      snapshot.const_data_ptr<float>(), anchor.const_data_ptr<float>(),
      residual ? residual->mutable_data_ptr<float>() : nullptr, snapshot.numel() / block_size, block_size,
      code_format(codes.scalar_type()), const_cast<at::Tensor&>(codes).mutable_data_ptr(),
      const_cast<at::Tensor&>(scales).mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream(snapshot.device().index()).stream()));
}

void requantize_mean_cuda(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                          const at::Tensor& mean_codes, const at::Tensor& mean_scales) {
  check_requantize_mean_arguments(codes, scales, block_size, mean_codes, mean_scales);
  const c10::cuda::CUDAGuard device_guard(codes.device());
  C10_CUDA_CHECK(cuda::launch_requantize_mean(codes.const_data_ptr(), code_format(codes.scalar_type()),
                                              scales.const_data_ptr<float>(), codes.size(0),
                                              codes.size(1) * codes_per_storage(codes.scalar_type()), block_size,
                                              const_cast<at::Tensor&>(mean_codes).mutable_data_ptr(),
                                              const_cast<at::Tensor&>(mean_scales).mutable_data_ptr<float>(),
                                              c10::cuda::getCurrentCUDAStream(codes.device().index()).stream()));
}

void apply_quantized_mean_cuda(const at::Tensor& codes, const at::Tensor& scales, int64_t block_size,
                               const at::Tensor& anchor) {
  check_apply_quantized_mean_arguments(codes, scales, block_size, anchor);
  const c10::cuda::CUDAGuard device_guard(codes.device());
  C10_CUDA_CHECK(cuda::launch_apply_quantized_mean(codes.const_data_ptr(), code_format(codes.scalar_type()),
                                                   scales.const_data_ptr<float>(), anchor.numel(), block_size,
                                                   const_cast<at::Tensor&>(anchor).mutable_data_ptr<float>(),
                                                   c10::cuda::getCurrentCUDAStream(codes.device().index()).stream()));
}

} // namespace

TORCH_LIBRARY_IMPL(localsgd_ext, CUDA, m) {
  m.impl("quantize_change", &quantize_change_cuda);
  m.impl("requantize_mean", &requantize_mean_cuda);
  m.impl("apply_quantized_mean", &apply_quantized_mean_cuda);
  m.impl("quantize_blocks", &quantize_blocks_cuda);
  m.impl("dequantize_blocks", &dequantize_blocks_cuda);
}

} // namespace localsgd_ext
