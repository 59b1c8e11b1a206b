// What the CPU row kernels (tol_gather_add.cpp, tol_cached_gather_add.cpp) share: element conversions to
// and from the accumulation type (acc_type_t, tol_gather_add.h), the per-token add (and the NaN row of a bad
// id), and the threaded loop over tokens compiled per instruction set, picked at run time.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../tol_gather_add.h"  // acc_type_t

namespace memllm {

// Element conversions written so that g++ vectorizes the row loop: with c10's Half/BFloat16
// conversions (out-of-line, branchy) the loop stayed scalar.
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(c10::BFloat16 x) { return c10::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }
inline float to_acc(c10::Half x) { return static_cast<float>(c10::bit_cast<_Float16>(x.x)); }

template <typename T> inline T from_acc(float v);
template <typename T> inline T from_acc(double v) { return static_cast<T>(v); }
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(float v) { return v; }
template <> inline c10::Half from_acc<c10::Half>(float v) {
  return c10::Half(c10::bit_cast<uint16_t>(static_cast<_Float16>(v)), c10::Half::from_bits());  // RNE
}
template <> inline c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  // Round to nearest even, as c10::BFloat16(float) does; NaN stays a quiet NaN.
  const uint32_t u = c10::bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = (v != v) ? ((u >> 16) | 0x40u) : rounded;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

// Each kernel compiles its row loop three times (baseline, AVX2/F16C, AVX-512) with target attributes and
// calls the widest one this CPU runs, so one wheel serves old and new x86-64 CPUs. AVX-512 halves the
// instructions per element again over AVX2 (the bf16 rounding is about 15 integer operations per vector).
enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
    return Isa::kDefault;
  }();
  return isa;
}

#define MEMLLM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MEMLLM_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")))

// o[0:d] = round(h[0:d] + row[0:d]): the sum in acc_type_t (float32, float64 if an input is float64), rounded
// once to hidden's dtype. The loop every row kernel runs per token; g++ -O3 vectorizes it for the
// instruction set of the function it is inlined into.
// In the in-place ops o == h, against __restrict__'s letter: kept because each element is read once, by the
// thread that then writes it, before its write, so no reordering the promise allows can change a result, and
// it lets the compiler batch the loads of several vectors ahead of the stores.
template <typename hidden_t, typename table_t>
__attribute__((always_inline)) inline void add_row(hidden_t* __restrict__ o, const hidden_t* __restrict__ h,
                                                   const table_t* __restrict__ row, int64_t d) {
  using acc_t = acc_type_t<hidden_t, table_t>;
  for (int64_t i = 0; i < d; ++i) {
    o[i] = from_acc<hidden_t>(static_cast<acc_t>(to_acc(h[i])) + static_cast<acc_t>(to_acc(row[i])));
  }
}

// Starts loading the first kPrefetchBytes of a row a later token reads. Rows lie at random places in a table of
// hundreds of MB (a 1b row is 4 KiB of bf16, a page of its own), so a row's first loads wait for a page walk and
// DRAM, which the hardware prefetcher cannot foresee; asked one token ahead they overlap the current row's add,
// and the prefetcher streams the rest of the row. Measured on the 2-core AMD EPYC VM (T=4096, d=2048, bf16,
// in-place op against torch.add of the same bytes, interleaved in one process, medians of 25 rounds): no prefetch
// 46-57%; 1 KiB one token ahead 57-70%; the whole 4 KiB row 48-64% (more lines than the core keeps in flight);
// 1 KiB 2 tokens ahead 64-70%, 4 ahead 57-67%.
constexpr int64_t kPrefetchBytes = 1024;

inline void prefetch_row(const void* row, int64_t row_bytes) {
  const char* p = static_cast<const char*>(row);
  const int64_t n = std::min(row_bytes, kPrefetchBytes);
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, /*read*/ 0, /*no temporal locality*/ 0);
}

// The row of an id outside the table (reachable only with check_ids=false): nothing is read, the row is NaN.
template <typename hidden_t>
inline void nan_row(hidden_t* o, int64_t d) {
  std::fill(o, o + d, std::numeric_limits<hidden_t>::quiet_NaN());
}

// A kernel's add_rows(args, begin, end) (always_inline, found by argument-dependent lookup) compiled once per
// instruction set. AVX-512 over AVX2: one thread went from 8.8 to 7.1 ms at T=4096, d=2048, bf16 on the
// 2-core x86-64 CI machine (torch.add of the same bytes: 6.3 ms).
template <typename Args>
MEMLLM_TARGET_AVX512 void add_rows_avx512(const Args& a, int64_t begin, int64_t end) { add_rows(a, begin, end); }
template <typename Args>
MEMLLM_TARGET_AVX2 void add_rows_avx2(const Args& a, int64_t begin, int64_t end) { add_rows(a, begin, end); }
template <typename Args>
void add_rows_default(const Args& a, int64_t begin, int64_t end) { add_rows(a, begin, end); }

// Rows [0, T) of a kernel's add_rows split across threads (at::parallel_for; setup.py passes -fopenmp, or
// the loop runs on one core), each chunk in the widest instruction set this CPU runs. About 32K elements
// per task: big enough to amortize scheduling, small enough to balance.
template <typename Args>
void parallel_add_rows(const Args& a, int64_t T, int64_t d) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  const Isa isa = cpu_isa();
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    switch (isa) {
      case Isa::kAvx512: add_rows_avx512(a, begin, end); break;
      case Isa::kAvx2: add_rows_avx2(a, begin, end); break;
      default: add_rows_default(a, begin, end);
    }
  });
}

}  // namespace memllm
