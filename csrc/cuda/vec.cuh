// What the CUDA row kernels (tol_gather_add.cu, tol_cached_gather_add.cu) share: the vector type (N elements
// moved as one 16-byte or narrower load or store where every pointer and stride is aligned for it) and the
// per-row add of a block's threads along d.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../tol_gather_add.h"  // acc_type_t

namespace memllm {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Launch shape of a row kernel over T rows of d elements moved `vec` at a time: threads along d cover one row's
// vectors (a multiple of 32, at most 256); the rest of a 256-thread block takes further rows, so d=8 still
// runs 32 rows per block. 65535 blocks of up to 256 threads saturate any current GPU; more rows loop.
struct RowLaunch {
  dim3 grid, block;
};

inline RowLaunch row_launch(int64_t T, int64_t d, int vec) {
  const int tx = static_cast<int>(std::min<int64_t>(256, (d / vec + 31) / 32 * 32));
  const int ty = 256 / tx;
  return {dim3(static_cast<unsigned>(std::min<int64_t>((T + ty - 1) / ty, 65535))), dim3(tx, ty)};
}

#ifdef __CUDACC__
// o = round(h + r) over one row of d elements (d % VEC == 0, every pointer aligned for Vec<., VEC>: the
// launcher picks VEC so), summed in acc_type_t; the threads along x split the row's vectors.
// In the in-place ops o == h, against __restrict__'s letter: kept because each element is read once, by the
// thread that then writes it, before its write, so no reordering the promise allows can change a result, and
// it lets the compiler batch the loads of several vectors ahead of the stores.
template <typename hidden_t, typename table_t, int VEC>
__device__ __forceinline__ void add_row(hidden_t* __restrict__ o, const hidden_t* __restrict__ h,
                                        const table_t* __restrict__ r, int64_t d) {
  using acc_t = acc_type_t<hidden_t, table_t>;
  for (int64_t j = threadIdx.x; j < d / VEC; j += blockDim.x) {
    const Vec<hidden_t, VEC> hv = reinterpret_cast<const Vec<hidden_t, VEC>*>(h)[j];
    const Vec<table_t, VEC> rv = reinterpret_cast<const Vec<table_t, VEC>*>(r)[j];
    Vec<hidden_t, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ov.v[k] = static_cast<hidden_t>(static_cast<acc_t>(hv.v[k]) + static_cast<acc_t>(rv.v[k]));
    }
    reinterpret_cast<Vec<hidden_t, VEC>*>(o)[j] = ov;
  }
}

// The row of an id outside the table (reachable only with check_ids=false): nothing is read, the row is NaN.
template <typename hidden_t>
__device__ __forceinline__ void nan_row(hidden_t* o, int64_t d) {
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = static_cast<hidden_t>(NAN);
}
#endif

}  // namespace memllm
