// What the CPU row kernels (tol_gather_add.cpp, tol_cached_gather_add.cpp) share: element conversions to
// and from the accumulation type (acc_type_t, tol_gather_add.h), and the instruction set their row loop is
// compiled for, picked at run time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <cstdint>

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

}  // namespace memllm
