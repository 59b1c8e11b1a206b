// CPU kernel of memllm::tol_cache_prefetch: one step's token rows, deduplicated, in one token-major pass.
//
// For each position b of ids: first[b] = the first position a with ids[a] == ids[b]; slots[b] =
// slot_map[ids[b]] (-1 on a miss); at first occurrences (a == b) layers [layer_begin, layer_end) of the
// token's row are copied into out[b], from its cache slot on a hit, else from host_table. Each layer l
// of the model then reads out[first[b], l] (tol_gather_add_), so a token repeated in a prompt moves once.
// On the CPU there is nothing to overlap: this runs synchronously, and exists so that the CPU runs the
// same code path as the GPU (memllm_kernels/offload/engine.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <unordered_map>

#include "../tol_offload.h"

namespace memllm {

namespace {

struct Range {
  int64_t begin, end;  // layers
  int64_t layer_elems;  // d
};

Range check_args(const at::Tensor& ids, const at::Tensor& slot_map, const at::Tensor& cache,
                 const at::Tensor& host_table, const at::Tensor& out, const at::Tensor& first,
                 const at::Tensor& slots, int64_t layer_begin, std::optional<int64_t> layer_end) {
  const std::string op = "tol_cache_prefetch";
  check_token_table(op, "cache", cache);
  check_token_table(op, "host_table", host_table);
  check_token_table(op, "out", out);
  check_index_dtype(op, "ids", ids);
  TORCH_CHECK(ids.dim() == 1, op + ": ids must be 1-D [N], got shape " + to_str(ids.sizes()));
  const int64_t N = ids.size(0);
  for (const at::Tensor* t : {&host_table, &out}) {
    TORCH_CHECK_TYPE(t->scalar_type() == cache.scalar_type(), op + ": cache, host_table and out must share one dtype, got " +
                                                                  c10::toString(cache.scalar_type()) + " and " +
                                                                  c10::toString(t->scalar_type()));
    TORCH_CHECK(t->dim() == cache.dim() && t->sizes().slice(1) == cache.sizes().slice(1),
                op + ": cache, host_table and out must share one row shape " + to_str(cache.sizes().slice(1)) +
                    ", got " + to_str(t->sizes()));
  }
  TORCH_CHECK(out.size(0) >= N, op + ": out has " + to_str(out.size(0)) + " rows for " + to_str(N) + " ids");
  TORCH_CHECK_TYPE(slot_map.scalar_type() == at::kInt && first.scalar_type() == at::kInt &&
                       slots.scalar_type() == at::kInt,
                   op + ": slot_map, first and slots must be int32");
  TORCH_CHECK(slot_map.dim() == 1 && slot_map.size(0) == host_table.size(0),
              op + ": slot_map must be [V] with V=" + to_str(host_table.size(0)) + ", got shape " + to_str(slot_map.sizes()));
  TORCH_CHECK(first.dim() == 1 && first.size(0) == N && slots.dim() == 1 && slots.size(0) == N,
              op + ": first and slots must be [N] with N=" + to_str(N) + ", got " + to_str(first.sizes()) + " and " +
                  to_str(slots.sizes()));
  TORCH_CHECK(first.is_contiguous() && slots.is_contiguous(), op + ": first and slots must be contiguous");
  const int64_t L = cache.dim() == 3 ? cache.size(1) : 1;
  const int64_t end = layer_end.value_or(L);
  TORCH_CHECK(0 <= layer_begin && layer_begin <= end && end <= L,
              op + ": layers [" + to_str(layer_begin) + ", " + to_str(end) + ") are not within [0, " + to_str(L) + ")");
  return {layer_begin, end, cache.size(-1)};
}

void cache_prefetch_cpu(const at::Tensor& ids_in, const at::Tensor& slot_map_in, const at::Tensor& cache,
                        const at::Tensor& host_table, const at::Tensor& out, const at::Tensor& first,
                        const at::Tensor& slots, int64_t layer_begin, std::optional<int64_t> layer_end,
                        bool check_ids) {
  const Range r = check_args(ids_in, slot_map_in, cache, host_table, out, first, slots, layer_begin, layer_end);
  const int64_t N = ids_in.size(0);
  if (N == 0) return;
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::Tensor slot_map = slot_map_in.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int32_t* sm = slot_map.const_data_ptr<int32_t>();
  const int64_t V = host_table.size(0), C = cache.size(0);
  if (check_ids) {
    for (int64_t b = 0; b < N; ++b) {
      if (id[b] < 0 || id[b] >= V) throw_bad_id("tol_cache_prefetch", b, id[b], V);
    }
  }
  int32_t* fst = first.data_ptr<int32_t>();
  int32_t* slt = slots.data_ptr<int32_t>();
  std::unordered_map<int64_t, int32_t> seen;
  seen.reserve(static_cast<size_t>(N) * 2);
  for (int64_t b = 0; b < N; ++b) {
    const int64_t v = id[b];
    const bool ok = v >= 0 && v < V;
    const int32_t s = ok ? sm[v] : -1;
    slt[b] = (s >= 0 && s < C) ? s : -1;  // a slot outside the cache reads as a miss
    fst[b] = seen.emplace(v, static_cast<int32_t>(b)).first->second;
  }
  const size_t es = cache.element_size();
  const size_t off = static_cast<size_t>(r.begin * r.layer_elems) * es;
  const size_t bytes = static_cast<size_t>((r.end - r.begin) * r.layer_elems) * es;
  if (bytes == 0) return;
  const char* cbase = static_cast<const char*>(cache.const_data_ptr());
  const char* hbase = static_cast<const char*>(host_table.const_data_ptr());
  char* obase = static_cast<char*>(out.data_ptr());
  const int64_t crs = cache.stride(0) * static_cast<int64_t>(es), hrs = host_table.stride(0) * static_cast<int64_t>(es);
  const int64_t ors = out.stride(0) * static_cast<int64_t>(es);
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>((256 << 10) / bytes));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (fst[b] != b) continue;  // a repeat: its first occurrence carries the row
      char* dst = obase + b * ors + off;
      const int64_t v = id[b];
      if (v < 0 || v >= V) {
        std::memset(dst, 0xFF, bytes);  // check_ids=false and a bad id: a NaN row, nothing read
      } else if (slt[b] >= 0) {
        std::memcpy(dst, cbase + slt[b] * crs + off, bytes);
      } else {
        std::memcpy(dst, hbase + v * hrs + off, bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CPU, m) {
  m.impl("tol_cache_prefetch", &cache_prefetch_cpu);
}

}  // namespace memllm
