// CPU kernel of memllm::tol_gather_add / tol_gather_add_: out[t] = hidden[t] + table[ids[t](, layer)].
//
// One pass over memory: read the hidden row and the table row, add in float32 (float64 when
// either input is float64), round once to hidden's dtype, write. Tokens are split across threads
// with at::parallel_for (OpenMP: setup.py must pass -fopenmp, or the loop runs on one core); the
// inner loop over d is a plain loop that g++ -O3 vectorizes, compiled for AVX-512 / AVX2 / baseline
// and picked at run time.
//
// Extension points (kept in this file, not a new family): a row-quantized table (int8/int4 + a
// per-row scale, paper Table 7) is another `to_acc` applied with the row's scale in add_rows; a
// fused add + RMSNorm is a second pass over the summed row inside add_rows, which holds whole rows.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tol_gather_add.h"
#include "row_kernel.h"

namespace memllm {
namespace {

template <typename hidden_t, typename table_t, typename index_t>
struct RowArgs {
  hidden_t* out;
  int64_t out_rs;
  const hidden_t* hidden;
  int64_t hidden_rs;
  const index_t* ids;
  const table_t* table;
  TolTableView tv;
  int64_t d;
};

// Rows [begin, end): out[t, :] = round(hidden[t, :] + table_row(ids[t])[:]).
template <typename hidden_t, typename table_t, typename index_t>
__attribute__((always_inline)) inline void add_rows(const RowArgs<hidden_t, table_t, index_t>& a, int64_t begin,
                                                    int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    if (t + 1 < end) {  // the next token's row (in range: the path with a bad id calls this one token at a time)
      prefetch_row(a.table + static_cast<int64_t>(a.ids[t + 1]) * a.tv.row_stride + a.tv.layer_offset,
                   a.d * static_cast<int64_t>(sizeof(table_t)));
    }
    add_row(a.out + t * a.out_rs, a.hidden + t * a.hidden_rs,
            a.table + static_cast<int64_t>(a.ids[t]) * a.tv.row_stride + a.tv.layer_offset, a.d);
  }
}

// Without the host check a bad id must still never be read: those rows become NaN.
template <typename index_t>
bool all_ids_in_range(const index_t* ids, int64_t T, int64_t num_rows) {
  bool ok = true;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = static_cast<int64_t>(ids[t]);
    ok &= (id >= 0) & (id < num_rows);
  }
  return ok;
}

// out and hidden are [T, d] row-strided views (out may alias hidden for the in-place op).
void launch(const char* op, const at::Tensor& out, int64_t out_rs, const at::Tensor& hidden, int64_t hidden_rs,
            const at::Tensor& ids_flat, const at::Tensor& table, const TolTableView& tv, bool check_ids) {
  const int64_t T = ids_flat.numel();
  const int64_t d = hidden.size(-1);
  if (T == 0) return;
  AT_DISPATCH_INDEX_TYPES(ids_flat.scalar_type(), "tol_gather_add_cpu_ids", [&] {
    const index_t* ids = ids_flat.const_data_ptr<index_t>();
    if (check_ids) check_id_range(op, ids, T, tv.num_rows);
    const bool ids_ok = check_ids || all_ids_in_range(ids, T, tv.num_rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "tol_gather_add_cpu", [&] {
      using hidden_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "tol_gather_add_cpu_table", [&] {
        using table_t = scalar_t;
        RowArgs<hidden_t, table_t, index_t> args{out.data_ptr<hidden_t>(), out_rs, hidden.const_data_ptr<hidden_t>(),
                                                 hidden_rs, ids, table.const_data_ptr<table_t>(), tv, d};
        if (ids_ok) {
          parallel_add_rows(args, T, d);
          return;
        }
        // Rare path (check_ids=false and a bad id): row by row, NaN for the bad ones.
        for (int64_t t = 0; t < T; ++t) {
          const int64_t id = static_cast<int64_t>(ids[t]);
          if (id < 0 || id >= tv.num_rows) {
            nan_row(args.out + t * out_rs, d);
          } else {
            add_rows_default(args, t, t + 1);
          }
        }
      });
    });
  });
}

at::Tensor tol_gather_add_cpu(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& table,
                              std::optional<int64_t> layer, bool check_ids) {
  const TolTableView v = check_tol_gather_add_args("tol_gather_add", hidden, ids, table, layer);
  return run_out_of_place(hidden, ids, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                           const at::Tensor& ids_flat) {
    launch("tol_gather_add", out, out_rs, h, h_rs, ids_flat, table, v, check_ids);
  });
}

void tol_gather_add_cpu_(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& table,
                         std::optional<int64_t> layer, bool check_ids) {
  const TolTableView v = check_tol_gather_add_args("tol_gather_add_", hidden, ids, table, layer);
  run_in_place(hidden, ids, {table}, [&](const at::Tensor& out, int64_t out_rs, const at::Tensor& h, int64_t h_rs,
                                const at::Tensor& ids_flat) {
    launch("tol_gather_add_", out, out_rs, h, h_rs, ids_flat, table, v, check_ids);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CPU, m) {
  m.impl("tol_gather_add", &tol_gather_add_cpu);
  m.impl("tol_gather_add_", &tol_gather_add_cpu_);
}

}  // namespace memllm
