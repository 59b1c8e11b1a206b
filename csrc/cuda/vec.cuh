// The vector type of the CUDA row kernels (tol_gather_add.cu, tol_cached_gather_add.cu): N elements moved
// as one 16-byte (or narrower) load or store where every pointer and stride is aligned for it.
#pragma once

#include <cstdint>

namespace memllm {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace memllm
