// The operator schemas, declared once. Device implementations register against them in their own
// files (pack_unpack_cpu.cpp, cuda/...), and the engine calls them through the dispatcher.
#include <torch/library.h>

TORCH_LIBRARY(localsgd_ext, m) {
  // Copies each tensor into `buffer` (1-D, contiguous, same dtype and device) at its element offset.
  // `scale` (a power of two, in practice) multiplies float32 values cast to a narrower buffer before
  // the cast, so that an fp16 wire neither overflows nor flushes small values; it must be 1 otherwise.
  m.def("pack_into(Tensor[] tensors, int[] offsets, Tensor(a!) buffer, float scale=1.0) -> ()");
  // Copies `buffer` back into each tensor from its element offset, dividing by `divisor` on the way
  // (computed in float for fp16/bf16, like torch's `tensor / divisor`). A divisor of 1 is a plain copy.
  m.def("unpack_from(Tensor buffer, int[] offsets, float divisor, Tensor(a!)[] tensors) -> ()");
  // Overlapped sync's merge: each tensor t becomes t + (sum / divisor - snapshot), reading sum and
  // snapshot (the buffer as packed before its all_reduce) from its offset; computed in float32 for
  // fp16/bf16 tensors, in the tensor's dtype otherwise. Buffers packed with pack_into's `scale` (an
  // fp16 wire) hold every value times `scale`: t + (sum / (divisor * scale) - snapshot / scale).
  m.def(
      "merge_into(Tensor sum, Tensor snapshot, int[] offsets, float divisor, Tensor(a!)[] tensors, "
      "float scale=1.0) -> ()");
  // The quantized wires: `x` (1-D float32, a multiple of block_size long) in blocks of block_size
  // elements, each with its own scale. int8 codes (the default): scale max|x| / 127, codes
  // round-half-even(x / scale) in -127..127; float8_e4m3fn codes: scale max|x| / 448, codes x / scale
  // rounded to e4m3 (ties to even). Returns (codes of `code_dtype` like x, scales: float32, per block).
  m.def("quantize_blocks(Tensor x, int block_size, ScalarType? code_dtype=None) -> (Tensor, Tensor)");
  // Sums the rows of `codes` (rows x length, int8 or float8_e4m3fn) dequantized with `scales`
  // (rows x length/block_size), in row order, in float32, then divides by `divisor`: one row
  // dequantizes, W rows average.
  m.def("dequantize_blocks(Tensor codes, Tensor scales, int block_size, float divisor=1.0) -> Tensor");
  // The quantized wire's send side in one pass: the codes and scales of each block of
  // `snapshot - anchor (+ residual)`, as quantize_blocks makes them, and with a residual (error
  // feedback) what each code leaves out written back into it. Inputs 1-D float32 of one length.
  // Writes into `codes` (whose dtype, int8 or float8_e4m3fn, picks the code) and `scales`.
  m.def(
      "quantize_change(Tensor snapshot, Tensor anchor, Tensor(a!)? residual, int block_size, Tensor(b!) codes, "
      "Tensor(c!) scales) -> ()");
  // The reduction's middle in one pass: the mean over the rows of `codes` / `scales` (as
  // dequantize_blocks with divisor = rows computes it), quantized again into `mean_codes` / `mean_scales`
  // (as quantize_blocks would), the mean never stored.
  m.def(
      "requantize_mean(Tensor codes, Tensor scales, int block_size, Tensor(a!) mean_codes, Tensor(b!) mean_scales) -> "
      "()");
  // The receive side in one pass: `anchor` moved by the dequantized codes (the mean change),
  // anchor[k] += code[k] * scales[k / block_size].
  m.def("apply_quantized_mean(Tensor codes, Tensor scales, int block_size, Tensor(a!) anchor) -> ()");
  // The same send and receive read and write the tensors themselves, with no flat copy of them: `anchor`
  // (and codes, scales, residual, snapshot) cover the elements `start .. start + anchor.numel()` of the flat
  // layout in which tensor i sits at offsets[i] (a window: a piece of the layout, or all of it).
  // quantize_tensors_change is quantize_change of the window's elements (zero where no tensor lies), which
  // it also writes into `snapshot` when given; apply_quantized_mean_to is apply_quantized_mean followed
  // by every tensor element in the window set to the moved anchor's.
  m.def(
      "quantize_tensors_change(Tensor[] tensors, int[] offsets, int start, Tensor anchor, Tensor(a!)? residual, "
      "int block_size, Tensor(b!) codes, Tensor(c!) scales, Tensor(d!)? snapshot) -> ()");
  m.def(
      "apply_quantized_mean_to(Tensor codes, Tensor scales, int block_size, Tensor(a!) anchor, int[] offsets, "
      "int start, Tensor(b!)[] tensors) -> ()");
}
