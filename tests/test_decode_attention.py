"""memllm::decode_attention (one decode step's RoPE, KV-cache append and attention) against its reference, and
the model's decode step through it against the SDPA step.

Tolerances, with reasons: the output is a softmax-weighted sum accumulated in float32 in another order than the
reference's einsum, then rounded to the dtype: float32 within 1e-5, float64 1e-12, 16-bit within the dtype's
rounding (2 ulp). The appended key is rotated in float32 and rounded to the cache's dtype: within 2 ulps of
the rotation's terms |k1 cos| + |k2 sin| (a GPU's fused multiply-add, and Triton's CPU interpreter truncating
to bfloat16 instead of rounding, move the last bits: rotation_size); the appended value is a copy, bit-exact;
every other cache slot is untouched.
"""

from __future__ import annotations

import pytest
import torch

import memllm_kernels as mk
from memllm_kernels import reference
from memllm_kernels.model import ModelConfig, Transformer, generate

from conftest import BACKEND_DEVICES

# The kernel on each device it runs on (checked against the reference), and every backend (the reference too)
# where the check is independent of the reference: SDPA, bad input, the model.
KERNELS = [p for p in BACKEND_DEVICES if p.values[0] == "triton"]
BACKENDS = KERNELS + [pytest.param("reference", "cpu", id="reference")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
ULP = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# (B, n_head, n_kv_head, head_dim, cache slots, pos): MHA at the 1b head size, GQA, head_dim/2 not a power of
# two (6, 10), the first and the last slot, a cache longer than a key block, one row, no rows, split keys.
SHAPES = [(1, 4, 4, 64, 130, 128), (3, 8, 2, 6, 300, 299), (2, 2, 1, 10, 5, 0), (1, 1, 1, 2, 1, 0),
          (2, 4, 2, 16, 70, 33), (0, 2, 2, 8, 4, 1),
          # from 1024 slots the keys are split among programs (2 and 4 here): all splits busy, most empty
          (1, 4, 2, 16, 1100, 1099), (2, 2, 2, 8, 2050, 1500), (1, 2, 1, 8, 2050, 5)]


def make_case(B, H, Hkv, hd, S, pos, dtype, device, pad=None, rope_rows=None):
    rope_rows = rope_rows or max(400, S)
    qkv = torch.randn(B, (H + 2 * Hkv) * hd, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, hd, dtype=dtype, device=device)
    v = torch.randn_like(k)
    cos, sin = torch.randn(rope_rows, hd // 2, device=device), torch.randn(rope_rows, hd // 2, device=device)
    pad = torch.randint(0, pos + 1, (B,), device=device) if pad is None else torch.tensor(pad, device=device)
    return qkv, k, v, cos, sin, torch.tensor([pos], device=device), pad


def rotation_size(qkv, cache_shape, cos, sin, pad, p):
    """|k1 cos| + |k2 sin| (and its pair's) of each element of the appended key [B, Hkv, hd], in float64: the
    bound of a rotated element's rounding. A GPU contracts k1 cos - k2 sin into a multiply-add, which differs
    from the reference's two roundings by an ulp of the products, not of their difference (under cancellation
    that is many ulps of the result)."""
    B, Hkv, _, hd = cache_shape
    H = qkv.shape[1] // hd - 2 * Hkv
    k = qkv.view(B, H + 2 * Hkv, hd)[:, H:H + Hkv].double().abs()
    rp = (p - pad.clamp(min=0)).clamp(min=0)
    c, s = cos[rp].double().abs()[:, None], sin[rp].double().abs()[:, None]
    k1, k2 = k[..., :hd // 2], k[..., hd // 2:]
    return torch.cat([k1 * c + k2 * s, k1 * s + k2 * c], dim=-1) + 1e-30


def check_against_reference(args, H, backend):
    qkv, k, v, cos, sin, pos, pad = args
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    y = mk.decode_attention(qkv, k1, v1, cos, sin, pos, pad, H, backend=backend)
    want = reference.decode_attention(qkv, k2, v2, cos, sin, pos, pad, H)
    assert y.shape == want.shape == (qkv.shape[0], H * k.shape[-1]) and y.dtype == qkv.dtype
    torch.testing.assert_close(y, want, **TOL[qkv.dtype])
    p = int(pos)
    assert torch.equal(v1, v2)
    others = torch.ones(k.shape[2], dtype=torch.bool)
    others[p] = False
    assert torch.equal(k1[:, :, others], k[:, :, others])  # only the token's slot is written
    slot, ref = k1[:, :, p].double(), k2[:, :, p].double()
    assert bool(((slot - ref).abs() <= rotation_size(qkv, k.shape, cos, sin, pad, p) * ULP[qkv.dtype] * 2).all())
    return y


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-kv{}-hd{}-S{}-pos{}".format(*s))
def test_matches_reference(backend, device, dtype, shape):
    B, H, Hkv, hd, S, pos = shape
    check_against_reference(make_case(B, H, Hkv, hd, S, pos, dtype, device), H, backend)


TWO_GPUS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs a second GPU: tensors on a device that is not the current one")


@pytest.mark.requires_triton_gpu
@TWO_GPUS
def test_on_a_gpu_that_is_not_current():
    """Triton launches on the current device: the op must switch to its tensors' (cuda:1 here)."""
    assert torch.cuda.current_device() == 0
    check_against_reference(make_case(2, 4, 2, 16, 70, 33, torch.float32, "cuda:1"), 4, "triton")


@pytest.mark.parametrize("backend,device", KERNELS)
def test_padding(backend, device):
    """Rows with no padding, some, all slots before the token, and more padding than the token's slot (a padding
    query: it attends to its own slot only, as the model's SDPA mask lets it)."""
    args = make_case(4, 2, 1, 8, 12, 6, torch.float32, device, pad=[0, 3, 6, 9])
    y = check_against_reference(args, 2, backend)
    qkv, k, v, cos, sin, pos, pad = args
    assert torch.equal(y[3, :8], qkv[3, 24:32])  # head 0 of row 3 sees only its own value (heads q, q, k, v)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_float32_cache_for_bfloat16_qkv(backend, device):
    """A float32 model under bfloat16 autocast: bfloat16 projections, float32 caches."""
    qkv, k, v, cos, sin, pos, pad = make_case(2, 4, 2, 8, 9, 4, torch.bfloat16, device)
    k, v = k.float(), v.float()
    y = mk.decode_attention(qkv, k, v, cos, sin, pos, pad, 4, backend=backend)
    want = reference.decode_attention(qkv, k.clone(), v.clone(), cos, sin, pos, pad, 4)
    assert y.dtype == torch.bfloat16 and k.dtype == torch.float32
    torch.testing.assert_close(y, want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("qkv_dtype,cache_dtype", [(torch.float32, torch.float16), (torch.float64, torch.bfloat16),
                                                   (torch.float64, torch.float32)], ids=str)
def test_cache_narrower_than_qkv(backend, device, qkv_dtype, cache_dtype):
    """The kernel attended to the token's own key and value at qkv's precision, where the spec reads them back
    from the cache (float32 qkv over a float16 cache: off by 4e-5 at slot 0, where y is the cached v); and the
    interpreter cast float64 straight to bfloat16 (an integer cast: garbage in the cache)."""
    for pos in (0, 6):
        qkv, k, v, cos, sin, p, pad = make_case(2, 4, 2, 8, 9, pos, qkv_dtype, device, pad=[0, 0])
        k, v = k.to(cache_dtype), v.to(cache_dtype)
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        y = mk.decode_attention(qkv, k1, v1, cos, sin, p, pad, 4, backend=backend)
        want = reference.decode_attention(qkv, k2, v2, cos, sin, p, pad, 4)
        tol = TOL[torch.bfloat16] if cache_dtype == torch.bfloat16 else TOL[torch.float32]  # (interpreter: truncates)
        torch.testing.assert_close(y, want, **tol)
        torch.testing.assert_close(k1, k2, **TOL[cache_dtype])
        exact = cache_dtype != torch.bfloat16 or device == "cuda"  # the interpreter truncates into bfloat16
        torch.testing.assert_close(v1, v2, **(dict(rtol=0, atol=0) if exact else TOL[cache_dtype]))
        if pos == 0:  # one key: y is the cached value
            torch.testing.assert_close(y.view(2, 4, 8), v1[:, :, 0].repeat_interleave(2, 1).to(qkv_dtype),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_head_offsets_beyond_int32(backend, device):
    """Caches whose key/value heads are their outer dim ([Hkv, B, S, hd] storage seen as [B, Hkv, S, hd]): a head
    stride of 2^30 (an int32 argument) times head 2 is 2^31, which the kernel computed in int32 (a segfault under
    the interpreter, a read and write far outside the cache on a GPU). torch.empty maps the 2 x 4.3 GB lazily;
    only the slots used are ever written, so this stays cheap."""
    B, H, Hkv, S, hd, hs = 1, 6, 3, 4, 8, 2**30
    assert (Hkv - 1) * hs >= 2**31 > hs

    def cache():
        c = torch.empty((Hkv - 1) * hs + S * hd, dtype=torch.float16, device=device).as_strided(
            (B, Hkv, S, hd), (hd, hs, hd, 1))
        for g in range(Hkv):
            c[:, g] = torch.randn(B, S, hd, device=device).half()
        return c

    qkv, _, _, cos, sin, pos, pad = make_case(B, H, Hkv, hd, S, 2, torch.float16, device, pad=[0])
    k, v = cache(), cache()
    k2, v2 = k.contiguous(), v.contiguous()
    y = mk.decode_attention(qkv, k, v, cos, sin, pos, pad, H, backend=backend)
    want = reference.decode_attention(qkv, k2, v2, cos, sin, pos, pad, H)
    torch.testing.assert_close(y, want, **TOL[torch.float16])
    torch.testing.assert_close(k, k2, **TOL[torch.float16])  # the rotated key: to the rounding of its terms
    assert torch.equal(v, v2)
    del k, v


@pytest.mark.parametrize("backend,device", KERNELS)
def test_strided_qkv_rows(backend, device):
    """qkv as the rows of a wider tensor (a slice), as a projection's output may be."""
    qkv, k, v, cos, sin, pos, pad = make_case(3, 2, 2, 8, 9, 4, torch.float32, device)
    wide = torch.randn(3, qkv.shape[1] + 5, device=device)
    wide[:, 5:] = qkv
    y = check_against_reference((wide[:, 5:], k, v, cos, sin, pos, pad), 2, backend)
    torch.testing.assert_close(y, reference.decode_attention(qkv, k.clone(), v.clone(), cos, sin, pos, pad, 2))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_against_sdpa(backend, device):
    """The spec itself: the same numbers as RoPE, a cache write and torch's SDPA over the cache with a mask."""
    B, H, Hkv, hd, S, p = 2, 4, 2, 8, 10, 7
    qkv, k, v, cos, sin, pos, pad = make_case(B, H, Hkv, hd, S, p, torch.float64, device, pad=[0, 2])
    y = mk.decode_attention(qkv, k.clone(), v.clone(), cos, sin, pos, pad, H, backend=backend)
    x = qkv.view(B, H + 2 * Hkv, hd)
    rp = p - pad
    c, s = cos[rp].double()[:, None], sin[rp].double()[:, None]
    x1, x2 = x[:, :H + Hkv].chunk(2, -1)
    qk = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    k[:, :, p], v[:, :, p] = qk[:, H:], x[:, H + Hkv:]
    slots = torch.arange(S, device=device)
    mask = (slots[None] >= pad[:, None]) & (slots[None] <= p)
    want = torch.nn.functional.scaled_dot_product_attention(
        qk[:, :H, None], k, v, attn_mask=mask[:, None, None], enable_gqa=True)
    torch.testing.assert_close(y, want.reshape(B, H * hd), rtol=1e-12, atol=1e-12)


# ---- bad input: clear exceptions, and a kernel that never writes outside the cache ----
def _good(device="cpu"):
    return make_case(2, 4, 2, 8, 10, 5, torch.float32, device, pad=[0, 0])


BAD = [  # (name, change to the arguments, exception, message part)
    ("pos past the cache", lambda a: a.__setitem__(5, torch.tensor([10])), IndexError, "outside the cache"),
    ("negative pos", lambda a: a.__setitem__(5, torch.tensor([-1])), IndexError, "outside the cache"),
    ("pad past the cache", lambda a: a.__setitem__(6, torch.tensor([0, 11])), IndexError, "pad must be"),
    ("position past RoPE", lambda a: a.__setitem__(3, a[3][:5]) or a.__setitem__(4, a[4][:5]), IndexError, "RoPE"),
    ("qkv int", lambda a: a.__setitem__(0, a[0].long()), TypeError, "qkv must be"),
    ("cache dtypes differ", lambda a: a.__setitem__(1, a[1].half()), TypeError, "share one float dtype"),
    ("cache int", lambda a: [a.__setitem__(i, a[i].long()) for i in (1, 2)], TypeError, "share one float dtype"),
    ("cos float64", lambda a: a.__setitem__(3, a[3].double()), TypeError, "float32 tables"),
    ("pos float", lambda a: a.__setitem__(5, a[5].float()), TypeError, "int32 or int64"),
    ("qkv width", lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, "qkv must be"),
    ("cache 3-d", lambda a: a.__setitem__(1, a[1][0]), ValueError, "k_cache and v_cache"),
    ("odd head_dim", lambda a: [a.__setitem__(i, a[i][..., :7]) for i in (1, 2)], ValueError, "even head_dim"),
    ("pad shape", lambda a: a.__setitem__(6, a[6][:1]), ValueError, r"pad be \[B\]"),
    ("rope width", lambda a: a.__setitem__(3, a[3][:, :3]), ValueError, "cos and sin"),
    ("strided cache", lambda a: [a.__setitem__(i, a[i].transpose(2, 3).contiguous().transpose(2, 3)) for i in (1, 2)],
     ValueError, "contiguous"),
    # written in place: the kernel's batch rows raced on one slot of an expanded cache, and the backends
    # disagreed on k_cache is v_cache
    ("expanded caches", lambda a: [a.__setitem__(i, a[i][:1].expand(2, -1, -1, -1)) for i in (1, 2)], ValueError,
     "k_cache has elements that share memory"),
    ("k_cache is v_cache", lambda a: a.__setitem__(2, a[1]), ValueError, "k_cache shares memory with v_cache"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,change,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(backend, device, name, change, exc, msg):
    args = list(_good("cpu")) + [4]
    change(args)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(exc, match=msg):
        mk.decode_attention(*args, backend=backend)


def test_bad_heads_and_backend():
    qkv, k, v, cos, sin, pos, pad = _good()
    with pytest.raises(ValueError, match="multiple"):
        mk.decode_attention(qkv, k, v, cos, sin, pos, pad, 3)
    with pytest.raises(ValueError, match="multiple of the caches' 0 key/value heads"):  # was a ZeroDivisionError
        mk.decode_attention(qkv, k[:, :0], v[:, :0], cos, sin, pos, pad, 4)
    with pytest.raises(ValueError, match="n_head=True"):  # a bool is no head count (True would read as 1)
        mk.decode_attention(qkv, k, v, cos, sin, pos, pad, True)
    with pytest.raises(ValueError, match="backend must be"):
        mk.decode_attention(qkv, k, v, cos, sin, pos, pad, 4, backend="cuda")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        mk.decode_attention(qkv, k, v, cos, sin, 5, pad, 4)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's 0 / 0, on purpose
@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("bad_pos", [-1, 10, 399, 5000])
def test_kernel_unchecked_bad_slot_writes_nothing(backend, device, bad_pos):
    """check=False (CUDA graphs): a slot outside the cache, or a RoPE position past the tables, reaches the
    kernel, which writes no cache slot and returns NaN instead of reading or writing out of bounds."""
    qkv, k, v, cos, sin, pos, pad = _good(device)
    cos, sin = cos[:300], sin[:300]
    k0, v0 = k.clone(), v.clone()
    if bad_pos == 399:  # in the cache (a long one) but past the RoPE tables
        k, v = torch.randn(2, 2, 400, 8, device=device), torch.randn(2, 2, 400, 8, device=device)
        k0, v0 = k.clone(), v.clone()
    if bad_pos == 5000:  # past a cache long enough for split keys
        k, v = torch.randn(2, 2, 2048, 8, device=device), torch.randn(2, 2, 2048, 8, device=device)
        k0, v0 = k.clone(), v.clone()
    y = mk.decode_attention(qkv, k, v, cos, sin, torch.tensor([bad_pos], device=device), pad * 0, 4,
                            backend=backend, check=False)
    assert bool(y.isnan().all())
    assert torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck(backend, device):
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if device == "cuda":  # torch.compile cannot trace an interpreted kernel: AOT dispatch only on a GPU
        utils.append("test_aot_dispatch_dynamic")
    for B, H, Hkv, hd, S, pos in [(2, 4, 2, 8, 10, 5), (1, 2, 2, 6, 3, 0)]:
        qkv, k, v, cos, sin, p, pad = make_case(B, H, Hkv, hd, S, pos, torch.float32, device)
        torch.library.opcheck(torch.ops.memllm.decode_attention, (qkv, k, v, cos, sin, p, pad, H), test_utils=utils)


def test_meta_device():
    qkv = torch.empty(1, 96 * 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 32, 4096, 64, device="meta", dtype=torch.bfloat16)
    cos = torch.empty(4096, 32, device="meta")
    ints = torch.empty(1, device="meta", dtype=torch.long)
    y = torch.ops.memllm.decode_attention(qkv, k, k, cos, cos, ints, ints, 32)
    assert y.device.type == "meta" and y.shape == (1, 32 * 64) and y.dtype == torch.bfloat16
    # the wrapper's check=True read the slot from a meta tensor ('Cannot copy out of meta tensor')
    y = mk.decode_attention(qkv, k, k.clone(), cos, cos, ints, ints, 32, backend="reference")
    assert y.device.type == "meta" and y.shape == (1, 32 * 64)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_raw_op_refuses_caches_that_share_memory(backend, device):
    qkv, k, v, cos, sin, pos, pad = _good(device)
    for kc, vc, msg in ((k, k, "k_cache shares memory with v_cache"),
                        (k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1),
                         "k_cache has elements that share memory")):
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.memllm.decode_attention(qkv, kc, vc, cos, sin, pos, pad, 4)


# ---- the model's decode step: decode_attention against SDPA ----
def tiny_model(kind="memoryllm", **kw):
    cfg = ModelConfig(kind=kind, **{**dict(vocab_size=300, n_layer=2, d_model=32, n_head=4, block_size=64,
                                           name="test-tiny"), **kw})
    return Transformer(cfg).eval()


def test_decode_attention_modes():
    model = tiny_model()
    assert model.decode_attention == "auto" and model.decode_attention_backend(torch.device("cpu")) is None  # SDPA on a CPU
    model.decode_attention = "memllm"
    assert model.decode_attention_backend(torch.device("cpu")) == "auto"
    model.decode_attention = "flash"
    with pytest.raises(ValueError, match="choose one of"):
        model.setup_caches(1, 8) or model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))


@pytest.mark.parametrize("kind,kw", [("memoryllm", {}), ("dense", {}), ("memoryllm", dict(n_kv_head=2)),
                                     ("flex2", {})], ids=["memoryllm", "dense", "gqa", "flex2"])
@torch.no_grad()
def test_model_step_matches_sdpa(kind, kw):
    """A padded batch: prefill, then decode steps through decode_attention (the reference on the CPU) give the
    SDPA step's logits and leave the same KV cache."""
    model = tiny_model(kind, **kw)
    ids, pad = torch.randint(0, 300, (3, 6)), torch.tensor([0, 2, 5])
    out = {}
    for mode in ("sdpa", "memllm"):
        model.decode_attention = mode
        model.setup_caches(3, 12)
        logits = [model(ids, input_pos=torch.arange(6), pad=pad)]
        for t in range(3):
            logits.append(model(ids[:, t:t + 1], input_pos=torch.tensor([6 + t]), pad=pad))
        out[mode] = logits, [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in model.layers]
    for a, b in zip(out["sdpa"][0], out["memllm"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(out["sdpa"][1], out["memllm"][1]):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)  # later layers: inputs differ in the last bits
    assert torch.equal(out["sdpa"][1][0][1], out["memllm"][1][0][1])  # the first layer's values: copies


@pytest.mark.parametrize("mode", ["sdpa", "memllm"])
@torch.no_grad()
def test_model_step_of_an_empty_batch(mode):
    """A batch of 0 rows decodes to 0 rows of logits through either path (the op takes B = 0; the model's
    qkv.view(B, -1) raised 'cannot reshape tensor of 0 elements' before it)."""
    model = tiny_model()
    model.decode_attention = mode
    model.setup_caches(0, 8)
    logits = model(torch.zeros(0, 1, dtype=torch.long), input_pos=torch.tensor([3]))
    assert logits.shape == (0, 1, 300)


def test_rope_tables_stay_float32_under_a_cast():
    """model.to(bfloat16) casts every floating buffer; the RoPE tables are recomputed in float32 (decode_attention
    takes float32 tables only: a bfloat16 model's decode raised TypeError), equal to a float32 model's."""
    model = tiny_model().to(torch.bfloat16)
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert torch.equal(model.rope_cos, tiny_model().rope_cos) and torch.equal(model.rope_sin, tiny_model().rope_sin)
    model.decode_attention = "memllm"
    out = generate(model, [[5, 6, 7], [8]], 3)
    assert [len(t) for t in out] == [3, 3]


@pytest.mark.requires_triton_cpu
def test_model_generates_the_same_tokens_through_the_interpreted_kernel():
    model = tiny_model()
    prompts = [[5, 6, 7], [8]]
    model.decode_attention = "sdpa"
    want = generate(model, prompts, 4)
    model.decode_attention = "memllm"
    assert generate(model, prompts, 4) == want


def test_compiled_decode_matches_eager():
    """torch.compile traces the step through decode_attention without a graph break (compile_decode's
    fullgraph=True; the reference on the CPU, as also under Triton's interpreter)."""
    model = tiny_model()
    prompts = [[5, 6, 7, 9, 9], [8]]
    model.decode_attention = "sdpa"
    want = generate(model, prompts, 5)
    torch._dynamo.reset()
    model.decode_attention = "memllm"
    assert generate(model, prompts, 5, compile=True) == want


# ---- on a GPU: the kernel, CUDA graphs and torch.compile ----
@pytest.mark.requires_triton_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_1b_shape(dtype):
    check_against_reference(make_case(2, 32, 32, 64, 2050, 2049, dtype, "cuda"), 32, "triton")
    check_against_reference(make_case(1, 32, 8, 64, 130, 128, dtype, "cuda"), 32, "triton")


@pytest.mark.requires_triton_gpu
@pytest.mark.parametrize("cuda_graph,compile", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["eager", "graph", "compiled", "compiled-graph"])
def test_gpu_generate_matches_sdpa(cuda_graph, compile):
    model = tiny_model(n_kv_head=2).cuda()
    prompts = [[5, 6, 7, 9, 9], [8], [1, 2]]
    model.decode_attention = "sdpa"
    want = generate(model, prompts, 6)
    torch._dynamo.reset()
    model.decode_attention = "auto"  # the kernel, on a GPU
    assert model.decode_attention_backend(torch.device("cuda")) == "triton"
    assert generate(model, prompts, 6, cuda_graph=cuda_graph, compile=compile) == want


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("raw", [False, True], ids=["public", "raw"])
@pytest.mark.parametrize("which", ["qkv", "k_cache", "v_cache"])
def test_refuses_grad(backend, device, raw, which):
    """The op writes the caches in place and has no derivative: while grad mode is on, an input that requires grad is
    refused before anything is written, by every backend and by the raw Triton op (which wrote a cache that requires
    grad without a word, and gave y a grad_fn that failed only in backward). Under no_grad it runs."""
    if raw and backend == "reference":
        pytest.skip("the reference has no raw op")
    qkv, k, v, cos, sin, pos, pad = make_case(2, 2, 1, 8, 6, 3, torch.float32, device)
    args = dict(qkv=qkv, k_cache=k, v_cache=v)
    args[which] = args[which].clone().requires_grad_()
    before = [t.detach().clone() for t in (k, v)] if which == "qkv" else None

    def call():
        if raw:
            return torch.ops.memllm.decode_attention(args["qkv"], args["k_cache"], args["v_cache"], cos, sin, pos, pad,
                                                     2)
        return mk.decode_attention(args["qkv"], args["k_cache"], args["v_cache"], cos, sin, pos, pad, 2,
                                   backend=backend)

    with pytest.raises(RuntimeError, match=f"decode_attention: {which} requires grad, .*torch.inference_mode"):
        call()
    if before is not None:  # nothing written
        assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    with torch.no_grad():
        y = call()
    assert not y.requires_grad and torch.isfinite(y).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_jvp_with_the_caches_as_inputs(backend, device):
    """torch.func.jvp over qkv and both caches: the wrappers' overlap checks read the functorch wrappers' data
    pointers ("Cannot access data pointer of Tensor that doesn't have storage") on every backend. Now the reference
    differentiates (central differences agree) and the Triton op says it has no forward derivative."""
    qkv, k, v, cos, sin, pos, pad = make_case(2, 2, 1, 8, 6, 3, torch.float64, device)
    dq = torch.randn_like(qkv)

    def f(q, kk, vv):
        return mk.decode_attention(q, kk, vv, cos, sin, pos, pad, 2, backend=backend)

    primals, tangents = (qkv, k.clone(), v.clone()), (dq, torch.zeros_like(k), torch.zeros_like(v))
    if backend != "reference":
        with pytest.raises(NotImplementedError, match="decode_attention: forward-mode AD"):
            torch.func.jvp(f, primals, tangents)
        return
    y, dy = torch.func.jvp(f, primals, tangents)
    eps = 1e-6
    fd = (f(qkv + eps * dq, k.clone(), v.clone()) - f(qkv - eps * dq, k.clone(), v.clone())) / (2 * eps)
    assert torch.allclose(dy, fd, atol=1e-7), (dy - fd).abs().max()  # float64: O(eps^2) truncation, ~1e-10 here


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("raw", [False, True], ids=["public", "raw"])
def test_refuses_forward_mode_ad(backend, device, raw):
    """Nor has the op a forward derivative: with forward-AD dual tensors the Triton op returned y with no tangent
    (the step read as a constant, without a word; torch.func.jvp of the raw op did the same). It raises now, before
    anything is written; the reference differentiates."""
    import torch.autograd.forward_ad as fwAD

    if raw and backend == "reference":
        pytest.skip("the reference has no raw op")
    qkv, k, v, cos, sin, pos, pad = make_case(2, 2, 1, 8, 6, 3, torch.float64, device)
    before = k.clone(), v.clone()

    def call(q):
        if raw:
            return torch.ops.memllm.decode_attention(q, k, v, cos, sin, pos, pad, 2)
        return mk.decode_attention(q, k, v, cos, sin, pos, pad, 2, backend=backend)

    with fwAD.dual_level():
        if backend == "reference":
            assert fwAD.unpack_dual(call(fwAD.make_dual(qkv, torch.ones_like(qkv)))).tangent is not None
            return
        with pytest.raises(NotImplementedError, match="decode_attention: forward-mode AD .* backend 'triton'"):
            call(fwAD.make_dual(qkv, torch.ones_like(qkv)))
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    if raw:
        with pytest.raises(NotImplementedError, match="decode_attention: forward-mode AD"):
            torch.func.jvp(call, (qkv,), (torch.ones_like(qkv),))
    with torch.no_grad():
        assert torch.isfinite(call(qkv)).all()


def test_model_auto_decodes_through_sdpa_while_grad_is_on(monkeypatch):
    """decode_attention='auto' picks the kernel on a GPU, but not while grad mode is on with weights that require grad
    (the op has no autograd): the step then goes through SDPA."""
    model = tiny_model()
    monkeypatch.setattr(mk.ops, "backend_unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(mk.ops, "_triton_interpret", lambda: False)
    gpu = torch.device("cuda")
    assert model.decode_attention_backend(gpu) is None  # grad mode on, weights require grad
    with torch.no_grad():
        assert model.decode_attention_backend(gpu) == "triton"
    model.requires_grad_(False)
    assert model.decode_attention_backend(gpu) == "triton"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("raw", [False, True], ids=["public", "raw"])
def test_refuses_inference_caches_outside_inference_mode(backend, device, raw):
    """KV caches made under torch.inference_mode() may be written only inside it, as torch's own in-place ops
    enforce (the Triton kernel wrote them without a word, the reference raised torch's error): refused, nothing
    written; inside inference mode the op runs."""
    if raw and backend == "reference":
        pytest.skip("the reference has no raw op")
    qkv, k, v, cos, sin, pos, pad = make_case(2, 2, 1, 8, 6, 3, torch.float32, device)
    with torch.inference_mode():
        k, v = k.clone(), v.clone()
    before = k.clone(), v.clone()

    def call():
        if raw:
            return torch.ops.memllm.decode_attention(qkv, k, v, cos, sin, pos, pad, 2)
        return mk.decode_attention(qkv, k, v, cos, sin, pos, pad, 2, backend=backend)

    with pytest.raises(RuntimeError, match="decode_attention: k_cache is an inference tensor .* outside inference"):
        call()
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    with torch.inference_mode():
        assert torch.isfinite(call()).all()
