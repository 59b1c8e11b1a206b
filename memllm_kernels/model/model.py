"""Dense, MemoryLLM and Flex-MemoryLLM transformers in one readable file (in the style of gpt-fast).

Blocks (paper section 2.2; x0 = E[ids] is the token embedding, h the residual stream):
    dense:      h' = h + Attn(norm_a(h));                          h_next = h' + FFN(norm_f(h'))
    memoryllm:  h_next = h + Attn(norm_a(h)) + a_l * FFN_l(norm_m,l(x0))
    flex-beta:  h' = h + Attn(norm_a(h)) + a_l * FFN_M,l(norm_m,l(x0));   h_next = h' + FFN_C,l(norm_c,l(h'))
FFNs are SwiGLU, norms RMSNorm, attention is multi-head (optionally GQA) with RoPE through
F.scaled_dot_product_attention. a_l is the memory scale: alpha (paper Table 1) or 0 for a dropped layer
(paper Fig. 4), set with `Transformer.set_memory_scale`.

The memory term depends on the token id alone, so after training it can be precomputed for the whole
vocabulary (model/tol.py) and `swap_ffn_for_tol` replaces each `MemoryFFN` below by a `ToLMemory`
that adds one row of that table with the `tol_gather_add_` op. Both expose the same
`forward(h, x0, ids) -> h + memory term`, which is all a `Block` knows about them.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .config import ModelConfig

DECODE_ATTENTION = ("auto", "sdpa", "memllm")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d] -> [..., d], normalised in float32 (bf16 autocast keeps the statistics accurate):
        x * rsqrt(mean(x^2) + eps), rounded to x's dtype, times the weight. F.rms_norm is that formula (on the
        CPU the same ops, bit for bit) and one fused kernel on a GPU instead of six small ones per norm."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class _Rows:
    """Rows [lo, lo + n) of a Linear's weight as a Linear of their own: `.weight` is a view, calling it applies
    them. A plain object, not a module: the parent owns the parameter, so it is saved, moved and counted once."""

    def __init__(self, parent: nn.Linear, lo: int, n: int):
        self._parent, self._lo, self._n = parent, lo, n

    @property
    def weight(self) -> torch.Tensor:
        return self._parent.weight[self._lo:self._lo + self._n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _load_stacked(parts: tuple[str, ...], stacked: str, module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook (bound with functools.partial): a checkpoint with the separate weights `parts`
    (the layout before `stacked`, e.g. wq, wk, wv before wqkv) loads into the stacked projection, their rows
    concatenated in that order."""
    names = [f"{prefix}{p}.weight" for p in parts]
    if all(n in state_dict for n in names):
        state_dict[f"{prefix}{stacked}.weight"] = torch.cat([state_dict.pop(n) for n in names])


class FeedForward(nn.Module):
    """SwiGLU: W_down(W_up x * silu(W_gate x)), no biases. [..., d] -> [..., d] through width `hidden`.

    W_gate and W_up are stacked in one [2 * hidden, d] weight (`w_gate_up`), so both are one matmul: at batch 1
    a decode step reads them in one GEMV instead of two (as wqkv does for attention), which is the fair dense
    baseline for a ToL lookup. `w_gate` and `w_up` are views of its two halves (`.weight`, and callable)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.w_gate, self.w_up = _Rows(self.w_gate_up, 0, hidden), _Rows(self.w_gate_up, hidden, hidden)
        self.register_load_state_dict_pre_hook(partial(_load_stacked, ("w_gate", "w_up"), "w_gate_up"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class MemoryFFN(nn.Module):
    """A layer's context-free memory: scale * FFN_l(norm_m,l(x0)), added to the residual stream.

    The per-layer norm matters for convergence (paper section 2.2). `scale` is a plain float, not a
    parameter: alpha for the paper's Table 1 experiment, 0.0 to drop the layer's memory (Fig. 4).
    """

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.ffn = FeedForward(dim, hidden)
        self.scale = 1.0

    def lookup(self, x0: torch.Tensor) -> torch.Tensor:
        """The unscaled memory value FFN_l(norm_m,l(x0)): x0 [..., d] -> [..., d]. What a ToL stores."""
        return self.ffn(self.norm(x0))

    def forward(self, h: torch.Tensor, x0: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """h, x0: [B, T, d]; ids: [B, T] (unused: the FFN reads x0 = E[ids]). Returns h + scale * memory."""
        if self.scale == 0.0:
            return h  # a dropped layer costs nothing, as it would with a ToL
        m = self.lookup(x0)
        return h + m if self.scale == 1.0 else h + self.scale * m


class KVCache(nn.Module):
    """Keys and values of every position seen so far: k, v [B, H_kv, S_max, head_dim]."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """pos: [T] cache slots; k, v: [B, H_kv, T, head_dim]. Returns the whole cache (k, v)."""
        pos = pos.long()  # index_copy_ takes int64 slots only (no copy if they are)
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [seq_len, head_dim // 2] float32, angle = pos * base^(-2i/head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd]; cos, sin: [T, hd/2] or [B, T, hd/2]. Rotates (x[:hd/2], x[hd/2:]) pairs."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k and v from one projection, the three weights stacked [(H + 2 H_kv) hd, d]: one matmul instead of
        # three, so a batch-1 decode step launches one GEMV per layer for them instead of three.
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.kv_cache: KVCache | None = None
        self.register_load_state_dict_pre_hook(partial(_load_stacked, ("wq", "wk", "wv"), "wqkv"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, decode: tuple[torch.Tensor, str] | None = None) -> torch.Tensor:
        """x: [B, T, d]; cos/sin: RoPE rows for these positions; mask: [B, 1, T, S] additive (0 = attend, -inf =
        not) or None for plain causal attention over x alone; input_pos: [T] cache slots when a KV cache is set.
        decode: (pad [B], backend) for a one-token cached step through memllm::decode_attention (RoPE, cache
        append and attention in one kernel); cos/sin are then the whole RoPE tables and mask is unused."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x)
        if decode is not None:
            pad, backend = decode
            c = self.kv_cache
            qkv = qkv.view(B, qkv.shape[-1])  # (not view(B, -1), which cannot size a batch of 0 rows)
            if backend == "triton":  # arguments right by construction: the kernel, without the wrapper's checks
                y = torch.ops.memllm.decode_attention(qkv, c.k, c.v, cos, sin, input_pos, pad, H)
            else:  # (~9 us a layer in Python); generate() keeps slots and positions in range: check=False
                y = ops.decode_attention(qkv, c.k, c.v, cos, sin, input_pos, pad, H, backend=backend, check=False)
            return self.wo(y.view(B, 1, H * hd))
        # q and k rotated together, as the H + H_kv heads of one tensor: RoPE's ~9 small kernels run once per
        # layer instead of twice.
        qk = apply_rope(qkv[..., :(H + Hkv) * hd].view(B, T, H + Hkv, hd), cos, sin)
        q, k = qk.split([H, Hkv], dim=2)
        v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        gqa = Hkv != H
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        # memory: MemoryFFN (MemoryLLM, Flex FFN-M) or, after swap_ffn_for_tol, ToLMemory; None for dense.
        self.memory = MemoryFFN(cfg.d_model, cfg.ffn_memory_hidden, cfg.norm_eps) if cfg.has_memory else None
        # ffn: the context-dependent FFN reading the residual stream (dense FFN or Flex FFN-C).
        ctx_hidden = cfg.ffn_context_hidden if cfg.has_memory else cfg.ffn_hidden
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if ctx_hidden else None
        self.ffn = FeedForward(cfg.d_model, ctx_hidden) if ctx_hidden else None

    def forward(self, h, x0, ids, cos, sin, mask=None, input_pos=None, decode=None, memory_rows=None):
        """h, x0: [B, T, d]; ids: [B, T]; memory_rows: an offload engine's rows of every layer [B, T, L, d] (a
        compiled step, see Transformer.forward) or None. Returns the next residual stream [B, T, d]."""
        a = self.attn(self.attn_norm(h), cos, sin, mask, input_pos, decode)
        if self.memory is not None:
            # In parallel with attention (it reads x0, not h), so added first: eagerly a ToL row lands in h in
            # place, and compiled, the ToL gather, the `+ a` below and the next layer's norm fuse into one kernel.
            h = self.memory(h, x0, ids) if memory_rows is None else self.memory(h, x0, ids, memory_rows)
        h = h + a
        if self.ffn is not None:
            h = h + self.ffn(self.ffn_norm(h))
        return h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._cache_len = 0
        # How a one-token decode step with a KV cache attends: "sdpa" (torch's SDPA over the whole cache with an
        # additive mask, RoPE and cache writes as separate kernels), "memllm" (memllm::decode_attention: one
        # kernel per layer reading only the slots up to the token's, Triton where it can run, else its PyTorch
        # reference), "auto" (memllm on a GPU with Triton, sdpa elsewhere and while grad mode is on with weights that
        # require grad: the op has no autograd). Same tokens up to rounding.
        self.decode_attention = "auto"
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        """Module.to(dtype), .half() and .bfloat16() cast every floating buffer; the RoPE tables stay float32
        (apply_rope rotates in float32, and memllm::decode_attention takes float32 tables only): recomputed after
        such a cast."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            cos, sin = rope_tables(self.config.block_size, self.config.head_dim, self.config.rope_base)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, 0.02) for embeddings and linear weights, output projections scaled by 1/sqrt(2L) (GPT-2's
        residual scaling, which keeps the residual stream's variance independent of depth); norms at 1."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    # ---- memory knobs (paper Table 1 and Fig. 4) ----
    def memory_modules(self) -> list[nn.Module]:
        """Each layer's memory module (MemoryFFN or ToLMemory), in layer order; [] for dense models."""
        return [b.memory for b in self.layers if b.memory is not None]

    def reads_memory(self) -> bool:
        """Whether a forward reads any layer's memory term (False for dense models and when set_memory_scale
        dropped every layer or set alpha 0)."""
        return any(m.scale != 0.0 for m in self.memory_modules())

    def set_memory_scale(self, alpha: float = 1.0, drop_layers=()) -> None:
        """Scale every layer's memory term by alpha and drop (scale 0) the layers in `drop_layers`.

        Works the same before and after swap_ffn_for_tol. Raises for dense models and bad layer indices.
        """
        if not self.config.has_memory:
            raise ValueError(f"{self.config.name} is a dense model: it has no memory term to scale or drop")
        drop = set(int(i) for i in drop_layers)
        bad = sorted(i for i in drop if not 0 <= i < self.config.n_layer)
        if bad:
            raise ValueError(f"drop_layers {bad} outside [0, {self.config.n_layer})")
        for i, m in enumerate(self.memory_modules()):
            m.scale = 0.0 if i in drop else float(alpha)

    def _cached_rope_and_mask(self, input_pos: torch.Tensor, pad: torch.Tensor, dtype: torch.dtype):
        """RoPE rows cos, sin [B, T, hd/2] and the additive mask [B, 1, T, S] of tokens at cache slots input_pos [T]
        of rows with pad [B] left-padding slots."""
        slots = torch.arange(self._cache_len, device=input_pos.device)
        # [B, T] RoPE positions. A negative pad (check=False lets one through) reads as 0, as decode_attention reads
        # it: never a RoPE row past the token's slot, nor past the tables.
        pos = (input_pos[None, :] - pad.clamp(min=0)[:, None]).clamp(min=0)
        causal = slots[None, :] <= input_pos[:, None]  # [T, S]
        real = slots[None, :] >= pad[:, None]  # [B, S]: not a padding slot
        mask = causal[None] & real[:, None, :]
        # A padding query would attend to nothing (a NaN row in SDPA); let it see itself. Its output is
        # never read: real queries mask padding keys.
        mask = mask | (slots[None, None, :] == input_pos[None, :, None])
        # Additive, made once per forward: SDPA turns a bool mask into this itself, two kernels per layer.
        mask = torch.zeros(mask[:, None].shape, dtype=dtype, device=input_pos.device).masked_fill_(
            ~mask[:, None], float("-inf"))
        return self.rope_cos[pos], self.rope_sin[pos], mask

    def decode_attention_backend(self, device: torch.device) -> str | None:
        """The decode_attention backend of a one-token cached step on `device`, or None for SDPA."""
        mode = self.decode_attention
        if mode == "auto":  # the compiled kernel on a GPU (not the interpreter, which torch.compile cannot trace)
            if torch.is_grad_enabled() and self.output.weight.requires_grad:
                return None  # the op has no autograd (inference only); SDPA's step has
            usable = device.type == "cuda" and ops.backend_unavailable_reason("triton", device) is None
            return "triton" if usable and not ops._triton_interpret() else None
        if mode not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention={mode!r}: choose one of {DECODE_ATTENTION}")
        return "auto" if mode == "memllm" else None

    # ---- KV cache ----
    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate a KV cache for `batch` sequences of up to `max_len` tokens (<= block_size)."""
        if max_len > self.config.block_size:
            raise ValueError(f"max_len={max_len} exceeds block_size={self.config.block_size}")
        p = self.output.weight
        for b in self.layers:
            b.attn.kv_cache = KVCache(batch, self.config.n_kv_head, max_len, self.config.head_dim, p.dtype, p.device)
        self._cache_len = max_len

    def clear_caches(self) -> None:
        for b in self.layers:
            b.attn.kv_cache = None
        self._cache_len = 0

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                pad: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T].

        Training / scoring: input_pos None, plain causal attention over the T tokens (T <= block_size).
        Decoding with a cache (setup_caches first): input_pos [T] are the cache slots of these tokens, and
        pad [B] (optional) is each row's count of left-padding slots, which no token attends to and which
        RoPE positions skip, so a left-padded prompt behaves exactly like the unpadded one.
        check: on a GPU, ids and input_pos are range-checked first (one host sync), or a bad one would be a
        device-side assert, which ends the process's use of the GPU (on the CPU torch raises by itself).
        generate() and DecodeGraph pass False (they check on the host, and a decode step must not wait for the
        device); never inside torch.compile or a CUDA-graph capture, which cannot read values.
        """
        B, T = ids.shape
        if input_pos is not None:
            _check_index_arg("input_pos", input_pos, (T,))
            if pad is not None:
                _check_index_arg("pad", pad, (B,))
        elif pad is not None:  # plain causal attention reads no pad: a padded batch's logits were silently unpadded
            raise ValueError("pad is for decoding with a KV cache (it needs input_pos); without input_pos attention is "
                             "plain causal over ids and pad would be ignored")
        if (check and not torch.compiler.is_compiling()
                and not (ids.is_cuda and torch.cuda.is_current_stream_capturing())):
            if ids.device.type != "cpu":
                self._check_inputs(ids, input_pos, pad)
            elif pad is not None:  # torch's CPU lookups raise for a bad id or slot, but take a negative pad
                self._check_inputs(None, None, pad)
        x0 = self.tok_embeddings(ids)
        decode = None  # (pad, backend) of a one-token step through decode_attention
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            if self._cache_len == 0:
                raise RuntimeError("input_pos was given but no KV cache is set up; call setup_caches first")
            cache_batch = self.layers[0].attn.kv_cache.k.shape[0]
            if B != cache_batch:  # (index_copy_ or decode_attention failed on it, naming neither)
                raise ValueError(f"ids is [{B}, {T}] but the KV cache was set up for batch {cache_batch} "
                                 "(setup_caches)")
            pad = torch.zeros(B, dtype=torch.long, device=ids.device) if pad is None else pad
            backend = self.decode_attention_backend(ids.device) if T == 1 else None
            if backend is not None:  # RoPE rows, cache writes and the mask are the kernel's
                cos, sin, mask, decode = self.rope_cos, self.rope_sin, None, (pad, backend)
            else:
                cos, sin, mask = self._cached_rope_and_mask(input_pos, pad, x0.dtype)
        h = x0
        memory_rows = None
        if (torch.compiler.is_compiling() and hasattr(self.layers[0].memory, "step_rows")
                and self.reads_memory()):
            # ToLs served by an offload engine (EngineMemory), compiled: every layer's rows in one op per step,
            # so that each layer's read fuses with its adds (an opaque op per layer would be a kernel each).
            memory_rows = self.layers[0].memory.step_rows(ids)
        for block in self.layers:
            h = block(h, x0, ids, cos, sin, mask, input_pos, decode, memory_rows)
        return self.output(self.norm(h))

    def _check_inputs(self, ids: torch.Tensor | None, input_pos: torch.Tensor | None,
                      pad: torch.Tensor | None = None) -> None:
        """IndexError for a token id outside the vocabulary, a cache slot outside the KV cache or a pad outside
        [0, cache length] (decode_attention's range: a negative pad moved the SDPA step's RoPE past the token's
        position, where the kernel reads it as 0, and past the RoPE tables: a device-side assert): the smallest and
        largest of each read in one host sync."""
        cache = self._cache_len  # no cache: forward says so
        limits = (("token id", ids, self.config.vocab_size, "the model's vocabulary"),
                  ("input_pos", input_pos, cache, "the KV cache's slots (setup_caches)"),
                  ("pad", pad, cache + 1, f"a row's left-padding slots, at most the KV cache's {cache}"))
        named = [(what, t, limit, of) for what, t, limit, of in limits
                 if t is not None and t.numel() and (what == "token id" or cache)]
        if not named:
            return
        device = named[0][1].device
        vals = torch.stack([v.to(device=device, dtype=torch.long) for _, t, _, _ in named
                            for v in t.reshape(-1).aminmax()]).tolist()
        for i, (what, _, limit, of) in enumerate(named):
            _range_error(what, vals[2 * i], vals[2 * i + 1], limit, of)


def _check_index_arg(name: str, t, shape: tuple) -> None:
    """input_pos [T] or pad [B]: an int32 or int64 tensor of that shape, as decode_attention takes them (the SDPA step
    failed on int32 slots in index_copy_, on a 0-d input_pos with 'too many indices', and broadcast a pad of one
    row to every row where decode_attention raised). Metadata only: no host sync, and traceable."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _range_error(what: str, lo: int, hi: int, limit: int, of: str) -> None:
    if lo < 0 or hi >= limit:
        raise IndexError(f"{what} {lo if lo < 0 else hi} is outside [0, {limit}) ({of})")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy plus z_loss * mean(logsumexp^2) (PaLM's z-loss keeps the softmax normaliser near 1).

    logits [B, T, V], targets [B, T]. Returns (total loss, cross-entropy), both scalar float32.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(logits, targets.reshape(-1))
    if z_loss:
        return ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean(), ce
    return ce, ce


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    # Shifted to a maximum of 0 first, and the temperature at least float32's smallest normal: a temperature of
    # 1e-300 (0 in float32) made every logit inf, the probabilities NaN, and token 0 the pick.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # What torch.multinomial(probs, 1) computes (the same ids from the same generator), without its two checks
    # of probs that each wait for a GPU: the decode loop must not wait for the device at every step.
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


EOS_CHECK_EVERY = 16  # decode steps between checks for all rows done on a GPU (each check waits for it)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, eos_id: int | None = None,
             cuda_graph: bool = False, compile: bool = False, progress: bool = False) -> list[list[int]]:
    """Continue a batch of prompts (lists of ids, any lengths >= 1) with a KV cache.

    Prompts are left-padded to a common length; `pad` keeps padding out of attention and RoPE, so each
    row gets what it would get alone. temperature 0 is greedy; otherwise softmax sampling at `temperature`
    over the `top_k` most likely tokens (all if None), repeatable with `seed`. A row stops at `eos_id`
    (which is kept). cuda_graph: replay each decode step from a CUDA graph (DecodeGraph; CUDA only, the
    same tokens). compile: decode steps through torch.compile (graphs.compile_decode; its first step compiles,
    tens of seconds; logits equal up to the rounding of fused kernels). progress: a tqdm bar over the decode steps
    (on stderr; it reads nothing from the device). Returns the new ids of each prompt;
    ValueError if a step's logits were not finite (a corrupted ToL: NaN rows sampled token 0 without a word).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"max_new_tokens and temperature must be >= 0 and top_k positive, got {max_new_tokens}, "
                         f"{temperature} and {top_k}")
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        bad = next((t for t in p if not 0 <= t < V), None)
        if bad is not None:  # checked here, on the host: on a GPU the model's lookups skip the check (a sync)
            raise IndexError(f"prompt {i} has token id {bad}, outside the vocabulary [0, {V})")
    device = model.output.weight.device
    B, T0 = len(prompts), max(len(p) for p in prompts)
    total = T0 + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size={model.config.block_size}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    pad = torch.tensor([T0 - len(p) for p in prompts], device=device)
    ids = torch.tensor([[0] * (T0 - len(p)) + list(p) for p in prompts], device=device)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device; this one is on {device}")
    # Decode steps write slots up to total - 2: the last one is free for a DecodeGraph's scratch writes.
    # Compiled steps have static shapes: a cache length rounded up to 64 slots lets later calls with other
    # prompt lengths reuse the compiled step (the extra slots are masked out) instead of compiling again.
    cache_len = min(model.config.block_size, -(-total // 64) * 64) if compile else total
    model.setup_caches(B, cache_len)
    graph = None  # DecodeGraph, made at the first decode step (cuda_graph)
    # The prompts were checked above and sampled ids are in range: the model's GPU check (a sync) is skipped.
    decode = partial(model, check=False)  # the eager decode step otherwise
    if compile and not cuda_graph:
        from .graphs import compile_decode
        decode = compile_decode(model)
    try:
        logits = model(ids, input_pos=torch.arange(T0, device=device), pad=pad, check=False)[:, -1]
        # The loop never waits for the device: sampled ids stay there until the end (reading one per step
        # would be a host sync per step, which on a GPU leaves it idle while Python prepares the next step),
        # the position is written in place, and end-of-sequence is checked only every EOS_CHECK_EVERY steps on
        # a GPU.
        steps = []  # [B] ids of each step
        check_every = 1 if device.type == "cpu" else EOS_CHECK_EVERY  # a check costs nothing on the CPU
        done = torch.zeros(B, dtype=torch.bool, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)  # read once at the end, as the ids are
        pos = torch.empty(1, dtype=torch.long, device=device)
        from tqdm import tqdm

        bar = tqdm(total=max_new_tokens, unit="tok", desc="generate", leave=False, disable=not progress)
        for t in range(max_new_tokens):
            bar.update(1)
            finite &= torch.isfinite(logits).all()  # NaN logits sample token 0 (argmax), a silent wrong answer
            nxt = _sample(logits, temperature, top_k, gen)
            steps.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if t % check_every == check_every - 1 and bool(done.all()):
                    break
            if t + 1 < max_new_tokens and cuda_graph:
                if graph is None:
                    from .graphs import DecodeGraph
                    graph = DecodeGraph(model, B, compile=compile)
                logits = graph(nxt[:, None], T0 + t, pad)[:, -1]
            elif t + 1 < max_new_tokens:
                logits = decode(nxt[:, None], input_pos=pos.fill_(T0 + t), pad=pad)[:, -1]
        bar.close()
        out = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]
        if not bool(finite):
            raise ValueError("the model's logits became non-finite (NaN or inf) while generating: its weights (did "
                             "training diverge?) or its ToL (a corrupted tol.safetensors? rerun memllm precompute) "
                             "hold non-finite values")
    finally:
        model.clear_caches()
    if eos_id is not None:  # a row ends at its first eos_id (kept); later steps ran only for the other rows
        out = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out]
    return out
