// memllm::tol_host_alloc: the pinned host tier's memory, allocated at its exact size.
//
// Why not torch.empty(..., pin_memory=True): PyTorch's caching host allocator rounds every request up
// to a power of two, so the 47.7 GiB fp32 table of the 1b preset would take 64 GiB of page-locked RAM
// (peers hit this). An anonymous mmap is exact to the page; cudaHostRegister then page-locks and maps
// it for the device (csrc/cuda/tol_host_alloc.cu installs that hook), so kernels read rows over PCIe
// through the pointer itself (UVA). The tensor owns the mapping: its deleter unregisters and unmaps.
// Registered as CompositeExplicitAutograd kernels: tol_host_alloc has no tensor inputs to dispatch on, and
// tol_host_mapped answers for any device (False off the CPU).
#include <sys/mman.h>

#include <torch/library.h>

#include <cerrno>
#include <cstring>

#include "../tol_offload.h"

namespace memllm {

HostPinHooks& host_pin_hooks() {
  static HostPinHooks hooks;
  return hooks;
}

namespace {

at::Tensor tol_host_alloc(c10::IntArrayRef size, at::ScalarType dtype, bool pin) {
  // Checked products: a wrapped size would map a few bytes under a tensor of the full shape (a crash on
  // first use). Any size a mapping could serve stays far below INT64_MAX bytes.
  // Raw bytes under a tensor of any dtype: a quantized one (it has no quantizer) segfaults when read, and a
  // complex or bool buffer is no ToL either. Floating point (the tables) and integers (raw byte buffers) only.
  TORCH_CHECK_TYPE(at::isFloatingType(dtype) || at::isIntegralType(dtype, /*includeBool=*/false),
                   "tol_host_alloc: dtype must be a floating-point or integer dtype, got ", dtype);
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  for (size_t i = 0; i < size.size(); ++i) TORCH_CHECK(size[i] >= 0, "tol_host_alloc: negative size " + to_str(size));
  for (size_t i = 0; i < size.size(); ++i)
    if (size[i] == 0) return at::empty(size, options);
  int64_t bytes = static_cast<int64_t>(c10::elementSize(dtype));
  for (size_t i = 0; i < size.size(); ++i)
    TORCH_CHECK(!__builtin_mul_overflow(bytes, size[i], &bytes),
                "tol_host_alloc: size " + to_str(size) + " of " + std::string(c10::toString(dtype)) +
                    " is more bytes than an int64 holds");
  // No quiet fallback to ordinary memory: the Python wrapper decides whether to ask (a GPU is visible, the CUDA
  // kernels are built); asked, this pins or raises.
  const HostPinHooks& hooks = host_pin_hooks();
  TORCH_CHECK(!pin || hooks.pin != nullptr,
              "tol_host_alloc: pin=True needs the CUDA build of memllm_kernels._C (cudaHostRegister); this one "
              "has CPU kernels only (pass pin=False)");
  void* ptr = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(ptr != MAP_FAILED, "tol_host_alloc: mmap of " + to_str(bytes) +
                                     " bytes failed: " + std::strerror(errno));
  // Huge pages where the kernel allows them: ~3M fewer page faults to fill a 12.6 GB table. Advice only.
  (void)madvise(ptr, static_cast<size_t>(bytes), MADV_HUGEPAGE);
  bool pinned = false;
  if (pin) {
    const std::string err = hooks.pin(ptr, static_cast<size_t>(bytes));
    if (!err.empty()) {
      munmap(ptr, static_cast<size_t>(bytes));
      TORCH_CHECK(false, "tol_host_alloc: page-locking " + to_str(bytes) +
                             " bytes failed: " + err +
                             " (page-locked memory is limited by RAM and `ulimit -l`; pass pin=False for "
                             "ordinary memory)");
    }
    pinned = true;
  }
  auto deleter = [bytes, pinned](void* p) {
    if (pinned && host_pin_hooks().unpin != nullptr) host_pin_hooks().unpin(p);
    munmap(p, static_cast<size_t>(bytes));
  };
  return at::from_blob(ptr, size, deleter, options);
}

// The base of the allocation is what was registered (as in device_address, csrc/cuda/tol_offload_cuda.cuh).
bool tol_host_mapped(const at::Tensor& t) {
  const HostPinHooks& hooks = host_pin_hooks();
  if (!t.device().is_cpu() || t.numel() == 0 || hooks.mapped == nullptr) return false;
  return hooks.mapped(t.storage().data());
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CompositeExplicitAutograd, m) {
  m.impl("tol_host_alloc", &tol_host_alloc);
  m.impl("tol_host_mapped", &tol_host_mapped);
}

}  // namespace memllm
