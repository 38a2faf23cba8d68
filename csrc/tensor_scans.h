// The two reads of every value the agreement check may need: is anything NaN/Inf, and how large is
// the largest magnitude (the fp16 wire's scale). Each costs one host sync per device, not one per
// tensor (on CUDA a sync per tensor would stall the stream once for every parameter).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace localsgd_ext {

// The index of the first tensor holding a NaN or an infinity, or -1 when all are finite.
int64_t first_nonfinite(const std::vector<at::Tensor>& tensors);

// The largest |value| over the tensors (0 when they hold none); NaN when one holds NaN.
double largest_magnitude(const std::vector<at::Tensor>& tensors);

} // namespace localsgd_ext
