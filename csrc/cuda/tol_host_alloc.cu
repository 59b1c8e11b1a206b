// The CUDA half of memllm::tol_host_alloc (csrc/cpu/tol_host_alloc.cpp allocates): installs the hooks that
// page-lock an exact-size host allocation and map it for the device (cudaHostRegister), and undo it.
// Mapped | Portable: every device (and context) can read the rows through their UVA address, which the
// offload kernels get from cudaHostGetDevicePointer (csrc/cuda/tol_offload_cuda.cuh).
#include <cuda_runtime.h>

#include <string>

#include "../tol_offload.h"

namespace memllm {
namespace {

// cudaHostGetDevicePointer: the mapping the kernels read the table through (device_address in
// tol_offload_cuda.cuh). The sticky-free error is cleared.
cudaError_t device_pointer_error(const void* ptr) {
  void* dev = nullptr;
  const cudaError_t err = cudaHostGetDevicePointer(&dev, const_cast<void*>(ptr), 0);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

bool mapped(const void* ptr) { return device_pointer_error(ptr) == cudaSuccess; }

std::string pin(void* ptr, size_t bytes) {
  const cudaError_t err = cudaHostRegister(ptr, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("cudaHostRegister: ") + cudaGetErrorString(err);
  }
  // Check the mapping now, not at the first gather.
  const cudaError_t map_err = device_pointer_error(ptr);
  if (map_err != cudaSuccess) {
    (void)cudaHostUnregister(ptr);
    (void)cudaGetLastError();
    return std::string("registered, but cudaHostGetDevicePointer: ") + cudaGetErrorString(map_err);
  }
  return "";
}

void unpin(void* ptr) {
  // At interpreter exit the CUDA runtime may already be gone; the unmap that follows frees the pages anyway.
  if (cudaHostUnregister(ptr) != cudaSuccess) (void)cudaGetLastError();
}

struct InstallHooks {
  InstallHooks() {
    HostPinHooks& h = host_pin_hooks();
    h.pin = &pin;
    h.unpin = &unpin;
    h.mapped = &mapped;
  }
};
const InstallHooks install_hooks;

}  // namespace
}  // namespace memllm
