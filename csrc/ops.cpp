// The operator schemas, declared once. Device implementations register against them in their own
// files (pack_unpack_cpu.cpp, cuda/...), and the engine calls them through the dispatcher.
#include <torch/library.h>

TORCH_LIBRARY(localsgd_ext, m) {
  // Copies each tensor into `buffer` (1-D, contiguous, same dtype and device) at its element offset.
  m.def("pack_into(Tensor[] tensors, int[] offsets, Tensor(a!) buffer) -> ()");
  // Copies `buffer` back into each tensor from its element offset, dividing by `divisor` on the way
  // (computed in float for fp16/bf16, like torch's `tensor / divisor`). A divisor of 1 is a plain copy.
  m.def("unpack_from(Tensor buffer, int[] offsets, float divisor, Tensor(a!)[] tensors) -> ()");
}
