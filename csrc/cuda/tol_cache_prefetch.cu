// CUDA kernel of memllm::tol_cache_prefetch: one step's token rows, deduplicated, in one token-major pass
// (launched on the offload engine's side stream as soon as the ids exist, see engine.py).
//
// Grid: x = positions b of ids, y = chunks of a row (a 96 KiB 1b row splits into 12 blocks of 8 KiB, so a
// single decode token still has many PCIe loads in flight). Each block finds the first position holding
// ids[b], looks up the slot, and if b is that first position copies its chunk of layers
// [layer_begin, layer_end) from the cache slot (hit) or the host row (miss, mapped memory).
// First positions: up to kScanMax positions (decode, short prompts) each block scans ids[0:b] (a shared
// atomicMin; at most 1024 / 256 = 4 loads per thread). A longer step would make that scan quadratic (16384
// prompt tokens: 1.6G compares over 12 chunks), so first_owner_kernel writes, per token, the least position
// holding it into an int32 [V] scratch (atomicMin; 0.2 MB at GPT-2's vocabulary, 1/(L*d*2) of a bf16 table),
// and each block reads its first position there: O(V + N). An id outside [0, V) (check_ids=false) has no
// entry and keeps the scan, so both paths give the same `first`.
// No host synchronisation: everything it decides stays on the device (usable in a CUDA graph).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "tol_offload_cuda.cuh"

namespace memllm {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = 8 << 10;
constexpr int64_t kScanMax = 1024;

// owner[id] = the least position b with ids[b] == id, for ids in [0, V) (owner starts at INT32_MAX).
template <typename index_t>
__global__ void first_owner_kernel(const index_t* __restrict__ ids, int64_t N, int64_t num_rows,
                                   int32_t* __restrict__ owner) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < N;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const index_t id = ids[b];
    if (id >= 0 && static_cast<int64_t>(id) < num_rows) atomicMin(&owner[id], static_cast<int32_t>(b));
  }
}

template <typename vec_t, typename index_t>
__global__ void cache_prefetch_kernel(const index_t* __restrict__ ids, const int32_t* __restrict__ slot_map,
                                      const char* __restrict__ cache, int64_t cache_rs, int64_t num_slots,
                                      const char* __restrict__ host, int64_t host_rs, int64_t num_rows,
                                      char* __restrict__ out, int64_t out_rs, int32_t* __restrict__ first,
                                      int32_t* __restrict__ slots, const int32_t* __restrict__ owner, int64_t N,
                                      int64_t offset_bytes, int64_t range_vecs, int64_t chunk_vecs) {
  __shared__ int first_s;
  for (int64_t b = blockIdx.x; b < N; b += gridDim.x) {
    const index_t id = ids[b];
    const bool ok = id >= 0 && static_cast<int64_t>(id) < num_rows;
    if (threadIdx.x == 0) first_s = static_cast<int>(b);
    __syncthreads();
    if (owner != nullptr && ok) {
      if (threadIdx.x == 0) first_s = owner[id];
    } else {
      for (int64_t a = threadIdx.x; a < b; a += blockDim.x) {
        if (ids[a] == id) atomicMin(&first_s, static_cast<int>(a));
      }
    }
    __syncthreads();
    const int f = first_s;
    int32_t slot = ok ? slot_map[id] : -1;
    if (slot < 0 || slot >= num_slots) slot = -1;  // a slot outside the cache reads as a miss
    if (blockIdx.y == 0 && threadIdx.x == 0) {
      first[b] = f;
      slots[b] = slot;
    }
    if (f == b) {
      const int64_t j0 = static_cast<int64_t>(blockIdx.y) * chunk_vecs;
      const int64_t j1 = j0 + chunk_vecs < range_vecs ? j0 + chunk_vecs : range_vecs;
      vec_t* dst = reinterpret_cast<vec_t*>(out + b * out_rs + offset_bytes);
      const vec_t* src = nullptr;
      if (ok) {
        src = reinterpret_cast<const vec_t*>(slot >= 0 ? cache + slot * cache_rs + offset_bytes
                                                       : host + static_cast<int64_t>(id) * host_rs + offset_bytes);
      }
      for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) dst[j] = src != nullptr ? src[j] : all_ones<vec_t>();
    }
    __syncthreads();  // first_s is rewritten by the next position
  }
}

void cache_prefetch_cuda(const at::Tensor& ids, const at::Tensor& slot_map, const at::Tensor& cache,
                         const at::Tensor& host_table, const at::Tensor& out, const at::Tensor& first,
                         const at::Tensor& slots, int64_t layer_begin, std::optional<int64_t> layer_end,
                         bool check_ids) {
  const std::string op = "tol_cache_prefetch";
  const LayerRange r = check_cache_prefetch_args(ids, slot_map, cache, host_table, out, first, slots, layer_begin,
                                                 layer_end);
  const int64_t N = ids.size(0);
  // The kernel keeps positions in int (first[] is int32): a step of 2^31 tokens is far beyond any prompt.
  TORCH_CHECK(N < (int64_t{1} << 31), op + ": " + to_str(N) + " ids in one step exceed int32 positions");
  const at::Device dev = out.device();
  TORCH_CHECK(dev.is_cuda() && ids.device() == dev && slot_map.device() == dev && cache.device() == dev &&
                  first.device() == dev && slots.device() == dev,
              op + ": ids, slot_map, cache, out, first and slots must be on one CUDA device (host_table may be host "
                   "memory)");
  const c10::cuda::OptionalCUDAGuard guard(dev);
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor sm = slot_map.contiguous();
  const int64_t V = host_table.size(0);
  if (check_ids) check_range_cuda("tol_cache_prefetch", ids_c, V, false);
  if (N == 0) return;
  const int64_t es = cache.element_size();
  const int64_t offset = r.begin * r.layer_elems * es, range_bytes = (r.end - r.begin) * r.layer_elems * es;
  const char* c = static_cast<const char*>(cache.const_data_ptr());
  const char* h = device_address(host_table, dev, op, "host_table");
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t crs = cache.stride(0) * es, hrs = host_table.stride(0) * es, ors = out.stride(0) * es;
  const int w = copy_width(range_bytes, {reinterpret_cast<int64_t>(c), reinterpret_cast<int64_t>(h),
                                         reinterpret_cast<int64_t>(o), crs, hrs, ors, offset});
  const int64_t range_vecs = range_bytes / w;
  const int64_t chunk_vecs = std::max<int64_t>(kThreads, kChunkBytes / w);
  const int64_t chunks = std::max<int64_t>(1, (range_vecs + chunk_vecs - 1) / chunk_vecs);
  TORCH_CHECK(chunks <= 65535, op + ": a row range of " + to_str(range_bytes) + " bytes needs more than 65535 chunks");
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(N, 1 << 30)), static_cast<unsigned>(chunks));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // On the current stream (at::full's fill too) and from its allocator, so a captured step captures it.
  at::Tensor owner;
  if (N > kScanMax) owner = at::full({V}, std::numeric_limits<int32_t>::max(), first.options());
  AT_DISPATCH_INDEX_TYPES(ids_c.scalar_type(), "tol_cache_prefetch_cuda", [&] {
    const index_t* id_ptr = ids_c.const_data_ptr<index_t>();
    if (owner.defined()) {
      const int64_t blocks = std::min<int64_t>((N + kThreads - 1) / kThreads, 1 << 16);
      first_owner_kernel<index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(id_ptr, N, V,
                                                                                       owner.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int32_t* owner_ptr = owner.defined() ? owner.const_data_ptr<int32_t>() : nullptr;
    with_copy_type(w, [&](auto vec) {
      cache_prefetch_kernel<decltype(vec), index_t><<<grid, kThreads, 0, stream>>>(
          id_ptr, sm.const_data_ptr<int32_t>(), c, crs, cache.size(0), h, hrs, V, o, ors,
          first.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), owner_ptr, N, offset, range_vecs, chunk_vecs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CUDA, m) {
  m.impl("tol_cache_prefetch", &cache_prefetch_cuda);
}

}  // namespace memllm
