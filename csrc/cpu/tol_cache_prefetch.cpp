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


void cache_prefetch_cpu(const at::Tensor& ids_in, const at::Tensor& slot_map_in, const at::Tensor& cache,
                        const at::Tensor& host_table, const at::Tensor& out, const at::Tensor& first,
                        const at::Tensor& slots, int64_t layer_begin, std::optional<int64_t> layer_end,
                        bool check_ids) {
  const LayerRange r =
      check_cache_prefetch_args(ids_in, slot_map_in, cache, host_table, out, first, slots, layer_begin, layer_end);
  const int64_t N = ids_in.size(0);
  if (N == 0) return;
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::Tensor slot_map = slot_map_in.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int32_t* sm = slot_map.const_data_ptr<int32_t>();
  const int64_t V = host_table.size(0), C = cache.size(0);
  if (check_ids) check_id_range("tol_cache_prefetch", id, N, V);
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
