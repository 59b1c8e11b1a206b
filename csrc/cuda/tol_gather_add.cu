// CUDA kernel of memllm::tol_gather_add / tol_gather_add_: out[t] = hidden[t] + table[ids[t](, layer)].
//
// Memory-bound: per token it reads one hidden row and one table row and writes one row (about 6*d
// bytes in bf16), so the kernel is judged against device-copy bandwidth. Each thread moves 16-byte
// vectors of hidden (8 bf16 / 4 fp32) when every pointer and stride allows it, else single
// elements. Blocks hold whole rows (threads along d, rows along y) so that small d still fills a
// block; a grid-stride loop over rows keeps the grid bounded.
//
// Extension points: a row-quantized table is another `load_vec` that dequantizes with the row's
// scale; a fused add + RMSNorm needs a block-wide sum of squares per row before the store.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../tol_gather_add.h"
#include "tol_offload_cuda.cuh"  // check_range_cuda
#include "vec.cuh"

namespace memllm {
namespace {

template <typename hidden_t, typename table_t, typename index_t, int VEC>
__global__ void tol_gather_add_kernel(hidden_t* __restrict__ out, int64_t out_rs,
                                      const hidden_t* __restrict__ hidden, int64_t hidden_rs,
                                      const index_t* __restrict__ ids, const table_t* __restrict__ table,
                                      int64_t table_rs, int64_t layer_offset, int64_t num_rows, int64_t T,
                                      int64_t d) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t id = static_cast<int64_t>(ids[t]);
    if (id < 0 || id >= num_rows) {
      nan_row(out + t * out_rs, d);
    } else {
      add_row<hidden_t, table_t, VEC>(out + t * out_rs, hidden + t * hidden_rs, table + id * table_rs + layer_offset, d);
    }
  }
}

void launch(const char* op, const at::Tensor& out, int64_t out_rs, const at::Tensor& hidden, int64_t hidden_rs,
            const at::Tensor& ids_flat, const at::Tensor& table, const TolTableView& tv, bool check_ids) {
  const int64_t T = ids_flat.numel();
  const int64_t d = hidden.size(-1);
  // One small reduction and one device sync; check_ids=false skips it (CUDA graphs, ids validated once).
  if (check_ids) check_range_cuda(op, ids_flat, tv.num_rows, false);
  if (T == 0 || d == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids_flat.scalar_type(), "tol_gather_add_cuda_ids", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "tol_gather_add_cuda", [&] {
      using hidden_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "tol_gather_add_cuda_table", [&] {
        using table_t = scalar_t;
        constexpr int kVec = 16 / sizeof(hidden_t);  // 16-byte accesses of hidden and out
        const hidden_t* h = hidden.const_data_ptr<hidden_t>();
        hidden_t* o = out.data_ptr<hidden_t>();
        const table_t* tab = table.const_data_ptr<table_t>();
        const bool vec_ok = d % kVec == 0 && out_rs % kVec == 0 && hidden_rs % kVec == 0 &&
                            tv.row_stride % kVec == 0 && tv.layer_offset % kVec == 0 && aligned(h, 16) &&
                            aligned(o, 16) && aligned(tab, sizeof(table_t) * kVec);
        const RowLaunch rl = row_launch(T, d, vec_ok ? kVec : 1);
        const index_t* id_ptr = ids_flat.const_data_ptr<index_t>();
        if (vec_ok) {
          tol_gather_add_kernel<hidden_t, table_t, index_t, kVec><<<rl.grid, rl.block, 0, stream>>>(
              o, out_rs, h, hidden_rs, id_ptr, tab, tv.row_stride, tv.layer_offset, tv.num_rows, T, d);
        } else {
          tol_gather_add_kernel<hidden_t, table_t, index_t, 1><<<rl.grid, rl.block, 0, stream>>>(
              o, out_rs, h, hidden_rs, id_ptr, tab, tv.row_stride, tv.layer_offset, tv.num_rows, T, d);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor tol_gather_add_cuda(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& table,
                               std::optional<int64_t> layer, bool check_ids) {
  const TolTableView v = check_tol_gather_add_args("tol_gather_add", hidden, ids, table, layer);
  return run_out_of_place(hidden, ids, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                           const at::Tensor& ids_flat) {
    launch("tol_gather_add", out, out_rs, h, h_rs, ids_flat, table, v, check_ids);
  });
}

void tol_gather_add_cuda_(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& table,
                          std::optional<int64_t> layer, bool check_ids) {
  const TolTableView v = check_tol_gather_add_args("tol_gather_add_", hidden, ids, table, layer);
  run_in_place(hidden, ids, {table}, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                const at::Tensor& ids_flat) {
    launch("tol_gather_add_", out, out_rs, h, h_rs, ids_flat, table, v, check_ids);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CUDA, m) {
  m.impl("tol_gather_add", &tol_gather_add_cuda);
  m.impl("tol_gather_add_", &tol_gather_add_cuda_);
}

}  // namespace memllm
