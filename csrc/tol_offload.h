// Shared by the offload ops (tol_host_gather, tol_cached_gather_add, tol_cache_prefetch, tol_cache_admit,
// tol_host_alloc): argument checks of token-row tables and the hook through which the CUDA build pins host memory.
//
// A "token-row table" is [V, d] or token-major [V, L, d]: each token's rows (all L layers) are one
// contiguous run of L*d elements, so one token moves as one copy (96 KiB at the 1b preset in bf16).
// Rows may sit at any row stride (a [V, L, d] view of a bigger buffer), but within a row the layout is
// dense. Error messages use std::string + to_str (see tol_gather_add.h for why).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "tol_gather_add.h"

namespace memllm {

// Elements of one token's row: L*d, or d for a [V, d] table.
inline int64_t token_row_elems(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 1; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

// Checks a [V, d] / [V, L, d] table whose token rows are dense (layer rows back to back).
inline void check_token_table(const std::string& op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()),
                   op + ": " + name + " must be float32, float16, bfloat16 or float64, got " +
                       c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3,
              op + ": " + name + " must be [V, d] or token-major [V, L, d], got shape " + to_str(t.sizes()));
  const bool dense_rows = (t.size(-1) <= 1 || t.stride(-1) == 1) &&
                          (t.dim() == 2 || t.size(1) <= 1 || t.stride(1) == t.size(2));
  TORCH_CHECK(dense_rows, op + ": " + name + "'s token rows must be dense ([L, d] contiguous), got strides " +
                              to_str(t.strides()) + "; pass a .contiguous() table");
}

inline void check_index_dtype(const std::string& op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                   op + ": " + name + " must be int32 or int64, got " + c10::toString(t.scalar_type()));
}

// The error for a destination row outside [0, M).
[[noreturn]] inline void throw_bad_row(const char* op, int64_t position, int64_t row, int64_t num_rows) {
  TORCH_CHECK_INDEX(false, std::string(op) + ": destination row " + to_str(row) + " (at position " + to_str(position) +
                         " of rows) is outside [0, " + to_str(num_rows) + ") rows of out");
  __builtin_unreachable();
}

// tol_cached_gather_add(_)'s arguments, for the CPU and CUDA kernels: tol_gather_add's checks of (hidden, ids,
// cache, layer), then host_table (a token-row table with cache's dtype and row shape; on hidden's device or
// in host memory, which the CUDA kernel reads mapped) and slot_map ([V] int32 on hidden's device).
struct CachedViews {
  TolTableView cache, host;
};

inline CachedViews check_cached_gather_add_args(const char* op, const at::Tensor& hidden, const at::Tensor& ids,
                                                const at::Tensor& slot_map, const at::Tensor& cache,
                                                const at::Tensor& host_table, const std::optional<int64_t>& layer) {
  const std::string o = op;
  CachedViews v;
  v.cache = check_tol_gather_add_args(op, hidden, ids, cache, layer);
  TORCH_CHECK(host_table.device() == hidden.device() || host_table.device().is_cpu(),
              o + ": host_table must be on hidden's device or in host memory, got " + host_table.device().str());
  check_token_table(o, "host_table", host_table);
  TORCH_CHECK_TYPE(host_table.scalar_type() == cache.scalar_type(),
                   o + ": host_table must have cache's dtype " + c10::toString(cache.scalar_type()) + ", got " +
                       c10::toString(host_table.scalar_type()));
  TORCH_CHECK(host_table.dim() == cache.dim() && host_table.sizes().slice(1) == cache.sizes().slice(1),
              o + ": host_table rows must have cache's row shape " + to_str(cache.sizes().slice(1)) +
                  ", got host_table " + to_str(host_table.sizes()));
  v.host = {host_table.size(0), host_table.stride(0), cache.dim() == 3 ? *layer * host_table.stride(1) : 0};
  TORCH_CHECK_TYPE(slot_map.scalar_type() == at::kInt,
                   o + ": slot_map must be int32, got " + c10::toString(slot_map.scalar_type()));
  TORCH_CHECK(slot_map.dim() == 1 && slot_map.size(0) == host_table.size(0),
              o + ": slot_map must be [V] with V=" + to_str(host_table.size(0)) + " (host_table's rows), got shape " +
                  to_str(slot_map.sizes()));
  TORCH_CHECK(slot_map.device() == hidden.device(),
              o + ": slot_map must be on hidden's device " + hidden.device().str() + ", got " + slot_map.device().str());
  return v;
}

// The argument checks of tol_host_gather (before each device's own: where the tensors live) and of
// tol_cache_prefetch (which returns the layer range to copy), shared by the CPU and CUDA kernels.
inline void check_host_gather_args(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& out,
                                   const std::optional<at::Tensor>& rows) {
  const std::string op = "tol_host_gather";
  check_token_table(op, "table", table);
  check_token_table(op, "out", out);
  check_writable(op + ": out", out);
  check_index_dtype(op, "ids", ids);
  TORCH_CHECK_TYPE(out.scalar_type() == table.scalar_type(), op + ": out must have table's dtype " +
                                                                 c10::toString(table.scalar_type()) + ", got " +
                                                                 c10::toString(out.scalar_type()) + " (a pure copy)");
  TORCH_CHECK(ids.dim() == 1, op + ": ids must be 1-D [N], got shape " + to_str(ids.sizes()));
  TORCH_CHECK(out.dim() == table.dim() && out.sizes().slice(1) == table.sizes().slice(1),
              op + ": out rows must have table's row shape " + to_str(table.sizes().slice(1)) + ", got out " +
                  to_str(out.sizes()));
  if (rows.has_value()) {
    check_index_dtype(op, "rows", *rows);
    TORCH_CHECK(rows->dim() == 1 && rows->size(0) == ids.size(0),
                op + ": rows must be [N] like ids (" + to_str(ids.size(0)) + "), got shape " + to_str(rows->sizes()));
  } else {
    TORCH_CHECK(out.size(0) >= ids.size(0), op + ": out has " + to_str(out.size(0)) + " rows for " +
                                                 to_str(ids.size(0)) + " ids; pass rows= or a bigger out");
  }
  check_outputs_apart(op, {{"out", &out}},
                      {{"table", &table}, {"ids", &ids}, {"rows", rows.has_value() ? &*rows : nullptr}});
}

struct LayerRange {
  int64_t begin, end;  // layers
  int64_t layer_elems;  // d
};

inline LayerRange check_cache_prefetch_args(const at::Tensor& ids, const at::Tensor& slot_map, const at::Tensor& cache,
                                            const at::Tensor& host_table, const at::Tensor& out, const at::Tensor& first,
                                            const at::Tensor& slots, int64_t layer_begin,
                                            std::optional<int64_t> layer_end) {
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
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"out", &out}, {"first", &first},
                                {"slots", &slots}})
    check_writable(op + ": " + name, *t);
  check_outputs_apart(op, {{"out", &out}, {"first", &first}, {"slots", &slots}},
                      {{"ids", &ids}, {"slot_map", &slot_map}, {"cache", &cache}, {"host_table", &host_table}});
  const int64_t L = cache.dim() == 3 ? cache.size(1) : 1;
  const int64_t end = layer_end.value_or(L);
  TORCH_CHECK(0 <= layer_begin && layer_begin <= end && end <= L,
              op + ": layers [" + to_str(layer_begin) + ", " + to_str(end) + ") are not within [0, " + to_str(L) + ")");
  return {layer_begin, end, cache.size(-1)};
}

// tol_cache_admit's counters (int64 [kAdmitCounters]) and the last_use of a hot slot (never evicted).
enum AdmitCounter : int { kClock, kStep, kLookups, kHits, kUniqueMisses, kAdmissions, kEvictions, kAdmitCounters };
constexpr int64_t kHotStamp = INT64_MAX;

// tol_cache_admit's argument checks, shared by the CPU and CUDA kernels. Everything it writes must be
// contiguous (the kernels index it flat); every tensor on one device.
inline void check_cache_admit_args(const at::Tensor& ids, const at::Tensor& first, const at::Tensor& slots,
                                   const at::Tensor& rows, const at::Tensor& slot_map, const at::Tensor& owner,
                                   const at::Tensor& last_use, const at::Tensor& admitted_at, const at::Tensor& cache,
                                   const at::Tensor& counters) {
  const std::string op = "tol_cache_admit";
  check_token_table(op, "cache", cache);
  check_token_table(op, "rows", rows);
  check_index_dtype(op, "ids", ids);
  TORCH_CHECK(ids.dim() == 1, op + ": ids must be 1-D [N], got shape " + to_str(ids.sizes()));
  const int64_t N = ids.size(0), C = cache.size(0);
  TORCH_CHECK_TYPE(rows.scalar_type() == cache.scalar_type(), op + ": rows must have cache's dtype " +
                                                                  c10::toString(cache.scalar_type()) + ", got " +
                                                                  c10::toString(rows.scalar_type()));
  TORCH_CHECK(rows.dim() == cache.dim() && rows.sizes().slice(1) == cache.sizes().slice(1) && rows.size(0) >= N,
              op + ": rows must be [>= N, ...] with N=" + to_str(N) + " and cache's row shape " +
                  to_str(cache.sizes().slice(1)) + ", got " + to_str(rows.sizes()));
  TORCH_CHECK(cache.is_contiguous(), op + ": cache must be contiguous");
  struct Arg {
    const at::Tensor* t;
    const char* name;
    at::ScalarType dtype;
    int64_t size;
  };
  for (const Arg& a : {Arg{&first, "first", at::kInt, N}, Arg{&slots, "slots", at::kInt, N},
                       Arg{&slot_map, "slot_map", at::kInt, -1}, Arg{&owner, "owner", at::kInt, C},
                       Arg{&last_use, "last_use", at::kLong, C}, Arg{&admitted_at, "admitted_at", at::kLong, C},
                       Arg{&counters, "counters", at::kLong, kAdmitCounters}}) {
    // torch's own names (int32, int64), as the Python checks print them, not c10's (Int, Long)
    TORCH_CHECK_TYPE(a.t->scalar_type() == a.dtype,
                     op + ": " + a.name + " must be " + std::string(c10::getDtypeNames(a.dtype).first) + ", got " +
                         std::string(c10::getDtypeNames(a.t->scalar_type()).first));
    TORCH_CHECK(a.t->dim() == 1 && (a.size < 0 || a.t->size(0) == a.size) && a.t->is_contiguous(),
                op + ": " + a.name + " must be a contiguous 1-D tensor" +
                    (a.size < 0 ? std::string() : " of " + to_str(a.size)) + ", got shape " + to_str(a.t->sizes()));
    TORCH_CHECK(a.t->device() == cache.device(),
                op + ": " + a.name + " must be on cache's device " + cache.device().str() + ", got " + a.t->device().str());
    if (a.t != &first && a.t != &slots) check_writable(op + ": " + a.name, *a.t);  // the op's state, written
  }
  check_writable(op + ": cache", cache);
  TORCH_CHECK(ids.device() == cache.device() && rows.device() == cache.device(),
              op + ": ids and rows must be on cache's device " + cache.device().str());
  check_outputs_apart(op, {{"slot_map", &slot_map}, {"owner", &owner}, {"last_use", &last_use},
                           {"admitted_at", &admitted_at}, {"cache", &cache}, {"counters", &counters}},
                      {{"ids", &ids}, {"first", &first}, {"slots", &slots}, {"rows", &rows}});
}

// Page-locking host memory needs the CUDA runtime, which only the CUDA build links. The CPU file
// csrc/cpu/tol_host_alloc.cpp allocates; csrc/cuda/tol_host_alloc.cu installs these hooks from a static
// initializer. With no hooks (CPU-only build) tol_host_alloc(pin=True) raises; the Python wrapper asks for
// pinning only where it can be had (pin_unavailable_reason).
struct HostPinHooks {
  // Registers [ptr, ptr + bytes) as page-locked, device-mapped memory. Returns "" on success, else why not.
  std::string (*pin)(void* ptr, size_t bytes) = nullptr;
  void (*unpin)(void* ptr) = nullptr;
  // Whether the device has a mapping of this host address (cudaHostGetDevicePointer succeeds).
  bool (*mapped)(const void* ptr) = nullptr;
};
HostPinHooks& host_pin_hooks();

}  // namespace memllm
