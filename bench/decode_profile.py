"""Where a decode step's time goes: kernels per step, by kind, for dense vs MemoryLLM (torch.profiler).

    python bench/decode_profile.py [--device cuda] [--size 1b] [--modes graph compiled] [--attention sdpa memllm]
                                   [--compile-mode max-autotune-no-cudagraphs]

The decode benchmarks say how fast a step is; this says why. One batch-1 decode step at position 128 (the
benchmarks' step: bench/models.py, random weights) is profiled over --steps steps, for each provider and mode
(eager; graph: replayed from a CUDA graph; compiled: torch.compile, inside a graph on a GPU) and attention (torch's
SDPA or memllm::decode_attention). On a GPU it counts the kernels of a step and sums their time by kind (matmul,
attention, ToL/offload ops, Inductor's fused kernels, copies, the rest: norms, RoPE, masks, adds), and reports the
matmuls' bandwidth on the weights they read: if the matmuls run near the memory bandwidth and the rest is small,
the step is weight-bound and MemoryLLM's speed-up approaches the ratio of weights read (about 2.2x at 1b); if the
rest is large, it is bound by kernel latency. Its idle time (wall time not covered by any kernel) is what the
host adds: launches, or the disk tier's sync per step; host_ms is the host's own time per step (where it reaches
ms/step, the host sets the pace), and host_top its top-level torch ops and CUDA runtime calls (profiled, so
inflated: blocking calls and allocations stand out). On the CPU it counts the top-level aten (and memllm) ops
per step and their time. Writes decode_profile.json (with the machine and commit) to --out/<machine>/ and prints a
table; a run of the commit that wrote that file (clean tree) adds its cases to the file's, as the benchmarks do.
`python bench/report.py report DIR` adds it to report.md (ops/step: kernels on a GPU, top-level ops on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from conftest import _merged, machine_info, machine_tag, set_aside  # bench/ is sys.path[0] when this runs as a script
from models import PROVIDERS, attention_kind, build_model, decode_step, free_models, memory_bytes

# Kernel kinds by name, first match wins: ours; cuBLAS (nvjet_* on Hopper with CUDA 13), cuBLASLt and CUTLASS
# GEMV/GEMM kernels; Inductor's fused pointwise and reduction kernels (triton_poi/red/per_fused_<ops>, whose
# names list every op they fuse, SDPA's mask and `_to_copy` included, so they are matched before attention and
# copies); SDPA's kernels (cuDNN, flash, memory-efficient); copies.
KINDS = [("tol", r"tol_|memllm|host_gather|cache_prefetch"),
         ("matmul", r"nvjet|gemv|gemm|cutlass|cublas|sm90_xmma|splitKreduce|\bmm\b|matmul|addmm|linear|triton_tem"),
         ("fused", r"^triton_(poi|red|per)_"),
         ("attention", r"flash|fmha|attention|sdpa|efficient"),
         ("copy", r"memcpy|memset|copy|Memcpy|Memset")]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def _union_us(intervals) -> float:
    """Length of the union of [start, end) intervals (us): time at least one kernel (or op) ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _by_name(events) -> dict[str, list]:
    """Durations (us) of the events, by name."""
    out: dict[str, list] = {}
    for e in events:
        out.setdefault(e.name, []).append(e.time_range.elapsed_us())
    return out


def _top(by_name: dict, steps: int, n: int) -> list[dict]:
    """The n names with the most time, per step."""
    return [{"name": k[:120], "per_step": len(t) / steps, "us_per_step": sum(t) / steps}
            for k, t in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:n]]


def profile_step(fn, device: str, steps: int) -> dict:
    """Kernels (GPU) or top-level aten ops (CPU) of `steps` calls of fn, per step. busy_us sums their times
    (kernels on two streams both count); active_us is the time at least one ran, and idle_us = wall - active_us
    the time the device waited for the host (launches; the disk tier's sync per step), from an unprofiled run,
    whose host_ms is the host's time per step until its last call returns (near wall_ms: the host sets the pace)."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - t0) / steps  # the host's time per step: where it reaches wall, it sets the pace
    if device == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        picked = [e for e in events if e.device_type == DeviceType.CUDA]
    else:  # top-level ops (not the ops they call)
        ours = ("aten::", "memllm::")
        picked = [e for e in events if e.name.startswith(ours)
                  and not (e.cpu_parent is not None and e.cpu_parent.name.startswith(ours))]
    by_name = _by_name(picked)
    by_kind: dict[str, dict] = {}
    for name, times in by_name.items():
        k = by_kind.setdefault(kind_of(name), {"count": 0, "us": 0.0})
        k["count"] += len(times) / steps
        k["us"] += sum(times) / steps
    active = _union_us([(e.time_range.start, e.time_range.end) for e in picked]) / steps
    out = {"wall_ms": wall * 1e3, "host_ms": host * 1e3, "ops_per_step": len(picked) / steps,
           "busy_us": sum(map(sum, by_name.values())) / steps, "active_us": active,
           "idle_us": max(0.0, wall * 1e6 - active), "by_kind": by_kind,
           "top": _top(by_name, steps, 10)}
    if device == "cuda":
        # Where the host's time goes (under the profiler, so inflated): its top-level torch ops and CUDA runtime
        # calls (cudaGraphLaunch, cudaEventRecord, cudaHostAlloc, a blocking cudaEventSynchronize, ...).
        host_by = _by_name(e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None)
        out["host_ops_us"] = sum(map(sum, host_by.values())) / steps
        out["host_top"] = _top(host_by, steps, 15)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", help="preset size (default 1b on a GPU, tiny on the CPU)")
    p.add_argument("--dtype", help="default bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--providers", nargs="+", default=["dense", "memoryllm", "memoryllm-host", "memoryllm-host-devlru"],
                   choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", choices=["eager", "graph", "compiled"],
                   help="default graph and compiled on a GPU (eager is bound by launches there), eager and compiled "
                   "on the CPU; graph: CUDA only (skipped on the CPU)")
    p.add_argument("--attention", nargs="+", choices=["sdpa", "memllm"],
                   help="the decode step's attention (Transformer.decode_attention): default both on a GPU, sdpa "
                   "on the CPU (memllm runs its PyTorch reference there)")
    p.add_argument("--compile-mode", help="torch.compile's mode for the compiled cases (default: its default), "
                   "e.g. max-autotune-no-cudagraphs (Inductor's own Triton matmuls where they beat cuBLAS; minutes "
                   "of tuning per case); the rows' mode reads compiled/<mode>")
    p.add_argument("--steps", type=int, default=20, help="profiled decode steps per case (default 20)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="results go to OUT/<machine>/decode_profile.json (default bench/results)")
    a = p.parse_args(argv)
    device = a.device
    size = a.size or ("1b" if device == "cuda" else "tiny")
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    modes = a.modes or (["graph", "compiled"] if device == "cuda" else ["eager", "compiled"])
    modes = [m for m in modes if device == "cuda" or m != "graph"]  # graphs are CUDA only
    attentions = a.attention or (["sdpa", "memllm"] if device == "cuda" else ["sdpa"])
    info = machine_info(device)
    out = os.path.join(a.out, machine_tag(info))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "decode_profile.json")
    rows = []
    T = 128
    for provider in a.providers:
        free_models()
        model, engine = build_model(device, size, dtype, provider)
        weights_read = memory_bytes(model, engine)["weight_bytes_read"]
        V = model.config.vocab_size
        for attention, mode in [(att, m) for att in attentions for m in modes]:
            model.decode_attention = attention
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn = decode_step(model, torch.randint(0, V, (1, T), device=device),
                                 torch.randint(0, V, (256, 1, 1), device=device),
                                 graph=device == "cuda" and mode != "eager",
                                 compile=mode == "compiled" and (a.compile_mode or True))
                r = profile_step(fn, device, a.steps)
            model.clear_caches()
            mm = r["by_kind"].get("matmul")
            if mode == "compiled" and a.compile_mode:
                mode = f"compiled/{a.compile_mode}"
            row = {"op": "decode_profile", "provider": provider, "mode": mode, "attention": attention_kind(model, device),
                   "preset": size, "dtype": dtype, "batch": 1, "T": T, "weight_bytes_read": weights_read,
                   "seconds": time.perf_counter() - t0, **r,
                   # the case's identity for _merged: a later run of this commit replaces this row, not the file
                   "test": f"decode_profile {provider} {mode} {attention}"}
            if engine is not None:  # how often the host ran 8 steps ahead of the engine's bookkeeping, in all
                row["host_waits"] = engine.host_waits
            if device == "cuda" and mm and mm["us"]:
                row["matmul_gbps"] = weights_read / (mm["us"] * 1e-6) / 1e9  # weights read / matmul time
            rows.append(row)
            # After every case: a run stopped at a time limit keeps what it measured. Merged as the benchmark
            # sessions merge: gpu_check.sh's profile and host steps both run this, and the second replaced the
            # first's cases.
            if len(rows) == 1:  # the first case: an earlier file this run replaces goes to previous/ first
                prev = set_aside(path, info)
                if prev:
                    print(f"moved the earlier {path} (another commit, a changed tree or another machine) to {prev}")
            merged = _merged(path, info, rows)
            with open(path, "w") as f:
                json.dump({"machine": info, "results": merged}, f, indent=1)
            kinds = ", ".join(f"{k} {v['count']:.0f}/{v['us']:.0f}us" for k, v in sorted(r["by_kind"].items()))
            print(f"{provider:15} {mode:8} {row['attention']:6} {r['wall_ms']:8.3f} ms/step (host {r['host_ms']:.3f})"
                  f"  {r['ops_per_step']:6.0f} "
                  f"{'kernels' if device == 'cuda' else 'aten ops'}/step, busy {r['busy_us']:8.0f} us, "
                  f"idle {r['idle_us']:6.0f} us  [{kinds}]"
                  + (f"  matmul {row['matmul_gbps']:.0f} GB/s on weights" if "matmul_gbps" in row else ""),
                  flush=True)
            if "host_top" in r:
                print(f"    host (profiled) {r['host_ops_us']:.0f} us/step in top-level ops: " + ", ".join(
                    f"{t['name'][:40]} {t['per_step']:.1f}/{t['us_per_step']:.0f}us" for t in r["host_top"][:8]),
                      flush=True)
        fn = None  # its graph or compiled step holds the model: free it before the next provider's is built
        if engine is not None:
            engine.close()
        del model, engine
    free_models()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
