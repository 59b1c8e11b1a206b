// Argument checks and layout helpers shared by the CPU and CUDA tol_gather_add kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <utility>
#include <string>
#include <type_traits>

namespace memllm {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The type a row is summed in: float, or double when either input is double (gradcheck). One rounding
// to hidden's dtype afterwards, so every backend gives the same bits.
template <typename hidden_t, typename table_t>
using acc_type_t = std::conditional_t<std::is_same_v<hidden_t, double> || std::is_same_v<table_t, double>,
                                      double, float>;

// Stride between consecutive rows if `t` ([..., d], last dim contiguous) can be read as a
// [T, d] matrix without a copy, else -1 (then callers work on a contiguous copy).
inline int64_t row_stride(const at::Tensor& t) {
  const int64_t n = t.dim();
  if (t.size(-1) > 1 && t.stride(-1) != 1) return -1;
  int64_t rs = -1, expect = -1;
  for (int64_t i = n - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (rs < 0) {
      rs = t.stride(i);
      expect = rs * t.size(i);
    } else if (t.stride(i) != expect) {
      return -1;
    } else {
      expect *= t.size(i);
    }
  }
  return rs < 0 ? t.size(-1) : rs;  // zero or one row: any stride will do
}

// Where the rows of one layer start: a [V, d] table, or the `layer` slice of a [V, L, d] one.
struct TolTableView {
  int64_t num_rows;      // V
  int64_t row_stride;    // elements between consecutive tokens' rows (64-bit: 128256*24*2048 > 2^31)
  int64_t layer_offset;  // elements from a token's first row to its `layer` row
};

// Error messages are plain std::string built with std::to_string: with torch 2.11 on the GPU test
// machine, every TORCH_CHECK whose message streamed an integer through c10::str crashed the process
// (SIGSEGV) while messages of strings, ScalarTypes and Devices raised fine. memllm_kernels.ops checks
// the same conditions first and raises TypeError / ValueError / IndexError from Python; the C++ ops
// raise TypeError for dtypes, IndexError for ids (and destination rows) out of range, as the wrappers and
// the Python backends do (also under torch.compile, where no wrapper translates), and RuntimeError for the rest.
inline std::string to_str(int64_t v) { return std::to_string(v); }
inline std::string to_str(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

// Checks everything but the id range; throws an error that names the problem.
inline TolTableView check_tol_gather_add_args(
    const char* op, const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& table,
    const std::optional<int64_t>& layer) {
  const std::string o = op;
  TORCH_CHECK_TYPE(is_supported_float(hidden.scalar_type()),
                   o + ": hidden must be float32, float16, bfloat16 or float64, got " + c10::toString(hidden.scalar_type()));
  TORCH_CHECK_TYPE(is_supported_float(table.scalar_type()),
                   o + ": table must be float32, float16, bfloat16 or float64, got " + c10::toString(table.scalar_type()));
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                   o + ": ids must be int32 or int64, got " + c10::toString(ids.scalar_type()));
  TORCH_CHECK(hidden.dim() >= 1, o + ": hidden must have shape [..., d], got a 0-d tensor");
  const c10::IntArrayRef lead = hidden.sizes().slice(0, hidden.dim() - 1);
  TORCH_CHECK(ids.sizes() == lead,
              o + ": ids must have hidden's leading shape " + to_str(lead) + ", got " + to_str(ids.sizes()));
  TORCH_CHECK(table.dim() == 2 || table.dim() == 3,
              o + ": table must be [V, d] or token-major [V, L, d], got shape " + to_str(table.sizes()));
  TORCH_CHECK(table.size(-1) == hidden.size(-1), o + ": table rows have d=" + to_str(table.size(-1)) +
                                                     " but hidden has d=" + to_str(hidden.size(-1)));
  TORCH_CHECK(hidden.device() == ids.device() && hidden.device() == table.device(),
              o + ": hidden, ids and table must be on one device, got " + hidden.device().str() + ", " +
                  ids.device().str() + " and " + table.device().str());
  TORCH_CHECK(table.size(-1) <= 1 || table.stride(-1) == 1,
              o + ": table's last dim must be contiguous (stride 1), got strides " + to_str(table.strides()) +
                  "; pass table.contiguous() if a copy of the table is acceptable");
  int64_t layer_offset = 0;
  if (table.dim() == 3) {
    TORCH_CHECK(layer.has_value(), o + ": a token-major [V, L, d] table needs layer=, with L=" + to_str(table.size(1)));
    TORCH_CHECK(*layer >= 0 && *layer < table.size(1), o + ": layer=" + to_str(*layer) +
                                                           " is outside the table's [0, " + to_str(table.size(1)) +
                                                           ") layers");
    layer_offset = *layer * table.stride(1);
  } else {
    TORCH_CHECK(!layer.has_value(), o + ": layer=" + to_str(layer.value_or(0)) +
                                        " was given for a [V, d] table; pass a [V, L, d] table or layer=None");
  }
  return {table.size(0), table.stride(0), layer_offset};
}

// The error for an id outside [0, V): names the id, where it is, and V.
[[noreturn]] inline void throw_bad_id(const char* op, int64_t position, int64_t id, int64_t num_rows) {
  TORCH_CHECK_INDEX(false, std::string(op) + ": id " + to_str(id) + " (at flat position " + to_str(position) +
                         " of ids) is outside [0, V) for a table of V=" + to_str(num_rows) + " rows");
  __builtin_unreachable();
}

// Host ids [T] all in [0, num_rows), checked before any write, so a bad id never leaves a half-updated output
// behind (the CPU kernels; on a GPU the ids are checked by a reduction on the device).
template <typename index_t>
void check_id_range(const char* op, const index_t* ids, int64_t T, int64_t num_rows) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = static_cast<int64_t>(ids[t]);
    if (id < 0 || id >= num_rows) throw_bad_id(op, t, id, num_rows);
  }
}

// The functional and in-place forms of a row kernel (tol_gather_add, tol_cached_gather_add; CPU and CUDA),
// given launch(out, out_row_stride, hidden, hidden_row_stride, ids_flat) that adds the rows into out.
// Out of place writes a new contiguous tensor (hidden copied first only if it is not viewable as [T, d]);
// in place writes hidden's rows directly, or goes through the out-of-place form when they are not viewable.
template <typename Launch>
at::Tensor run_out_of_place(const at::Tensor& hidden, const at::Tensor& ids, const Launch& launch) {
  const int64_t d = hidden.size(-1);
  at::Tensor out = at::empty(hidden.sizes(), hidden.options());
  const int64_t rs = row_stride(hidden);
  const at::Tensor h = rs < 0 ? hidden.contiguous() : hidden;
  launch(out, d, h, rs < 0 ? d : rs, ids.contiguous().view(-1));
  return out;
}

// A tensor made under torch.inference_mode() may be written only inside inference mode, as ATen's in-place ops
// enforce (in their ADInplaceOrView kernel, which a custom op's kernels bypass): each op checks what it writes.
// `what` names the tensor ("tol_host_gather: out").
inline void check_writable(const std::string& what, const at::Tensor& t) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(),
              what + " is an inference tensor (made under torch.inference_mode()), which cannot be updated in place "
              "outside inference mode; call this under torch.inference_mode(), or pass a clone");
}

// The first and last byte a tensor's elements span (torch strides are never negative).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  const auto p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {p, p + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

// Whether a and b, both with elements, on one device, span common bytes (as _checks.py compares them: by
// address, so two tensors over the same memory with different storages are caught too).
inline bool bytes_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  return a0 <= b1 && b0 <= a1;
}

// An op with outputs besides hidden (the offload ops): what it writes ({name, tensor}; a null tensor is an
// absent optional) must own its elements (an expand()ed out: threads writing one element race) and share no
// bytes with another output or with anything it reads; out given as its own table gave each backend other
// rows. The Python wrappers make the same check first (_checks.outputs_apart); this one guards the raw ops.
struct NamedTensor {
  const char* name;
  const at::Tensor* t;
};
inline void check_outputs_apart(const std::string& op, std::initializer_list<NamedTensor> writes,
                                std::initializer_list<NamedTensor> reads) {
  for (auto w = writes.begin(); w != writes.end(); ++w) {
    if (w->t == nullptr) continue;
    TORCH_CHECK(at::has_internal_overlap(*w->t) != at::MemOverlap::Yes,
                op + ": " + w->name + " has elements that share memory (shape " + to_str(w->t->sizes()) +
                    ", strides " + to_str(w->t->strides()) + ": an expand()ed tensor?), so it cannot be written; "
                    "pass a tensor whose elements are its own");
    const auto refuse = [&](const NamedTensor& other, const char* what) {
      TORCH_CHECK(other.t == nullptr || !bytes_overlap(*w->t, *other.t),
                  op + ": " + w->name + " shares memory with " + other.name + " (" + what + "); an output must not "
                  "overlap an input or another output: pass tensors of their own");
    };
    for (auto o = w + 1; o != writes.end(); ++o) refuse(*o, "another output");
    for (const NamedTensor& r : reads) refuse(r, "an input");
  }
}

// `reads`: the tables the kernel reads (rows, and the cached op's slot map). hidden must not share memory with them
// or with ids: a hidden that is a view of its own table would read rows it already overwrote (the reference reads
// before writing); one over the slot map read a hit as a miss.
// By byte span, not ATen's assert_no_overlap, which gives up on strided views such as table[:T, l].
template <typename Launch>
void run_in_place(const at::Tensor& hidden, const at::Tensor& ids, std::initializer_list<at::Tensor> reads,
                  const Launch& launch) {
  check_writable("hidden", hidden);
  at::assert_no_internal_overlap(hidden);
  const auto check_apart = [&](const at::Tensor& t) {
    TORCH_CHECK(!bytes_overlap(hidden, t), "unsupported operation: hidden shares memory with ids or a table it "
                "reads (a view of its own table?); pass hidden.clone()");
  };
  check_apart(ids);
  for (const at::Tensor& t : reads) check_apart(t);
  const int64_t rs = row_stride(hidden);
  if (rs < 0) {
    hidden.copy_(run_out_of_place(hidden, ids, launch));
    return;
  }
  launch(hidden, rs, hidden, rs, ids.contiguous().view(-1));
}

}  // namespace memllm
