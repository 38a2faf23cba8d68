// Launchers of the quantized-wire kernels. Plain C++ with CUDA runtime types only (see
// pack_unpack_kernels.h). Codes are int8, float8 e4m3fn bits, or int4 two per byte (`CodeFormat`); lengths
// count elements, not bytes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace localsgd_ext::cuda {

enum class CodeFormat { kInt8, kFloat8E4M3, kInt4 };

// x: num_blocks * block_size floats; writes as many int8 codes and num_blocks scales, on `stream`.
cudaError_t launch_quantize_blocks(const float* x, int64_t num_blocks, int64_t block_size, CodeFormat format,
                                   void* codes, float* scales, cudaStream_t stream);

// codes: rows x length bytes, scales: rows x (length / block_size); writes `length` floats to `out`.
cudaError_t launch_dequantize_blocks(const void* codes, CodeFormat format, const float* scales, int64_t rows,
                                     int64_t length, int64_t block_size, float divisor, float* out,
                                     cudaStream_t stream);

// snapshot, anchor (and residual, or null): num_blocks * block_size floats; writes the codes and scales of
// (snapshot - anchor + residual), and the residual it leaves, on `stream`.
cudaError_t launch_quantize_change(const float* snapshot, const float* anchor, float* residual, int64_t num_blocks,
                                   int64_t block_size, CodeFormat format, void* codes, float* scales,
                                   cudaStream_t stream);

// codes: rows x length bytes, scales: rows x (length / block_size); writes the codes and scales of the
// rows' mean (length bytes, length / block_size floats), on `stream`.
cudaError_t launch_requantize_mean(const void* codes, CodeFormat format, const float* scales, int64_t rows,
                                   int64_t length, int64_t block_size, void* mean_codes, float* mean_scales,
                                   cudaStream_t stream);

// anchor[k] += decode(codes[k]) * scales[k / block_size], for `length` elements, on `stream`.
cudaError_t launch_apply_quantized_mean(const void* codes, CodeFormat format, const float* scales, int64_t length,
                                        int64_t block_size, float* anchor, cudaStream_t stream);

} // namespace localsgd_ext::cuda
