"""Benchmarks of the ToL gather-add against torch eager, torch.compile and the dense SwiGLU FFN it replaces.

    pytest bench/bench_tol_gather_add.py                 # CPU by default, or the GPU if one is visible
    pytest bench/bench_tol_gather_add.py --full          # add the large prefill sizes

Providers (one row each per dtype, preset and token count T):
    eager    hidden + table[ids, layer]           (what a user writes; allocates the gathered rows)
    eager_select  hidden + table.select(1, layer).index_select(0, ids): the same in its fastest torch
             form (on CPU, advanced indexing of the strided layer view is ~1000x slower at small T).
             "x eager" compares with the faster of the two.
    compile  torch.compile of the eager line
    cpu / cuda / triton   memllm_kernels.tol_gather_add(..., backend=...), functional, ids validated
             on CPU (free there) and not on the GPU (check_ids=False: no device sync, as in a model's
             decode loop, which validates a step's ids once for all layers)
    cpu_ / cuda_ / triton_   the in-place tol_gather_add_ (the model's path: no output allocation)
    add      torch.add of the same bytes (3 x T x d): the memory-bandwidth ceiling for this op
    ffn      the dense SwiGLU FFN of the same preset, W_down(silu(W_gate x) * W_up x), K from the preset, W_gate
             and W_up stacked in one matmul as in the model
    copy     (GPU) a 2 GiB device-to-device copy: the device-copy bandwidth ceiling
    matmul   a large square matmul in each dtype (4096 on a GPU, 2048 on a CPU): the FLOP/s ceiling the
             dense FFN is measured against ("% matmul")
Every row also records the dense FFN's FLOPs and bytes at its shape (ffn_flops, ffn_bytes): what a ToL
lookup avoids.
Tables are token-major [V, 24, d] (the paper presets' 24 layers), read at a middle layer, ids uniform
over V: on the GPU the full 128,256-token vocabulary (12.6 GB at d=2048 in bf16), on the CPU V=8192.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import memllm_kernels as mk
from conftest import bench_device, record, timed

PRESETS = {"250m": (960, 2560), "750m": (1600, 4272), "1b": (2048, 5464)}  # d, K (FFN width): the paper's table
LAYERS, LAYER = 24, 11
_TABLES: dict = {}


def pytest_generate_tests(metafunc):
    device = bench_device(metafunc.config)
    full = metafunc.config.getoption("--full")
    if device == "cuda":
        tokens = [1, 8, 64, 512, 4096, 16384]
        dtypes = ["bfloat16", "float16", "float32"] if full else ["bfloat16"]
        providers = ["eager", "eager_select", "compile", "cuda", "cuda_", "triton", "triton_", "add", "ffn"]
    else:
        tokens = [1, 8, 64, 512, 4096] + ([16384] if full else [])
        dtypes = ["bfloat16", "float32"] + (["float16"] if full else [])
        providers = ["eager", "eager_select", "compile", "cpu", "cpu_", "add", "ffn"]
    if "matmul_dtype" in metafunc.fixturenames:
        metafunc.parametrize("matmul_dtype", dtypes)
    if "provider" in metafunc.fixturenames:
        cases = []
        for dtype in dtypes:
            for preset in PRESETS:
                for T in tokens:
                    for p in providers:
                        # The dense FFN at T=4096 on 2 CPU cores takes seconds; its targets are at decode
                        # and T=512. torch.compile recompiles per shape: decode and one prefill size suffice.
                        if device == "cpu" and p == "ffn" and T > 512 and not full:
                            continue
                        if p == "compile" and T not in (1, 512):
                            continue
                        cases.append(pytest.param(device, dtype, preset, T, p, id=f"{p}-{dtype}-{preset}-T{T}"))
        metafunc.parametrize("device,dtype,preset,T,provider", cases)


@pytest.fixture(autouse=True, scope="module")
def _free_tables():
    yield
    _TABLES.clear()  # later benchmarks measure memory: do not leave a table resident


def _table(device, dtype, d):
    vocab = 128_256 if device == "cuda" else 8192
    key = (device, dtype, d)
    if key not in _TABLES:
        _TABLES.clear()  # one table resident at a time (12.6 GB on the GPU)
        if device == "cuda":
            torch.cuda.empty_cache()
        _TABLES[key] = torch.randn(vocab, LAYERS, d, device=device, dtype=getattr(torch, dtype))
    return _TABLES[key]


# Inputs rotate over enough sets that one pass touches >= 256 MB, several times a GPU's L2 (60 MB on
# H200) or a CPU's last-level cache: replaying one small set measured the cache (6.5 TB/s "bandwidth"
# at T=4096, d=960 on an H200 whose copy bandwidth is 4.2 TB/s).
ROTATE_BYTES = 256 << 20


def _sets(set_bytes: int) -> int:
    return max(1, min(32, -(-ROTATE_BYTES // max(set_bytes, 1))))


def _rotating(make, set_bytes):
    """Builds _sets(set_bytes) input sets with make() and returns a function giving the next one."""
    sets = [make() for _ in range(_sets(set_bytes))]
    it = itertools.cycle(sets)
    return sets, lambda: next(it)


def test_tol_gather_add(benchmark, device, dtype, preset, T, provider):
    d, K = PRESETS[preset]
    dt = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=dt).element_size()
    bytes_moved = 3 * T * d * itemsize  # read hidden, read a table row, write out
    flops = None
    ffn_flops, ffn_bytes = 6 * T * d * K, 3 * d * K * itemsize + 2 * T * d * itemsize
    if provider == "ffn":
        def make():
            return (torch.randn(T, d, device=device, dtype=dt),
                    torch.randn(2 * K, d, device=device, dtype=dt) / d**0.5,
                    torch.randn(d, K, device=device, dtype=dt) / K**0.5)

        bytes_moved, flops = ffn_bytes, ffn_flops  # weights + activations in and out; 3 matmuls of T x d x K
        sets, nxt = _rotating(make, bytes_moved)

        def fn():
            x, w_gate_up, wd = nxt()
            gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, wd)
    elif provider == "add":
        sets, nxt = _rotating(lambda: [torch.randn(T, d, device=device, dtype=dt) for _ in range(3)], bytes_moved)

        def fn():
            a, b, c = nxt()
            return torch.add(a, b, out=c)
    else:
        table = _table(device, dtype, d)
        sets, nxt = _rotating(lambda: (torch.randn(T, d, device=device, dtype=dt),
                                       torch.randint(0, table.shape[0], (T,), device=device)), bytes_moved)
        if provider == "eager":
            def fn():
                hidden, ids = nxt()
                return hidden + table[ids, LAYER]
        elif provider == "eager_select":
            def fn():
                hidden, ids = nxt()
                return hidden + table.select(1, LAYER).index_select(0, ids)
        elif provider == "compile":
            torch._dynamo.reset()
            compiled = torch.compile(lambda h, i: h + table[i, LAYER])

            def fn():
                return compiled(*nxt())
        else:
            backend, inplace = provider.rstrip("_"), provider.endswith("_")
            reason = mk.backend_unavailable_reason(backend, device)
            if reason:
                pytest.skip(f"backend {backend} unavailable: {reason}")
            check = device == "cpu"
            hidden, ids = sets[0]
            torch.testing.assert_close(mk.tol_gather_add(hidden, ids, table, LAYER, backend=backend),
                                       hidden + table[ids, LAYER], rtol=0, atol=0)
            op = mk.tol_gather_add_ if inplace else mk.tol_gather_add

            def fn():
                hidden, ids = nxt()
                return op(hidden, ids, table, LAYER, backend=backend, check_ids=check)
    # A GPU round replays a graph of calls captured once: it must hold every input set, or the replays read
    # the captured few again (from L2, for a launch-bound provider making few calls per graph).
    t = timed(benchmark, fn, device, min_inner=len(sets))
    sec = t["s"]
    row = record(op="tol_gather_add", provider=provider, dtype=dtype, preset=preset, d=d, K=K, T=T,
                 ms=sec * 1e3, ms_launch=t["s_launch"] and t["s_launch"] * 1e3, bytes=bytes_moved, flops=flops,
                 ffn_flops=ffn_flops, ffn_bytes=ffn_bytes, input_sets=_sets(bytes_moved),
                 **({} if provider in ("add", "ffn") else dict(vocab=_table(device, dtype, d).shape[0], layer=LAYER)))
    if flops:
        row["tflops"] = flops / sec / 1e12
    benchmark.extra_info.update(row)


def test_copy_bandwidth(benchmark, request):
    """Device-copy ceiling on the GPU: a 2 GiB copy, bytes read plus bytes written."""
    if bench_device(request.config) != "cuda":
        pytest.skip("the device-copy ceiling is measured on a GPU only")
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    # Eager launch timing: a copy captured in a CUDA graph becomes a memcpy node that ran on the copy
    # engines at 2.7 TB/s on an H200, against 4.2 TB/s for the copy kernel an eager copy_ launches.
    sec = timed(benchmark, lambda: dst.copy_(src), "cuda")["s_launch"]
    nbytes = 2 * src.numel() * src.element_size()
    row = record(op="tol_gather_add", provider="copy", dtype="bfloat16", preset="-", d=0, K=0, T=0, ms=sec * 1e3,
                 bytes=nbytes, gbps_copy=nbytes / sec / 1e9)
    benchmark.extra_info.update(row)


def test_matmul_flops(benchmark, request, matmul_dtype):
    """FLOP/s ceiling in each dtype: one large square matmul (4096 on a GPU, 2048 on a CPU)."""
    device = bench_device(request.config)
    n = 4096 if device == "cuda" else 2048
    dt = getattr(torch, matmul_dtype)
    a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dt)
    sec = timed(benchmark, lambda: torch.mm(a, b, out=out), device)["s"]
    row = record(op="tol_gather_add", provider="matmul", dtype=matmul_dtype, preset="-", d=n, K=n, T=n,
                 ms=sec * 1e3, flops=2 * n**3, tflops_matmul=2 * n**3 / sec / 1e12)
    benchmark.extra_info.update(row)
