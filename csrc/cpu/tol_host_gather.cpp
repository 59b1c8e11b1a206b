// CPU kernel of memllm::tol_host_gather: out[rows[i]] = table[ids[i]] (out[i] without rows), whole token rows.
//
// A pure copy (bit exact, any float dtype): one memcpy of L*d elements per token, tokens split across
// threads. On the CPU this is the disk tier's path (table = the mmap of a ToL file, out = pinned staging:
// page faults read the rows from disk) and the CPU stand-in for the device's host-row gather.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../tol_offload.h"

namespace memllm {
namespace {

void host_gather_cpu(const at::Tensor& table, const at::Tensor& ids_in, const at::Tensor& out,
                     const std::optional<at::Tensor>& rows_in, bool check_ids) {
  check_host_gather_args(table, ids_in, out, rows_in);
  TORCH_CHECK(table.device().is_cpu() && ids_in.device().is_cpu() && out.device().is_cpu() &&
                  (!rows_in.has_value() || rows_in->device().is_cpu()),
              std::string("tol_host_gather (CPU): table, ids, out and rows must all be CPU tensors, got table on ") +
                  table.device().str() + ", out on " + out.device().str());
  const int64_t N = ids_in.size(0);
  if (N == 0) return;
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::Tensor rows = rows_in.has_value() ? rows_in->to(at::kLong).contiguous() : at::Tensor();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t* row = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
  const int64_t V = table.size(0), M = out.size(0);
  if (check_ids) {  // every index before any write
    for (int64_t i = 0; i < N; ++i) {
      if (id[i] < 0 || id[i] >= V) throw_bad_id("tol_host_gather", i, id[i], V);
      if (row != nullptr && (row[i] < 0 || row[i] >= M)) throw_bad_row("tol_host_gather", i, row[i], M);
    }
  }
  const size_t es = table.element_size();
  const size_t row_bytes = static_cast<size_t>(token_row_elems(table)) * es;
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t src_rs = table.stride(0) * static_cast<int64_t>(es);
  const int64_t dst_rs = out.stride(0) * static_cast<int64_t>(es);
  // About 256 KiB per task: one 1b row is 96 KiB, so prefill's thousands of rows spread over the threads.
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>((256 << 10) / std::max<size_t>(row_bytes, 1)));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = row != nullptr ? row[i] : i;
      if (r < 0 || r >= M) continue;  // only reachable with check_ids=false
      if (id[i] < 0 || id[i] >= V) {
        std::memset(dst + r * dst_rs, 0xFF, row_bytes);  // all-ones bytes: NaN in every float dtype
        continue;
      }
      std::memcpy(dst + r * dst_rs, src + id[i] * src_rs, row_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memllm, CPU, m) {
  m.impl("tol_host_gather", &host_gather_cpu);
}

}  // namespace memllm
