"""Reference models for the end-to-end benchmarks (bench_e2e.py, bench_offload.py), random weights, and the
shapes of a decode step's projections (bench_e2e.py's decode_linear).

Providers (where a model's memory-FFN rows come from):
    dense            the dense model (SwiGLU FFNs on the residual stream)
    memoryllm        MemoryLLM, ToL table in device memory (swap_ffn_for_tol)
    memoryllm-host   MemoryLLM, ToL table in the host tier (page-locked when a GPU is present) + a device
                     row cache of 5% of the vocabulary (hot+lru), through the offload engine; the token
                     embedding in host memory too (offload_embedding: 0.53 GB less device memory at 1b)
    memoryllm-host-devlru  the same with the cache's LRU bookkeeping on the device (OffloadEngine(bookkeeping=
                     'device'): each step's tol_cache_admit runs after its transfer, inside a DecodeGraph's graph)
    memoryllm-disk   the same with the table read in place from a safetensors file (pages dropped first),
                     written once into table_dir() and reused by later runs (12.6 GB at 1b: delete it after)
    flex3            Flex-MemoryLLM (beta = 3): FFN-C dense, FFN-M as a ToL table in device memory
Speed does not depend on the weights; precomputing a 1b table (128,256 x 24 FFN evaluations) would only
cost time, so tables are random-looking (one random 512-token chunk repeated).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import memllm_kernels as mk

PROVIDERS = ("dense", "memoryllm", "memoryllm-host", "memoryllm-host-devlru", "memoryllm-disk", "flex3")
CACHE_FRACTION = 0.05  # device cache of the host/disk providers, in rows of the vocabulary


def table_dir() -> Path:
    """Where the disk provider's table files live: $MEMLLM_BENCH_TMP, default <tmp>/memllm-bench. Shared by
    benchmark runs, so a 1b table (12.6 GB, tens of seconds to write) is written once."""
    d = Path(os.environ.get("MEMLLM_BENCH_TMP") or Path(tempfile.gettempdir()) / "memllm-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def fill_table(shape, dtype, device) -> torch.Tensor:
    """A [V, L, d] table without a multi-minute randn over 3e9 elements: one random chunk repeated."""
    t = torch.empty(shape, dtype=dtype, device=device)
    chunk = torch.randn(min(shape[0], 512), *shape[1:], device=device).to(dtype)
    for i in range(0, shape[0], chunk.shape[0]):
        t[i:i + chunk.shape[0]].copy_(chunk[:min(chunk.shape[0], shape[0] - i)])
    return t


def build_model(device: str, size: str, dtype: str, provider: str, token_counts: np.ndarray | None = None,
                cache_rows: int | None = None):
    """(model, engine or None) for preset `<size>-<kind>` in `dtype` on `device`; see the module docstring.

    token_counts: [V] corpus counts for the host/disk providers' hot set (None: the cache starts empty
    and is filled by its LRU tail alone). cache_rows: their device cache (default CACHE_FRACTION of V).
    """
    from memllm_kernels.model import Transformer, get_preset, swap_ffn_for_tol
    from memllm_kernels.model.tol import offload_embedding, swap_ffn_for_engine, write_tol_file
    from memllm_kernels.offload import DiskTable, HostTable, OffloadEngine

    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")
    kind = provider.split("-")[0]
    cfg = get_preset(f"{size}-{kind}")
    dt = getattr(torch, dtype)
    with torch.device(device):
        model = Transformer(cfg).to(dt).eval()
    engine = None
    if cfg.has_memory:
        shape = (cfg.vocab_size, cfg.n_layer, cfg.d_model)
        if provider in ("memoryllm", "flex3"):
            swap_ffn_for_tol(model, fill_table(shape, dt, device))
        else:
            if provider.startswith("memoryllm-host"):
                source = HostTable(mk.tol_host_alloc(shape, dt))
                chunk = fill_table((min(shape[0], 512),) + shape[1:], dt, "cpu")
                for i in range(0, shape[0], chunk.shape[0]):
                    source.table[i:i + chunk.shape[0]].copy_(chunk[:min(chunk.shape[0], shape[0] - i)])
            else:
                path = table_dir() / f"tol-{size}-{dtype}.safetensors"
                if not path.is_file():
                    chunk = fill_table((min(shape[0], 512),) + shape[1:], dt, "cpu")
                    parts = (chunk[:min(chunk.shape[0], shape[0] - i)] for i in range(0, shape[0], chunk.shape[0]))
                    write_tol_file(path, parts, shape, dt, {"format": "memllm-tol", "config": "{}"})
                source = DiskTable(path)
                source.drop_pages()  # start cold: rows come from storage (or whatever the device caches)
            rows = max(1, int(cfg.vocab_size * CACHE_FRACTION)) if cache_rows is None else cache_rows
            engine = OffloadEngine(source, device=device, cache_rows=rows, policy="hot+lru", token_counts=token_counts,
                                   bookkeeping="device" if provider.endswith("-devlru") else "host")
            swap_ffn_for_engine(model, engine)
            offload_embedding(model)
    if device == "cuda":
        torch.cuda.empty_cache()
    return model, engine


def decode_step(model, prompt: torch.Tensor, tokens: torch.Tensor, graph: bool = False,
                compile: bool | str = False):
    """A function that runs one decode step per call: the next of `tokens` [N, B, 1] (cycled) at position
    T = prompt.shape[1], rewriting the same KV-cache slot each time, after prefilling `prompt` [B, T].
    graph: replay the step from a DecodeGraph (CUDA) instead of launching it eagerly. compile: the step
    compiled by torch.compile (memllm_kernels.model.compile_decode; inside the graph where graph is set); a
    string is torch.compile's mode."""
    from memllm_kernels.model import DecodeGraph, compile_decode

    B, T = prompt.shape
    if compile:
        # Every provider's model compiles the same code object (Transformer.forward): without a reset, one
        # process of benchmarks passes dynamo's limit of 8 compiled variants per code object.
        torch._dynamo.reset()
    model.setup_caches(B, T + 2)  # slot T + 1: a DecodeGraph's scratch slot
    model(prompt, input_pos=torch.arange(T, device=prompt.device))
    it = itertools.cycle(range(tokens.shape[0]))
    if graph:
        step = DecodeGraph(model, B, compile=compile)
        return lambda: step(tokens[next(it)], T)
    pos = torch.tensor([T], device=prompt.device)
    fwd = compile_decode(model, compile if isinstance(compile, str) else None) if compile else model
    return lambda: fwd(tokens[next(it)], input_pos=pos, check=False)  # no host sync per step, as generate()


def attention_kind(model, device: str) -> str:
    """How the model's one-token decode steps attend on `device`: 'memllm' (memllm::decode_attention) or 'sdpa'."""
    return "sdpa" if model.decode_attention_backend(torch.device(device)) is None else "memllm"


_RESIDENT: dict = {}


def resident_model(device: str, size: str, dtype: str, provider: str, token_counts: np.ndarray | None = None,
                   cache_rows: int | None = None, tag: str = ""):
    """build_model, kept while consecutive benchmarks ask for the same one: one model resident at a time
    (a 1b model and its 12.6 GB table fill much of a GPU). `tag` tells apart builds with other counts."""
    key = (device, size, dtype, provider, cache_rows, tag)
    if key not in _RESIDENT:
        free_models()
        _RESIDENT[key] = build_model(device, size, dtype, provider, token_counts, cache_rows)
    return _RESIDENT[key]


def free_models() -> None:
    for _, engine in _RESIDENT.values():
        if engine is not None:
            engine.close()
    _RESIDENT.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_bytes(model, engine) -> dict:
    """Bytes of the weights (and of those a decode step reads), of the ToL table in device memory (or of the
    engine's device cache), and the engine's statistics where there is one."""
    from memllm_kernels.model import HostEmbedding

    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # on the device
    emb = model.tok_embeddings.weight
    host_emb = isinstance(model.tok_embeddings, HostEmbedding)
    # Bytes of weights a decode step reads per token: all but an untied embedding (one row of it is read).
    read = weights - (0 if model.config.tie_embeddings or host_emb else emb.numel() * emb.element_size())
    out = {"weight_bytes": weights, "weight_bytes_read": read, "table_bytes": 0,
           "embedding": "host" if host_emb else "device"}
    if engine is not None:
        s = engine.stats()
        out["table_bytes"] = engine.cache.numel() * engine.cache.element_size()
        out.update(hit_rate=s["hit_rate"], cache_rows=s["cache_rows"], pinned=s["pinned"], miss_path=s["miss_path"],
                   bytes_h2d=s["bytes_h2d"], host_waits=s["host_waits"])
    elif model.config.has_memory:
        tab = model.memory_modules()[0].store.table
        out["table_bytes"] = tab.numel() * tab.element_size()
    return out


# The matmuls of a batch-1 decode step at the 1b preset, as (name, weight [N, K] from the config, per step).
# w_gate is one half of w_gate_up: the FFN before its gate and up were stacked read two of these.
PROJECTIONS = ("wqkv", "wo", "w_gate_up", "w_gate", "w_down", "head")
ROTATE_BYTES = 256e6  # weights cycled per timed run: 5x an H200's 50 MB L2, so each call reads HBM, as a layer does


def projection_shape(cfg, name: str) -> tuple[int, int, int]:
    """(N, K, calls per decode step) of projection `name`: y [1, N] = x [1, K] @ W[N, K]^T."""
    d, k, kv = cfg.d_model, cfg.ffn_hidden, cfg.n_kv_head * cfg.head_dim
    return {"wqkv": (d + 2 * kv, d, cfg.n_layer), "wo": (d, d, cfg.n_layer),
            "w_gate_up": (2 * k, d, cfg.n_layer), "w_gate": (k, d, 0), "w_down": (d, k, cfg.n_layer),
            "head": (cfg.vocab_size, d, 1)}[name]
