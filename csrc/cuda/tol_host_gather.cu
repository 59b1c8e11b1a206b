// CUDA kernel of memllm::tol_host_gather: out[rows[i]] = table[ids[i]], whole token rows, where table may
// be host memory mapped for the device (the pinned host tier): the kernel reads it over PCIe itself (UVA),
// with no staging copy and no cudaMemcpy per row.
//
// The work is flat over (token, 16-byte vector) pairs with a grid-stride loop, so that even one token
// (decode: a 96 KiB row at the 1b preset) spreads over many blocks: a PCIe read takes ~1-2 us, and
// only many loads in flight (each thread issues kUnroll independent loads before its stores) come near
// the link's bandwidth. Target: >= 85% of a pinned cudaMemcpy of the same bytes (bench/bench_offload.py).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "tol_offload_cuda.cuh"

namespace memllm {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename vec_t, typename index_t>
__global__ void host_gather_kernel(char* __restrict__ out, int64_t out_rs, const char* __restrict__ table,
                                   int64_t table_rs, const index_t* __restrict__ ids,
                                   const int64_t* __restrict__ rows, int64_t N, int64_t V, int64_t M,
                                   int64_t row_vecs) {
  const int64_t total = N * row_vecs;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k0 < total;
       k0 += stride * kUnroll) {
    vec_t v[kUnroll];
    vec_t* dst[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll PCIe reads in flight per thread
      const int64_t k = k0 + u * stride;
      dst[u] = nullptr;
      if (k >= total) continue;
      const int64_t i = k / row_vecs, j = k - i * row_vecs;
      const int64_t r = rows != nullptr ? rows[i] : i;
      if (r < 0 || r >= M) continue;  // only with check_ids=false: skip, never write outside out
      const int64_t id = static_cast<int64_t>(ids[i]);
      dst[u] = reinterpret_cast<vec_t*>(out + r * out_rs) + j;
      v[u] = (id >= 0 && id < V) ? reinterpret_cast<const vec_t*>(table + id * table_rs)[j] : all_ones<vec_t>();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (dst[u] != nullptr) *dst[u] = v[u];
    }
  }
}

void host_gather_cuda(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& out,
                      const std::optional<at::Tensor>& rows_in, bool check_ids) {
  const std::string op = "tol_host_gather";
  check_host_gather_args(table, ids, out, rows_in);
  TORCH_CHECK(out.device().is_cuda() && ids.device() == out.device(),
              op + ": ids and out must be on one CUDA device, got " + ids.device().str() + " and " + out.device().str());
  const int64_t N = ids.size(0), V = table.size(0), M = out.size(0);
  at::Tensor rows;
  if (rows_in.has_value()) {
    TORCH_CHECK(rows_in->device() == out.device(),
                op + ": rows must be on out's device " + out.device().str() + ", got " + rows_in->device().str());
    rows = rows_in->to(at::kLong).contiguous();
  }
  const c10::cuda::OptionalCUDAGuard guard(out.device());
  const at::Tensor ids_c = ids.contiguous();
  if (check_ids) {
    check_range_cuda("tol_host_gather", ids_c, V, false);
    if (rows.defined()) check_range_cuda("tol_host_gather", rows, M, true);
  }
  if (N == 0 || token_row_elems(table) == 0) return;
  const char* src = device_address(table, out.device(), op, "table");
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t es = table.element_size();
  const int64_t row_bytes = token_row_elems(table) * es;
  const int64_t src_rs = table.stride(0) * es, dst_rs = out.stride(0) * es;
  const int w = copy_width(row_bytes, {reinterpret_cast<int64_t>(src), reinterpret_cast<int64_t>(dst), src_rs, dst_rs});
  const int64_t row_vecs = row_bytes / w;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, out.device().index()));
  // Enough blocks to keep every SM busy with loads in flight (8 x 256 threads each), never more than the work.
  const int64_t want = (N * row_vecs + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 8)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* row_ptr = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(ids_c.scalar_type(), "tol_host_gather_cuda", [&] {
    const index_t* id_ptr = ids_c.const_data_ptr<index_t>();
    with_copy_type(w, [&](auto vec) {
      host_gather_kernel<decltype(vec), index_t><<<blocks, kThreads, 0, stream>>>(dst, dst_rs, src, src_rs, id_ptr,
                                                                                row_ptr, N, V, M, row_vecs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CUDA, m) {
  m.impl("tol_host_gather", &host_gather_cuda);
}

}  // namespace memllm
