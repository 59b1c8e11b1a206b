// CPU kernel of memllm::tol_cached_gather_add(_): out[t] = hidden[t] + row(ids[t], layer), where the row
// comes from cache[slot] when slot = slot_map[id] is in [0, C) (a hit) and from host_table[id] otherwise.
//
// The arithmetic is tol_gather_add's (sum in float32, float64 if an input is float64, one rounding to
// hidden's dtype), so a cached run is bit-identical to the in-memory one. Which of the two tables a row
// comes from is decided per token, in the same pass as the add: no separate hit/miss gathers.
// A slot outside [0, C) counts as a miss: the kernel never reads outside the cache.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include "../tol_offload.h"

namespace memllm {
namespace {

template <typename hidden_t, typename table_t>
using acc_type_t = std::conditional_t<std::is_same_v<hidden_t, double> || std::is_same_v<table_t, double>,
                                      double, float>;

// The conversions of csrc/cpu/tol_gather_add.cpp, written so g++ vectorizes the row loop.
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(c10::BFloat16 x) { return c10::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }
inline float to_acc(c10::Half x) { return static_cast<float>(c10::bit_cast<_Float16>(x.x)); }

template <typename T> inline T from_acc(float v);
template <typename T> inline T from_acc(double v) { return static_cast<T>(v); }
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(float v) { return v; }
template <> inline c10::Half from_acc<c10::Half>(float v) {
  return c10::Half(c10::bit_cast<uint16_t>(static_cast<_Float16>(v)), c10::Half::from_bits());
}
template <> inline c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  const uint32_t u = c10::bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = (v != v) ? ((u >> 16) | 0x40u) : rounded;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

template <typename hidden_t, typename table_t, typename index_t>
struct Args {
  hidden_t* out;
  int64_t out_rs;
  const hidden_t* hidden;
  int64_t hidden_rs;
  const index_t* ids;
  const int32_t* slot_map;
  const table_t* cache;
  TolTableView cv;
  const table_t* host;
  TolTableView hv;
  int64_t d;
};

template <typename hidden_t, typename table_t, typename index_t>
__attribute__((always_inline)) inline void add_rows(const Args<hidden_t, table_t, index_t>& a, int64_t begin,
                                                    int64_t end) {
  using acc_t = acc_type_t<hidden_t, table_t>;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t id = static_cast<int64_t>(a.ids[t]);
    hidden_t* __restrict__ o = a.out + t * a.out_rs;
    if (id < 0 || id >= a.hv.num_rows) {  // only with check_ids=false: never read, poison the row
      for (int64_t i = 0; i < a.d; ++i) o[i] = std::numeric_limits<hidden_t>::quiet_NaN();
      continue;
    }
    const int64_t slot = a.slot_map[id];
    const table_t* __restrict__ row = (slot >= 0 && slot < a.cv.num_rows)
                                          ? a.cache + slot * a.cv.row_stride + a.cv.layer_offset
                                          : a.host + id * a.hv.row_stride + a.hv.layer_offset;
    const hidden_t* __restrict__ h = a.hidden + t * a.hidden_rs;
    for (int64_t i = 0; i < a.d; ++i) {
      o[i] = from_acc<hidden_t>(static_cast<acc_t>(to_acc(h[i])) + static_cast<acc_t>(to_acc(row[i])));
    }
  }
}

template <typename hidden_t, typename table_t, typename index_t>
__attribute__((target("avx2,fma,f16c"))) void add_rows_avx2(const Args<hidden_t, table_t, index_t>& a,
                                                            int64_t begin, int64_t end) {
  add_rows(a, begin, end);
}

template <typename hidden_t, typename table_t, typename index_t>
void add_rows_default(const Args<hidden_t, table_t, index_t>& a, int64_t begin, int64_t end) {
  add_rows(a, begin, end);
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

struct Views {
  TolTableView cache, host;
};

Views check_args(const char* op, const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& slot_map,
                 const at::Tensor& cache, const at::Tensor& host_table, const std::optional<int64_t>& layer) {
  const std::string o = op;
  Views v;
  v.cache = check_tol_gather_add_args(op, hidden, ids, cache, layer);
  TORCH_CHECK(host_table.device() == hidden.device() || host_table.device().is_cpu(),
              o + ": host_table must be on hidden's device or in host memory, got " + host_table.device().str());
  {
    // host_table's own checks, as if it were on hidden's device (it may be host memory mapped for it).
    TORCH_CHECK_TYPE(host_table.scalar_type() == cache.scalar_type(),
                     o + ": host_table must have cache's dtype " + c10::toString(cache.scalar_type()) + ", got " +
                         c10::toString(host_table.scalar_type()));
    TORCH_CHECK(host_table.dim() == cache.dim() && host_table.sizes().slice(1) == cache.sizes().slice(1),
                o + ": host_table rows must have cache's row shape " + to_str(cache.sizes().slice(1)) +
                    ", got host_table " + to_str(host_table.sizes()));
    TORCH_CHECK(host_table.size(-1) <= 1 || host_table.stride(-1) == 1,
                o + ": host_table's last dim must be contiguous, got strides " + to_str(host_table.strides()));
    v.host = {host_table.size(0), host_table.stride(0), cache.dim() == 3 ? *layer * host_table.stride(1) : 0};
  }
  TORCH_CHECK_TYPE(slot_map.scalar_type() == at::kInt,
                   o + ": slot_map must be int32, got " + c10::toString(slot_map.scalar_type()));
  TORCH_CHECK(slot_map.dim() == 1 && slot_map.size(0) == host_table.size(0),
              o + ": slot_map must be [V] with V=" + to_str(host_table.size(0)) + " (host_table's rows), got shape " +
                  to_str(slot_map.sizes()));
  TORCH_CHECK(slot_map.device() == hidden.device(),
              o + ": slot_map must be on hidden's device " + hidden.device().str() + ", got " + slot_map.device().str());
  return v;
}

void launch(const at::Tensor& out, int64_t out_rs, const at::Tensor& hidden, int64_t hidden_rs,
            const at::Tensor& ids_flat, const at::Tensor& slot_map, const at::Tensor& cache,
            const at::Tensor& host_table, const Views& v, bool check_ids) {
  const int64_t T = ids_flat.numel();
  const int64_t d = hidden.size(-1);
  if (T == 0) return;
  const at::Tensor sm = slot_map.contiguous();
  AT_DISPATCH_INDEX_TYPES(ids_flat.scalar_type(), "tol_cached_gather_add_cpu_ids", [&] {
    const index_t* ids = ids_flat.const_data_ptr<index_t>();
    if (check_ids) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t id = static_cast<int64_t>(ids[t]);
        if (id < 0 || id >= v.host.num_rows) throw_bad_id("tol_cached_gather_add", t, id, v.host.num_rows);
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "tol_cached_gather_add_cpu", [&] {
      using hidden_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(), "tol_cached_gather_add_cpu_t", [&] {
        using table_t = scalar_t;
        Args<hidden_t, table_t, index_t> a{out.data_ptr<hidden_t>(), out_rs, hidden.const_data_ptr<hidden_t>(),
                                           hidden_rs, ids, sm.const_data_ptr<int32_t>(),
                                           cache.const_data_ptr<table_t>(), v.cache,
                                           host_table.const_data_ptr<table_t>(), v.host, d};
        const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
        const bool avx2 = cpu_has_avx2();
        at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
          if (avx2) {
            add_rows_avx2(a, begin, end);
          } else {
            add_rows_default(a, begin, end);
          }
        });
      });
    });
  });
}

at::Tensor cached_gather_add_cpu(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& slot_map,
                                 const at::Tensor& cache, const at::Tensor& host_table, std::optional<int64_t> layer,
                                 bool check_ids) {
  const Views v = check_args("tol_cached_gather_add", hidden, ids, slot_map, cache, host_table, layer);
  const int64_t d = hidden.size(-1);
  at::Tensor out = at::empty(hidden.sizes(), hidden.options());
  int64_t hidden_rs = row_stride(hidden);
  const at::Tensor h = hidden_rs < 0 ? hidden.contiguous() : hidden;
  if (hidden_rs < 0) hidden_rs = d;
  launch(out, d, h, hidden_rs, ids.contiguous().view(-1), slot_map, cache, host_table, v, check_ids);
  return out;
}

void cached_gather_add_cpu_(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& slot_map,
                            const at::Tensor& cache, const at::Tensor& host_table, std::optional<int64_t> layer,
                            bool check_ids) {
  const Views v = check_args("tol_cached_gather_add_", hidden, ids, slot_map, cache, host_table, layer);
  at::assert_no_internal_overlap(hidden);
  const int64_t rs = row_stride(hidden);
  if (rs < 0) {
    hidden.copy_(cached_gather_add_cpu(hidden, ids, slot_map, cache, host_table, layer, check_ids));
    return;
  }
  launch(hidden, rs, hidden, rs, ids.contiguous().view(-1), slot_map, cache, host_table, v, check_ids);
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CPU, m) {
  m.impl("tol_cached_gather_add", &cached_gather_add_cpu);
  m.impl("tol_cached_gather_add_", &cached_gather_add_cpu_);
}

}  // namespace memllm
