// The memllm operator library: every schema is defined here, once. Backends register their
// kernels in their own files (csrc/cpu/*.cpp, csrc/cuda/*.cu); the Triton kernels register
// separate ops from Python (memllm_kernels/triton/), and fake kernels and autograd live in
// memllm_kernels/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(memllm, m) {
  // out = hidden + table[ids] ([V, d] table) or hidden + table[ids, layer] ([V, L, d] table).
  // With check_ids=false the id range is not checked on the host (no device sync: usable under
  // CUDA graphs); kernels still never read outside the table and write NaN rows for bad ids.
  m.def(
      "tol_gather_add(Tensor hidden, Tensor ids, Tensor table, int? layer=None, "
      "bool check_ids=True) -> Tensor");
  // In place on hidden. Returns nothing: torch.compile only functionalizes mutating custom ops
  // whose outputs do not alias an input (the Python wrapper returns hidden).
  m.def(
      "tol_gather_add_(Tensor(a!) hidden, Tensor ids, Tensor table, int? layer=None, "
      "bool check_ids=True) -> ()");
}
