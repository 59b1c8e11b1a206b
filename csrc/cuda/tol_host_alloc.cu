// The CUDA half of memllm::tol_host_alloc (csrc/cpu/tol_host_alloc.cpp allocates): installs the hooks that
// page-lock an exact-size host allocation and map it for the device (cudaHostRegister), and undo it.
// Mapped | Portable: every device (and context) can read the rows through their UVA address, which the
// offload kernels get from cudaHostGetDevicePointer (csrc/cuda/tol_offload_cuda.cuh).
#include <cuda_runtime.h>

#include "../tol_offload.h"

namespace memllm {
namespace {

std::string pin(void* ptr, size_t bytes) {
  const cudaError_t err = cudaHostRegister(ptr, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();
  return cudaGetErrorString(err);
}

void unpin(void* ptr) {
  // At interpreter exit the CUDA runtime may already be gone; the unmap that follows frees the pages anyway.
  if (cudaHostUnregister(ptr) != cudaSuccess) (void)cudaGetLastError();
}

bool device_present() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

struct InstallHooks {
  InstallHooks() {
    HostPinHooks& h = host_pin_hooks();
    h.pin = &pin;
    h.unpin = &unpin;
    h.device_present = &device_present;
  }
};
const InstallHooks install_hooks;

}  // namespace
}  // namespace memllm
