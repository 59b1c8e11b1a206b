// The memllm operator library: every schema is defined here, once. Backends register their
// kernels in their own files (csrc/cpu/*.cpp, csrc/cuda/*.cu); the Triton kernels register
// separate ops from Python (memllm_kernels/triton/), and fake kernels and autograd live in
// memllm_kernels/ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <string>
#include <vector>

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

  // ---- offload (memllm_kernels/offload, docs/offload.md): tables in host memory, a device row cache ----
  // out[rows[i]] = table[ids[i]] (out[i] without rows): whole token rows ([L, d] or [d]), a pure copy.
  // table may live in host memory that the device can map (registered / pinned, read over PCIe through
  // its UVA address) while ids, rows and out are on the device; or all on the CPU. Bad ids / rows raise
  // with check_ids=True; without the check a bad id writes an all-ones (NaN) row and a bad row is skipped.
  m.def("tol_host_gather(Tensor table, Tensor ids, Tensor(a!) out, Tensor? rows=None, bool check_ids=True) -> ()");
  // hidden + row(ids, layer), row = cache[slot_map[id]] on a hit (slot in [0, C)), host_table[id] on a
  // miss (slot -1): one pass that picks the cache slot or the host row per token.
  m.def(
      "tol_cached_gather_add(Tensor hidden, Tensor ids, Tensor slot_map, Tensor cache, Tensor host_table, "
      "int? layer=None, bool check_ids=True) -> Tensor");
  m.def(
      "tol_cached_gather_add_(Tensor(a!) hidden, Tensor ids, Tensor slot_map, Tensor cache, Tensor host_table, "
      "int? layer=None, bool check_ids=True) -> ()");
  // One step's rows, deduplicated, in one token-major pass: for position b, first[b] = the first position
  // holding ids[b], slots[b] = slot_map[ids[b]] (-1: miss), and, at first occurrences, layers
  // [layer_begin, layer_end) of the token's row (from its cache slot, else from host_table) go to out[b].
  // The model then reads out[first[b], l] with tol_gather_add_.
  m.def(
      "tol_cache_prefetch(Tensor ids, Tensor slot_map, Tensor cache, Tensor host_table, Tensor(a!) out, "
      "Tensor(b!) first, Tensor(c!) slots, int layer_begin=0, int? layer_end=None, bool check_ids=True) -> ()");
  // One step's cache bookkeeping on the device, after tol_cache_prefetch filled rows [N, L, d] and
  // first/slots: an LRU tail over hot slots that are never evicted, decided and applied without the host.
  // The step's distinct tokens in order of first occurrence: a resident token's slot is stamped
  // last_use = clock++ (hot slots keep last_use = INT64_MAX); a missing token takes the slot of least
  // last_use (a free slot has -1; ties: the lowest slot) among those not admitted this step
  // (admitted_at != step), evicting its owner, and rows[b] is copied into it. counters (int64 [7]):
  // clock, step, lookups (positions), hits (positions resident at the prefetch), unique misses,
  // admissions, evictions. Equal, decision for decision, to the host's CacheDirectory with an LRU tail.
  m.def(
      "tol_cache_admit(Tensor ids, Tensor first, Tensor slots, Tensor rows, Tensor(a!) slot_map, Tensor(b!) owner, "
      "Tensor(c!) last_use, Tensor(d!) admitted_at, Tensor(e!) cache, Tensor(f!) counters) -> ()");
  // An exact-size host allocation (anonymous mmap, not the caching pinned allocator, which rounds a
  // 47.7 GiB table up to 64 GiB), page-locked and device-mapped with cudaHostRegister when pin=True, the
  // build has CUDA; pin=True raises where it cannot pin (the Python wrapper asks only where a GPU is visible).
  // Freed with unregister + munmap.
  m.def("tol_host_alloc(int[] size, ScalarType dtype, bool pin=True) -> Tensor");
  // Whether GPU kernels can read this CPU tensor by address (registered or pinned memory: the mapping the
  // offload kernels use). Not torch's is_pinned(), which can answer False for registered memory.
  m.def("tol_host_mapped(Tensor t) -> bool");
}

// ---- autograd and version counters of the ops that write in place ----
// A C++ op without kernels for these keys falls through them: a leaf that requires grad was written with no
// error (its gradient silently wrong) and the written tensors kept their version, so autograd could not see
// that a tensor it saved had changed. These two boxed kernels do what torch's own in-place ops do.
namespace {

const char* const kWritesInPlace[] = {"tol_gather_add_", "tol_cached_gather_add_", "tol_host_gather",
                                      "tol_cache_prefetch", "tol_cache_admit"};

// The op's tensor arguments, in schema order, with their names and whether the op writes them.
template <typename Visit>
void for_each_tensor(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Visit& visit) {
  const auto& args = op.schema().arguments();
  const auto inputs = torch::jit::last(*stack, args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    if (!inputs[i].isTensor()) continue;
    const bool written = args[i].alias_info() != nullptr && args[i].alias_info()->isWrite();
    visit(args[i].name(), inputs[i].toTensor(), written);
  }
}

// Autograd: none of these ops has a derivative, so no argument may require grad while grad mode is on.
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    for_each_tensor(op, stack, [&](const std::string& name, const at::Tensor& t, bool) {
      TORCH_CHECK(!t.requires_grad(), op.schema().name(), ": ", name,
                  " requires grad, but this op writes in place and has no autograd; run it under torch.no_grad(), "
                  "or use the out-of-place op where there is one");
    });
  }
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView: bump the version of each tensor written. An inference tensor has no version counter and is
// skipped, as torch.library custom ops skip it (the engine writes its inference-mode buffers under no_grad).
void bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  std::vector<at::Tensor> written;
  for_each_tensor(op, stack, [&](const std::string&, const at::Tensor& t, bool writes) {
    if (writes && !t.is_inference()) written.push_back(t);
  });
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, Autograd, m) {
  for (const char* name : kWritesInPlace) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
}

TORCH_LIBRARY_IMPL(memllm, ADInplaceOrView, m) {
  for (const char* name : kWritesInPlace) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_versions>());
}
