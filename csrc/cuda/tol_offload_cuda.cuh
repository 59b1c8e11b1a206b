// Helpers shared by the CUDA offload kernels (tol_host_gather.cu, tol_cached_gather_add.cu,
// tol_cache_prefetch.cu; tol_gather_add.cu uses the id check): the device address of a table that may live
// in host memory, id range checks, and the widest aligned vector a row copy can use.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <string>

#include "../tol_offload.h"

namespace memllm {

// The address a kernel on `device` reads `t` through: its own pointer for a tensor on that device; for
// host memory, the device mapping of registered (tol_host_alloc) or pinned memory, read over PCIe (UVA).
// Pageable memory has no mapping: a clear error instead of a kernel fault.
inline const char* device_address(const at::Tensor& t, const at::Device& device, const std::string& op,
                                  const char* name) {
  if (t.device().is_cuda()) {
    TORCH_CHECK(t.device() == device, op + ": " + name + " is on " + t.device().str() + " but the kernel runs on " +
                                          device.str());
    return static_cast<const char*>(t.const_data_ptr());
  }
  TORCH_CHECK(t.device().is_cpu(), op + ": " + name + " must be on " + device.str() + " or in host memory, got " +
                                       t.device().str());
  if (t.numel() == 0) return nullptr;
  // Map the allocation's base (what was registered), then add the tensor's offset into it.
  char* base = static_cast<char*>(const_cast<void*>(t.storage().data()));
  void* mapped = nullptr;
  // A lookup, not a stream operation: allowed while a CUDA graph is captured (OffloadEngine.capture_step
  // records the step's host-row reads into the graph), where the default capture mode could refuse it.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  const cudaError_t err = cudaHostGetDevicePointer(&mapped, base, 0);
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls do not see it
    TORCH_CHECK(false, op + ": " + name + " is in pageable host memory, which a GPU kernel cannot read (" +
                           cudaGetErrorString(err) + "); use the pinned host tier "
                           "(memllm_kernels.offload.HostTable) or pass a tensor on " + device.str());
  }
  const int64_t offset = static_cast<const char*>(t.const_data_ptr()) - base;
  return static_cast<const char*>(mapped) + offset;
}

// One small reduction and one device sync (the ops' check_ids=True path; pass false under CUDA graphs).
inline void check_range_cuda(const char* op, const at::Tensor& idx, int64_t bound, bool is_row) {
  if (idx.numel() == 0) return;
  auto [lo, hi] = at::aminmax(idx);
  const at::Tensor both = at::stack({lo.to(at::kLong), hi.to(at::kLong)}).cpu();
  const int64_t lo_v = both[0].item<int64_t>(), hi_v = both[1].item<int64_t>();
  if (lo_v >= 0 && hi_v < bound) return;
  const int64_t bad = lo_v < 0 ? lo_v : hi_v;
  const int64_t pos = (idx.reshape(-1) == bad).nonzero()[0][0].item<int64_t>();
  if (is_row) throw_bad_row(op, pos, bad, bound);
  throw_bad_id(op, pos, bad, bound);
}

// Bytes per access for copying rows of `row_bytes` between these addresses and byte strides: 16 when
// everything allows it (one ld/st.v4 per thread), else the widest that divides them all.
inline int copy_width(int64_t row_bytes, std::initializer_list<int64_t> addresses_and_strides) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = row_bytes % w == 0;
    for (int64_t x : addresses_and_strides) ok = ok && x % w == 0;
    if (ok) return w;
  }
  return 1;
}

// f(vec_t{}) with vec_t the unsigned type of `width` bytes (copy_width's answer): the kernel's access type.
template <typename F>
void with_copy_type(int width, F&& f) {
  switch (width) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

template <typename V> __device__ inline V all_ones() {
  V v;
  unsigned char* p = reinterpret_cast<unsigned char*>(&v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(V)); ++i) p[i] = 0xFF;  // NaN in every float dtype
  return v;
}

}  // namespace memllm
