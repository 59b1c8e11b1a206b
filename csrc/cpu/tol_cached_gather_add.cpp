// CPU kernel of memllm::tol_cached_gather_add(_): out[t] = hidden[t] + row(ids[t], layer), where the row
// comes from cache[slot] when slot = slot_map[id] is in [0, C) (a hit) and from host_table[id] otherwise.
//
// The arithmetic is tol_gather_add's (sum in float32, float64 if an input is float64, one rounding to
// hidden's dtype), so a cached run is bit-identical to the in-memory one. Which of the two tables a row
// comes from is decided per token, in the same pass as the add: no separate hit/miss gathers.
// A slot outside [0, C) counts as a miss: the kernel never reads outside the cache.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tol_offload.h"
#include "row_kernel.h"

namespace memllm {
namespace {

template <typename hidden_t, typename table_t, typename index_t>
struct Args {
  hidden_t* out;
  int64_t out_rs;
  const hidden_t* hidden;
  int64_t hidden_rs;
  const index_t* ids;
  const int32_t* slot_map;
  const table_t* cache;
  TolTableView cv;
  const table_t* host;
  TolTableView hv;
  int64_t d;
};

template <typename hidden_t, typename table_t, typename index_t>
__attribute__((always_inline)) inline void add_rows(const Args<hidden_t, table_t, index_t>& a, int64_t begin,
                                                    int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const int64_t id = static_cast<int64_t>(a.ids[t]);
    hidden_t* o = a.out + t * a.out_rs;
    if (id < 0 || id >= a.hv.num_rows) {
      nan_row(o, a.d);
      continue;
    }
    const int64_t slot = a.slot_map[id];
    const table_t* row = (slot >= 0 && slot < a.cv.num_rows) ? a.cache + slot * a.cv.row_stride + a.cv.layer_offset
                                                             : a.host + id * a.hv.row_stride + a.hv.layer_offset;
    add_row(o, a.hidden + t * a.hidden_rs, row, a.d);
  }
}

void launch(const char* op, const at::Tensor& out, int64_t out_rs, const at::Tensor& hidden, int64_t hidden_rs,
            const at::Tensor& ids_flat, const at::Tensor& slot_map, const at::Tensor& cache,
            const at::Tensor& host_table, const CachedViews& v, bool check_ids) {
  const int64_t T = ids_flat.numel();
  const int64_t d = hidden.size(-1);
  if (T == 0) return;
  const at::Tensor sm = slot_map.contiguous();
  AT_DISPATCH_INDEX_TYPES(ids_flat.scalar_type(), "tol_cached_gather_add_cpu_ids", [&] {
    const index_t* ids = ids_flat.const_data_ptr<index_t>();
    if (check_ids) check_id_range(op, ids, T, v.host.num_rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "tol_cached_gather_add_cpu", [&] {
      using hidden_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(), "tol_cached_gather_add_cpu_t", [&] {
        using table_t = scalar_t;
        Args<hidden_t, table_t, index_t> a{out.data_ptr<hidden_t>(), out_rs, hidden.const_data_ptr<hidden_t>(),
                                           hidden_rs, ids, sm.const_data_ptr<int32_t>(),
                                           cache.const_data_ptr<table_t>(), v.cache,
                                           host_table.const_data_ptr<table_t>(), v.host, d};
        parallel_add_rows(a, T, d);
      });
    });
  });
}

at::Tensor cached_gather_add_cpu(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& slot_map,
                                 const at::Tensor& cache, const at::Tensor& host_table, std::optional<int64_t> layer,
                                 bool check_ids) {
  const CachedViews v = check_cached_gather_add_args("tol_cached_gather_add", hidden, ids, slot_map, cache, host_table, layer);
  return run_out_of_place(hidden, ids, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                           const at::Tensor& ids_flat) {
    launch("tol_cached_gather_add", out, out_rs, h, h_rs, ids_flat, slot_map, cache, host_table, v, check_ids);
  });
}

void cached_gather_add_cpu_(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& slot_map,
                            const at::Tensor& cache, const at::Tensor& host_table, std::optional<int64_t> layer,
                            bool check_ids) {
  const CachedViews v = check_cached_gather_add_args("tol_cached_gather_add_", hidden, ids, slot_map, cache, host_table, layer);
  run_in_place(hidden, ids, {slot_map, cache, host_table}, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                const at::Tensor& ids_flat) {
    launch("tol_cached_gather_add_", out, out_rs, h, h_rs, ids_flat, slot_map, cache, host_table, v, check_ids);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CPU, m) {
  m.impl("tol_cached_gather_add", &cached_gather_add_cpu);
  m.impl("tol_cached_gather_add_", &cached_gather_add_cpu_);
}

}  // namespace memllm
