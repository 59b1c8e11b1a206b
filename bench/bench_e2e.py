"""End-to-end prefill and decode of the reference model: dense vs MemoryLLM (ToLs in device memory, in the
host tier + a device cache, on disk + a device cache) vs Flex-3.

    pytest bench/bench_e2e.py              # tiny shapes on CPU (the GPU's 1b shapes when a GPU is visible)

Models and providers: bench/models.py (random weights and tables; the host and disk providers cache 5% of
the vocabulary, hot+lru with no hot set, so uniformly random ids make this their worst case; the decode
benchmark on real text with a hot set is e2e_offload_decode in bench_offload.py). Rows:
    op e2e_prefill: one forward over a batch-1 prompt of T tokens through the KV cache, tokens/s = T / time
    op e2e_decode:  one decode step of a batch of B sequences at position T, tokens/s = B / time
    op e2e_decode_graph (GPU): the same step replayed from a CUDA graph (memllm_kernels.model.DecodeGraph; the
                    offload engine's prefetch still runs eagerly before each replay): eager decode at batch 1
                    is bound by kernel launches, a replayed one by the weights it reads
    op e2e_decode_compiled: batch 1, the step compiled by torch.compile (compile_decode: fused kernels) and,
                    on a GPU, replayed from a CUDA graph; compilation is warm-up, not timed
Decode on a GPU: each round runs DECODE_RUN steps back to back between CUDA events (generate() never waits for
a token before launching the next step); ms_synced is one step followed by a host sync (a caller that reads
each token as it comes pays the host's share of the step too); ms_host is the host's time per step in the
back-to-back runs (where it reaches ms, the host sets the pace, not the device).
    op decode_linear: each projection a batch-1 decode step reads, alone (F.linear: cuBLAS on a GPU, oneDNN/MKL
                    on the CPU), at the 1b shapes in bf16, against the same-bytes device copy: which of the
                    step's matmuls run near the bandwidth ceiling (see decode_linear's docstring)
Memory: the bytes of device-resident weights (the host and disk providers keep the token
embedding in host memory) and of the device-resident table (or cache), and the peak device memory (GPU) or
process RSS (CPU) while the benchmark ran.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import DECODE_RUN, bench_device, peak_memory, record, reset_peak_memory, timed
from models import (PROJECTIONS, PROVIDERS, ROTATE_BYTES, attention_kind, decode_step, free_models, memory_bytes,
                    projection_shape, resident_model)


def pytest_generate_tests(metafunc):
    if "projection" in metafunc.fixturenames:
        metafunc.parametrize("device,projection", [pytest.param(bench_device(metafunc.config), p, id=p)
                                                   for p in PROJECTIONS])
    if "kind" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    if device == "cuda":
        size, dtype, prefill, decode = "1b", "bfloat16", [512, 2048], [1, 8]
    else:
        size, dtype, prefill, decode = "tiny", "float32", [256], [1, 8]
    decode_phases = ["decode", "decode_graph"] if device == "cuda" else ["decode"]
    cases = []
    for kind in PROVIDERS:  # provider-major: each model (a 1b one takes seconds to build) is built once
        cases += [pytest.param(device, size, dtype, kind, "prefill", T, 1, id=f"prefill-{size}-{kind}-T{T}")
                  for T in prefill]
        cases += [pytest.param(device, size, dtype, kind, phase, 128, B, id=f"{phase}-{size}-{kind}-B{B}")
                  for phase in decode_phases for B in decode]
        # batch 1 only: each compile takes tens of seconds on a GPU (the targets are at batch 1)
        cases.append(pytest.param(device, size, dtype, kind, "decode_compiled", 128, 1,
                                  id=f"decode_compiled-{size}-{kind}-B1"))
    metafunc.parametrize("device,size,dtype,kind,phase,T,B", cases)


@pytest.fixture(autouse=True, scope="module")
def _free_models():
    yield
    free_models()


@torch.inference_mode()
def test_e2e(benchmark, device, size, dtype, kind, phase, T, B):
    model, engine = resident_model(device, size, dtype, kind)
    vocab = model.config.vocab_size
    reset_peak_memory(device)
    if phase == "prefill":
        model.setup_caches(B, T)
        prompts = torch.randint(0, vocab, (16, B, T), device=device)  # a new prompt each call (caches see misses)
        pos = torch.arange(T, device=device)
        it = itertools.cycle(range(prompts.shape[0]))

        def fn():
            return model(prompts[next(it)], input_pos=pos, check=False)
        tokens = B * T
    else:
        # Fresh random tokens every step: a repeated token would be a cache hit for the host/disk providers.
        fn = decode_step(model, torch.randint(0, vocab, (B, T), device=device),
                         torch.randint(0, vocab, (1024, B, 1), device=device),
                         graph=device == "cuda" and phase != "decode", compile=phase == "decode_compiled")
        tokens = B
    t = timed(benchmark, fn, device, graph=False, min_inner=1 if phase == "prefill" else DECODE_RUN)
    model.clear_caches()
    mem, mem_kind = peak_memory(device)
    row = record(op=f"e2e_{phase}", provider=kind, dtype=dtype, preset=size, T=T, batch=B, ms=t["s"] * 1e3,
                 attention=None if phase == "prefill" else attention_kind(model, device),
                 ms_synced=t["s_synced"] and t["s_synced"] * 1e3, ms_host=t["s_host"] and t["s_host"] * 1e3,
                 tokens_per_s=tokens / t["s"],
                 peak_memory_bytes=mem, peak_memory_kind=mem_kind, **memory_bytes(model, engine))
    benchmark.extra_info.update(row)


@torch.inference_mode()
def test_decode_linear(benchmark, device, projection):
    """One token through one projection of the 1b preset in bf16 (the dense model's step runs wqkv, wo,
    w_gate_up and w_down per layer and the head once; MemoryLLM's the same without the FFN's two): GB/s of
    the weight read, % of the same run's device-copy ceiling (make bench's gather benchmarks measure it),
    and ms per decode step (ms x calls per step). A decode step's matmul time that is not near the ceiling
    is where its GEMV loses, and is the same in both models only for wqkv, wo and the head."""
    from memllm_kernels.model import get_preset

    cfg = get_preset("1b-dense")
    n, k, per_step = projection_shape(cfg, projection)
    dt = torch.bfloat16
    copies = min(cfg.n_layer, max(1, math.ceil(ROTATE_BYTES / (n * k * dt.itemsize))))
    weights = [torch.empty(n, k, device=device, dtype=dt).uniform_(-0.02, 0.02) for _ in range(copies)]
    x = torch.randn(1, k, device=device, dtype=dt)
    it = itertools.cycle(weights)

    def fn():
        return torch.nn.functional.linear(x, next(it))
    t = timed(benchmark, fn, device, min_inner=copies)  # a GPU round replays one call per copy
    row = record(op="decode_linear", provider=projection, dtype="bfloat16", preset="1b", T=1, batch=1,
                 N=n, K=k, per_step=per_step, copies=copies, ms=t["s"] * 1e3,
                 ms_per_step=t["s"] * 1e3 * per_step, ms_launch=t["s_launch"] and t["s_launch"] * 1e3,
                 bytes=n * k * dt.itemsize + (n + k) * dt.itemsize)
    benchmark.extra_info.update(row)
