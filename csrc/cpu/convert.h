// Element conversions of the CPU kernels (tol_gather_add.cpp, tol_cached_gather_add.cpp) to and from the
// accumulation type (acc_type_t, tol_gather_add.h).
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

}  // namespace memllm
