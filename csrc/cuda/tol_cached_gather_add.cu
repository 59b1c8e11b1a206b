// CUDA kernel of memllm::tol_cached_gather_add(_): out[t] = hidden[t] + row(ids[t], layer), the row read
// from the device cache slot slot_map[id] on a hit and from the host table (mapped memory, over PCIe) on
// a miss, chosen per token in the same pass as the add. FBGEMM's MANAGED_CACHING makes the same hit/miss
// choice for embedding bags; here the residual add is fused in, so a hit costs what tol_gather_add costs.
//
// Layout as in tol_gather_add.cu: threads along d with 16-byte vectors of hidden where everything is
// aligned, rows along y, a grid-stride loop over tokens. A slot outside [0, C) reads as a miss, an id
// outside [0, V) (check_ids=false only) writes a NaN row: nothing outside either table is ever read.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "tol_offload_cuda.cuh"
#include "vec.cuh"

namespace memllm {
namespace {

template <typename hidden_t, typename table_t, typename index_t, int VEC>
__global__ void cached_gather_add_kernel(hidden_t* __restrict__ out, int64_t out_rs,
                                         const hidden_t* __restrict__ hidden, int64_t hidden_rs,
                                         const index_t* __restrict__ ids, const int32_t* __restrict__ slot_map,
                                         const table_t* __restrict__ cache, int64_t cache_rs, int64_t num_slots,
                                         const table_t* __restrict__ host, int64_t host_rs, int64_t num_rows,
                                         int64_t layer_offset_cache, int64_t layer_offset_host, int64_t T,
                                         int64_t d) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t id = static_cast<int64_t>(ids[t]);
    if (id < 0 || id >= num_rows) {
      nan_row(out + t * out_rs, d);
      continue;
    }
    const int64_t slot = slot_map[id];
    const table_t* r = (slot >= 0 && slot < num_slots) ? cache + slot * cache_rs + layer_offset_cache
                                                       : host + id * host_rs + layer_offset_host;
    add_row<hidden_t, table_t, VEC>(out + t * out_rs, hidden + t * hidden_rs, r, d);
  }
}

void launch(const char* op, const at::Tensor& out, int64_t out_rs, const at::Tensor& hidden, int64_t hidden_rs,
            const at::Tensor& ids_flat, const at::Tensor& slot_map, const at::Tensor& cache,
            const at::Tensor& host_table, const CachedViews& v, bool check_ids) {
  const int64_t T = ids_flat.numel();
  const int64_t d = hidden.size(-1);
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  if (check_ids) check_range_cuda(op, ids_flat, v.host.num_rows, false);
  if (T == 0 || d == 0) return;
  const at::Tensor sm = slot_map.contiguous();
  const char* host_addr = device_address(host_table, hidden.device(), op, "host_table");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids_flat.scalar_type(), "tol_cached_gather_add_cuda_ids", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "tol_cached_gather_add_cuda", [&] {
      using hidden_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(), "tol_cached_gather_add_cuda_t", [&] {
        using table_t = scalar_t;
        constexpr int kVec = 16 / sizeof(hidden_t);
        const hidden_t* h = hidden.const_data_ptr<hidden_t>();
        hidden_t* o = out.data_ptr<hidden_t>();
        const table_t* c = cache.const_data_ptr<table_t>();
        const table_t* ht = reinterpret_cast<const table_t*>(host_addr);
        const bool vec_ok = d % kVec == 0 && out_rs % kVec == 0 && hidden_rs % kVec == 0 &&
                            v.cache.row_stride % kVec == 0 && v.cache.layer_offset % kVec == 0 &&
                            v.host.row_stride % kVec == 0 && v.host.layer_offset % kVec == 0 && aligned(h, 16) &&
                            aligned(o, 16) && aligned(c, sizeof(table_t) * kVec) && aligned(ht, sizeof(table_t) * kVec);
        const RowLaunch rl = row_launch(T, d, vec_ok ? kVec : 1);
        const index_t* id_ptr = ids_flat.const_data_ptr<index_t>();
        if (vec_ok) {
          cached_gather_add_kernel<hidden_t, table_t, index_t, kVec><<<rl.grid, rl.block, 0, stream>>>(
              o, out_rs, h, hidden_rs, id_ptr, sm.const_data_ptr<int32_t>(), c, v.cache.row_stride, v.cache.num_rows,
              ht, v.host.row_stride, v.host.num_rows, v.cache.layer_offset, v.host.layer_offset, T, d);
        } else {
          cached_gather_add_kernel<hidden_t, table_t, index_t, 1><<<rl.grid, rl.block, 0, stream>>>(
              o, out_rs, h, hidden_rs, id_ptr, sm.const_data_ptr<int32_t>(), c, v.cache.row_stride, v.cache.num_rows,
              ht, v.host.row_stride, v.host.num_rows, v.cache.layer_offset, v.host.layer_offset, T, d);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor cached_gather_add_cuda(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& slot_map,
                                  const at::Tensor& cache, const at::Tensor& host_table, std::optional<int64_t> layer,
                                  bool check_ids) {
  const CachedViews v = check_cached_gather_add_args("tol_cached_gather_add", hidden, ids, slot_map, cache, host_table, layer);
  return run_out_of_place(hidden, ids, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                           const at::Tensor& ids_flat) {
    launch("tol_cached_gather_add", out, out_rs, h, h_rs, ids_flat, slot_map, cache, host_table, v, check_ids);
  });
}

void cached_gather_add_cuda_(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& slot_map,
                             const at::Tensor& cache, const at::Tensor& host_table, std::optional<int64_t> layer,
                             bool check_ids) {
  const CachedViews v = check_cached_gather_add_args("tol_cached_gather_add_", hidden, ids, slot_map, cache, host_table, layer);
  run_in_place(hidden, ids, {slot_map, cache, host_table}, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                const at::Tensor& ids_flat) {
    launch("tol_cached_gather_add_", out, out_rs, h, h_rs, ids_flat, slot_map, cache, host_table, v, check_ids);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CUDA, m) {
  m.impl("tol_cached_gather_add", &cached_gather_add_cuda);
  m.impl("tol_cached_gather_add_", &cached_gather_add_cuda_);
}

}  // namespace memllm
