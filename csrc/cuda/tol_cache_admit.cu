// CUDA kernel of memllm::tol_cache_admit: one step's cache bookkeeping (an LRU tail over hot slots) on the
// device, queued after tol_cache_prefetch, so that a decode step with the table in host memory needs no host
// work per step (OffloadEngine(bookkeeping="device"); the same decisions as the host's CacheDirectory).
//
// One block: the step's distinct tokens are decided in order (each sees the ones before it). A resident
// token is stamped; a missing one takes the least recently used slot, found by a block-wide argmin over the
// C slots (2,512 at 1b with 5% of GPT-2's vocabulary: 3 loads per thread and a two-level shuffle reduction),
// and the block copies its row (96 KiB at 1b) from the step's rows into the slot. A decode step decides one
// token; a prompt of U distinct tokens makes U argmins in sequence (microseconds each), a cost paid once.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "tol_offload_cuda.cuh"

namespace memllm {
namespace {

constexpr int kThreads = 512;  // the launch's block size: the reduction's second level reads kThreads / 32 warps
static_assert(kThreads % 32 == 0 && kThreads / 32 <= 32, "one warp must reduce the per-warp minima");

// (key, slot) pairs ordered by key, then by slot: the least recently used slot, the lowest on ties.
__device__ __forceinline__ void keep_min(int64_t& key, int64_t& slot, int64_t k2, int64_t s2) {
  if (k2 < key || (k2 == key && s2 < slot)) key = k2, slot = s2;
}

template <typename vec_t, typename index_t>
__global__ void __launch_bounds__(kThreads) cache_admit_kernel(
    const index_t* __restrict__ ids, const int32_t* __restrict__ first, const int32_t* __restrict__ slots,
    const char* __restrict__ rows, int64_t rows_rs, int32_t* slot_map, int64_t V, int32_t* owner, int64_t* last_use,
    int64_t* admitted_at, char* cache, int64_t C, int64_t row_vecs, int64_t* counters, int64_t N) {
  __shared__ int64_t warp_key[kThreads / 32], warp_slot[kThreads / 32];
  __shared__ int64_t victim_s;
  __shared__ unsigned long long hits_s, misses_s;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) hits_s = misses_s = 0;
  __syncthreads();
  unsigned long long hits = 0, misses = 0;
  for (int64_t b = threadIdx.x; b < N; b += blockDim.x) {
    hits += slots[b] >= 0;
    misses += first[b] == b && slots[b] < 0;
  }
  atomicAdd(&hits_s, hits);
  atomicAdd(&misses_s, misses);

  // Every thread follows the same path (the branches below read values that are equal across the block), so
  // each keeps its own copy of the clock.
  int64_t clock = counters[kClock];
  const int64_t step = counters[kStep] + 1;
  for (int64_t b = 0; b < N; ++b) {
    if (first[b] != b) continue;
    const int64_t tok = static_cast<int64_t>(ids[b]);
    if (tok < 0 || tok >= V) continue;
    const int32_t s = slot_map[tok];  // thread 0's writes of earlier tokens are visible after the barrier below
    if (s >= 0 && s < C) {
      // Thread 0 may stamp last_use[s] while others read it: a tail slot reads as a tail slot either way.
      if (last_use[s] != kHotStamp) {
        if (threadIdx.x == 0) last_use[s] = clock;
        ++clock;
      }
      __syncthreads();  // the stamp is visible to the next miss's scan
      continue;
    }
    int64_t key = kHotStamp, slot = -1;
    for (int64_t v = threadIdx.x; v < C; v += blockDim.x) {
      if (admitted_at[v] != step) keep_min(key, slot, last_use[v], v);
    }
    for (int o = 16; o > 0; o /= 2) {
      keep_min(key, slot, __shfl_down_sync(0xffffffffu, key, o), __shfl_down_sync(0xffffffffu, slot, o));
    }
    if (lane == 0) warp_key[warp] = key, warp_slot[warp] = slot;
    __syncthreads();
    if (warp == 0) {
      key = lane < kThreads / 32 ? warp_key[lane] : kHotStamp;
      slot = lane < kThreads / 32 ? warp_slot[lane] : -1;
      for (int o = 16; o > 0; o /= 2) {
        keep_min(key, slot, __shfl_down_sync(0xffffffffu, key, o), __shfl_down_sync(0xffffffffu, slot, o));
      }
      if (lane == 0) {
        victim_s = key == kHotStamp ? -1 : slot;  // no candidate: every tail slot was admitted this step
        if (victim_s >= 0) {
          const int32_t old = owner[victim_s];
          if (old >= 0 && old < V) {
            slot_map[old] = -1;
            ++counters[kEvictions];
          }
          owner[victim_s] = static_cast<int32_t>(tok);
          slot_map[tok] = static_cast<int32_t>(victim_s);
          last_use[victim_s] = clock;
          admitted_at[victim_s] = step;
          ++counters[kAdmissions];
        }
      }
    }
    __syncthreads();
    const int64_t v = victim_s;
    if (v < 0) continue;
    ++clock;
    const vec_t* src = reinterpret_cast<const vec_t*>(rows + b * rows_rs);
    vec_t* dst = reinterpret_cast<vec_t*>(cache) + v * row_vecs;
    // No barrier needed before the next token: victim_s and the warp slots change only after the next
    // barrier, and nothing here reads the cache.
    for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) dst[j] = src[j];
  }
  __syncthreads();  // the counts in shared memory are complete
  if (threadIdx.x == 0) {
    counters[kClock] = clock;
    counters[kStep] = step;
    counters[kLookups] += N;
    counters[kHits] += static_cast<int64_t>(hits_s);
    counters[kUniqueMisses] += static_cast<int64_t>(misses_s);
  }
}

void cache_admit_cuda(const at::Tensor& ids, const at::Tensor& first, const at::Tensor& slots, const at::Tensor& rows,
                      const at::Tensor& slot_map, const at::Tensor& owner, const at::Tensor& last_use,
                      const at::Tensor& admitted_at, const at::Tensor& cache, const at::Tensor& counters) {
  const std::string op = "tol_cache_admit";
  check_cache_admit_args(ids, first, slots, rows, slot_map, owner, last_use, admitted_at, cache, counters);
  const at::Device dev = cache.device();
  TORCH_CHECK(dev.is_cuda(), op + " (CUDA): the tensors must be on a CUDA device, got " + dev.str());
  const c10::cuda::OptionalCUDAGuard guard(dev);
  const at::Tensor ids_c = ids.contiguous();
  const int64_t N = ids.size(0), C = cache.size(0);
  const int64_t es = cache.element_size(), row_bytes = token_row_elems(cache) * es, rows_rs = rows.stride(0) * es;
  const char* r = static_cast<const char*>(rows.const_data_ptr());
  char* c = static_cast<char*>(cache.data_ptr());
  const int w = copy_width(row_bytes, {reinterpret_cast<int64_t>(r), reinterpret_cast<int64_t>(c), rows_rs});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Launched even for N == 0 (it only advances the step): the launch count per step stays fixed under a graph.
  AT_DISPATCH_INDEX_TYPES(ids_c.scalar_type(), "tol_cache_admit_cuda", [&] {
    with_copy_type(w, [&](auto vec) {
      cache_admit_kernel<decltype(vec), index_t><<<1, kThreads, 0, stream>>>(
          ids_c.const_data_ptr<index_t>(), first.const_data_ptr<int32_t>(), slots.const_data_ptr<int32_t>(), r,
          rows_rs, slot_map.data_ptr<int32_t>(), slot_map.size(0), owner.data_ptr<int32_t>(),
          last_use.data_ptr<int64_t>(), admitted_at.data_ptr<int64_t>(), c, C, row_bytes / w,
          counters.data_ptr<int64_t>(), N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CUDA, m) {
  m.impl("tol_cache_admit", &cache_admit_cuda);
}

}  // namespace memllm
