// CPU kernel of memllm::tol_cache_admit: one step's cache bookkeeping (an LRU tail over hot slots) after
// tol_cache_prefetch, the same decisions as the host's CacheDirectory (memllm_kernels/offload/policy.py).
//
// Sequential over the step's distinct tokens (each decision sees the ones before it); a miss scans the C
// slots for the least recently used one (O(C): a decode step admits at most one token per position). On
// the CPU the engine's host bookkeeping does the same work; this kernel exists so that the CPU runs and
// tests the path that the GPU runs without the host (OffloadEngine(bookkeeping="device")).
#include <torch/library.h>

#include <cstring>

#include "../tol_offload.h"

namespace memllm {
namespace {

void cache_admit_cpu(const at::Tensor& ids_in, const at::Tensor& first, const at::Tensor& slots, const at::Tensor& rows,
                     const at::Tensor& slot_map, const at::Tensor& owner, const at::Tensor& last_use,
                     const at::Tensor& admitted_at, const at::Tensor& cache, const at::Tensor& counters) {
  check_cache_admit_args(ids_in, first, slots, rows, slot_map, owner, last_use, admitted_at, cache, counters);
  TORCH_CHECK(cache.device().is_cpu(), "tol_cache_admit (CPU): the tensors must be CPU tensors, got " +
                                           cache.device().str());
  const int64_t N = ids_in.size(0), C = cache.size(0), V = slot_map.size(0);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int32_t* fst = first.const_data_ptr<int32_t>();
  const int32_t* slt = slots.const_data_ptr<int32_t>();
  int32_t* sm = slot_map.data_ptr<int32_t>();
  int32_t* own = owner.data_ptr<int32_t>();
  int64_t* use = last_use.data_ptr<int64_t>();
  int64_t* born = admitted_at.data_ptr<int64_t>();
  int64_t* cnt = counters.data_ptr<int64_t>();
  const size_t es = cache.element_size();
  const size_t row_bytes = static_cast<size_t>(token_row_elems(cache)) * es;
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  const int64_t rows_rs = rows.stride(0) * static_cast<int64_t>(es);

  int64_t clock = cnt[kClock];
  const int64_t step = cnt[kStep] + 1;
  for (int64_t b = 0; b < N; ++b) {
    cnt[kHits] += slt[b] >= 0;
    if (fst[b] != b) continue;  // a repeat: its first occurrence decided
    cnt[kUniqueMisses] += slt[b] < 0;
    const int64_t tok = id[b];
    if (tok < 0 || tok >= V) continue;  // check_ids=false upstream: nothing to admit
    const int32_t s = sm[tok];
    if (s >= 0 && s < C) {
      if (use[s] != kHotStamp) use[s] = clock++;
      continue;
    }
    int64_t victim = -1, best = kHotStamp;  // hot slots and this step's admissions are never victims
    for (int64_t v = 0; v < C; ++v) {
      if (born[v] != step && use[v] < best) best = use[v], victim = v;
    }
    if (victim < 0) continue;  // every tail slot holds a token admitted this step
    const int32_t old = own[victim];
    if (old >= 0 && old < V) {
      sm[old] = -1;
      ++cnt[kEvictions];
    }
    own[victim] = static_cast<int32_t>(tok);
    sm[tok] = static_cast<int32_t>(victim);
    use[victim] = clock++;
    born[victim] = step;
    ++cnt[kAdmissions];
    std::memcpy(dst + victim * row_bytes, src + b * rows_rs, row_bytes);
  }
  cnt[kClock] = clock;
  cnt[kStep] = step;
  cnt[kLookups] += N;
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CPU, m) {
  m.impl("tol_cache_admit", &cache_admit_cpu);
}

}  // namespace memllm
