"""End-to-end prefill and decode of the reference model: dense vs MemoryLLM vs Flex-3 with ToLs on the device.

    pytest bench/bench_e2e.py              # tiny shapes on CPU (the GPU's 1b shapes when a GPU is visible)

Models have random weights (speed does not depend on them) and the ToL table is a random [V, L, d]
tensor of the right shape swapped in with swap_ffn_for_tol: precomputing the 1b table (128,256 x 24 FFN
evaluations) would only cost time. Rows:
    op e2e_prefill: one forward over a batch-1 prompt of T tokens through the KV cache, tokens/s = T / time
    op e2e_decode:  one decode step of a batch of B sequences at position T, tokens/s = B / time
    providers: dense, memoryllm (ToLs on the device), flex3 (FFN-C dense + ToLs for FFN-M)
Memory: the bytes of weights and table, and peak device memory (GPU) or process RSS (CPU) after the run.
"""

from __future__ import annotations

import resource

import pytest
import torch

from conftest import bench_device, record, timed
from memllm_kernels.model import Transformer, get_preset, swap_ffn_for_tol

KINDS = ("dense", "memoryllm", "flex3")


def pytest_generate_tests(metafunc):
    if "kind" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    if device == "cuda":
        size, dtype, prefill, decode = "1b", "bfloat16", [512, 2048], [1, 8]
    else:
        size, dtype, prefill, decode = "tiny", "float32", [256], [1, 8]
    cases = [pytest.param(device, size, dtype, kind, "prefill", T, 1, id=f"prefill-{size}-{kind}-T{T}")
             for kind in KINDS for T in prefill]
    cases += [pytest.param(device, size, dtype, kind, "decode", 128, B, id=f"decode-{size}-{kind}-B{B}")
              for kind in KINDS for B in decode]
    metafunc.parametrize("device,size,dtype,kind,phase,T,B", cases)


_MODELS: dict = {}


def build(device: str, size: str, dtype: str, kind: str) -> Transformer:
    """A random model of preset `<size>-<kind>` in `dtype` on `device`, memory FFNs swapped for a random ToL."""
    key = (device, size, dtype, kind)
    if key not in _MODELS:
        _MODELS.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        cfg = get_preset(f"{size}-{kind}")
        dt = getattr(torch, dtype)
        with torch.device(device):
            model = Transformer(cfg).to(dt).eval()
            if cfg.has_memory:
                swap_ffn_for_tol(model, torch.randn(cfg.vocab_size, cfg.n_layer, cfg.d_model, dtype=dt))
        _MODELS[key] = model
    return _MODELS[key]


def model_bytes(model: Transformer) -> dict:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    table = 0
    mems = model.memory_modules()
    if mems and hasattr(mems[0], "store"):
        t = mems[0].store.table
        table = t.numel() * t.element_size()
    return {"weight_bytes": weights, "table_bytes": table}


@torch.inference_mode()
def test_e2e(benchmark, device, size, dtype, kind, phase, T, B):
    model = build(device, size, dtype, kind)
    vocab = model.config.vocab_size
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if phase == "prefill":
        model.setup_caches(B, T)
        ids = torch.randint(0, vocab, (B, T), device=device)
        pos = torch.arange(T, device=device)

        def fn():
            return model(ids, input_pos=pos)
        tokens = B * T
    else:
        model.setup_caches(B, T + 1)
        model(torch.randint(0, vocab, (B, T), device=device), input_pos=torch.arange(T, device=device))
        nxt = torch.randint(0, vocab, (B, 1), device=device)
        pos = torch.tensor([T], device=device)

        def fn():  # one decode step at position T (rewriting the same cache slot each time)
            return model(nxt, input_pos=pos)
        tokens = B
    t = timed(benchmark, fn, device, graph=False)
    model.clear_caches()
    mem = (torch.cuda.max_memory_allocated() if device == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row = record(op=f"e2e_{phase}", provider=kind, dtype=dtype, preset=size, T=T, batch=B, ms=t["s"] * 1e3,
                 tokens_per_s=tokens / t["s"], peak_memory_bytes=mem,
                 peak_memory_kind="device max_memory_allocated" if device == "cuda" else "process max RSS",
                 **model_bytes(model))
    benchmark.extra_info.update(row)
