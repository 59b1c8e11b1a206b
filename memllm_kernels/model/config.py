"""Model configuration: one dataclass and the named presets `<size>-<kind>`.

Sizes: the paper's `250m`, `750m`, `1b` (24 layers, vocab 128,256, seq 2048, as the paper gives them) and our
`tiny` (GPT-2 vocabulary, trains on two CPU cores in minutes) plus `tinyact`, a dense-only size with
MemoryLLM-tiny's *active* parameter count (same width, one third of the layers: 12d^2 * L/3 = 4d^2 * L).
Kinds: `dense`, `memoryllm`, `flex1`, `flex2`, `flex3` (Flex-MemoryLLM-beta*d^2, beta = 1, 2, 3).

Parameter-count convention (checked in tests/test_model.py against the paper's table): the paper counts
the weight matrices of attention and FFN blocks only -- no token embedding, no LM head, no norms -- in
units of 10^6, truncated rather than rounded (750m dense is 737.89e6 and printed as 737M; rounding would
give 738M). `param_counts()` returns exact numbers; `paper_millions()` applies the truncation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

KINDS = ("dense", "memoryllm", "flex1", "flex2", "flex3")


def _round_up(x: float, multiple: int) -> int:
    return int(-(-x // multiple) * multiple)


def ffn_hidden_for(d_model: int) -> int:
    """SwiGLU hidden size K = 8d/3 rounded up to a multiple of 8.

    This rule reproduces all three paper sizes: 960 -> 2560, 1600 -> 4272, 2048 -> 5464.
    """
    return _round_up(8 * d_model / 3, 8)


@dataclass
class ModelConfig:
    """Everything that fixes a model's shapes. Saved as JSON next to every checkpoint and in ToL files.

    kind: 'dense' | 'memoryllm' | 'flex1' | 'flex2' | 'flex3'.
    ffn_hidden: K, the dense FFN's SwiGLU width (0 means 8d/3 rounded up to 8). A MemoryLLM layer's memory
        FFN has the same K; a Flex-beta layer splits it into FFN-C (K_C = beta*d/3, rounded up to 8) and
        FFN-M (K_M = K - K_C, i.e. about (8-beta)d/3), so every kind has the same FFN parameter count.
    n_kv_head: key/value heads (None = n_head, full multi-head attention; fewer = GQA).
    block_size: the longest sequence the RoPE tables and KV cache are built for.
    """

    kind: str = "memoryllm"
    vocab_size: int = 50257
    n_layer: int = 6
    d_model: int = 256
    n_head: int = 4
    n_kv_head: int | None = None
    ffn_hidden: int = 0
    block_size: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {KINDS}")
        # A hand-edited config.json reaches here too: a string d_model failed in a format string ('not all
        # arguments converted'), n_layer -1 as a list of unexpected weights.
        for name, least in (("vocab_size", 1), ("n_layer", 1), ("d_model", 1), ("n_head", 1), ("block_size", 1),
                            ("ffn_hidden", 0), ("n_kv_head", 1)):
            v = getattr(self, name)
            if not (v is None and name == "n_kv_head") and not (type(v) is int and v >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
        if self.block_size > 1 << 24:  # a config.json edited to 10^8 built 9.6 GB of RoPE tables before any check
            raise ValueError(f"block_size must be at most 2^24 = {1 << 24} (RoPE's positions are float32, exact up to "
                             f"2^24), got {self.block_size}")
        for name in ("rope_base", "norm_eps"):
            v = getattr(self, name)
            if type(v) not in (int, float) or not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if type(self.tie_embeddings) is not bool:
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden == 0:
            self.ffn_hidden = ffn_hidden_for(self.d_model)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head_dim={self.d_model // self.n_head} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.is_flex and self.ffn_hidden <= self.ffn_context_hidden:
            raise ValueError(f"ffn_hidden={self.ffn_hidden} leaves no room for FFN-M after "
                             f"FFN-C's K_C={self.ffn_context_hidden}")

    # ---- derived sizes ----
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def has_memory(self) -> bool:
        """True for MemoryLLM and Flex: layers have a context-free memory FFN reading norm_m,l(E[ids])."""
        return self.kind != "dense"

    @property
    def is_flex(self) -> bool:
        return self.kind.startswith("flex")

    @property
    def beta(self) -> int:
        """Flex-beta*d^2: how many d^2 of the 8d^2 FFN budget go to the context FFN-C (0 if not Flex)."""
        return int(self.kind[4:]) if self.is_flex else 0

    @property
    def ffn_context_hidden(self) -> int:
        """K_C of FFN-C (reads the residual stream, post-attention): beta*d/3 rounded up to 8; 0 if none."""
        return _round_up(self.beta * self.d_model / 3, 8) if self.is_flex else 0

    @property
    def ffn_memory_hidden(self) -> int:
        """K_M of the memory FFN (reads norm_m,l(E[ids])): K for MemoryLLM, K - K_C for Flex, 0 for dense."""
        if not self.has_memory:
            return 0
        return self.ffn_hidden - self.ffn_context_hidden

    # ---- (de)serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Paper sizes: d, K, heads; all 24 layers, vocab 128,256 (Llama-3), seq 2048.
_PAPER_SIZES = {
    "250m": dict(d_model=960, ffn_hidden=2560, n_head=16),
    "750m": dict(d_model=1600, ffn_hidden=4272, n_head=16),
    "1b": dict(d_model=2048, ffn_hidden=5464, n_head=32),
}
_SIZES: dict[str, dict] = {
    name: dict(vocab_size=128256, n_layer=24, block_size=2048, **shape) for name, shape in _PAPER_SIZES.items()
}
# tiny: GPT-2 vocabulary (50,257). Six layers of width 256 are about 4.7M non-embedding parameters; with a
# 256-token context a training step of 16 sequences takes well under a second on two CPU cores (see
# docs/model.md for measured speeds). The vocabulary can be swapped for a smaller BPE at train time.
_SIZES["tiny"] = dict(vocab_size=50257, n_layer=6, d_model=256, n_head=4, ffn_hidden=ffn_hidden_for(256),
                      block_size=256)
# tinyact: a dense model with MemoryLLM-tiny's active (attention-only) parameter count. Same width and
# vocabulary, 2 layers instead of 6: 2 * 12d^2 (approximately) = 6 * 4d^2. Only the dense kind makes sense.
_SIZES["tinyact"] = dict(_SIZES["tiny"], n_layer=2)

PRESETS: dict[str, ModelConfig] = {}
for _size, _shape in _SIZES.items():
    for _kind in KINDS:
        if _size == "tinyact" and _kind != "dense":
            continue
        PRESETS[f"{_size}-{_kind}"] = ModelConfig(kind=_kind, name=f"{_size}-{_kind}", **_shape)


def get_preset(name: str, **overrides) -> ModelConfig:
    """A copy of the named preset, optionally with fields replaced (e.g. vocab_size for a custom tokenizer).

    Raises ValueError listing the valid names for an unknown one.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name].replace()


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts by component, computed from the config (tests check them against a model).

    Keys: embedding, head (0 when tied), attention (q, k, v, o projections), ffn_context (dense FFN or
    Flex FFN-C), ffn_memory (memory FFNs, replaced by ToLs), norms, non_embedding (attention + FFNs,
    the paper's convention, no norms), active (what runs per token once memory FFNs are ToLs:
    attention + ffn_context), total (everything).
    """
    d, L = cfg.d_model, cfg.n_layer
    kv = cfg.n_kv_head * cfg.head_dim
    attention = L * (d * d + 2 * d * kv + d * d)
    dense_k = cfg.ffn_hidden if not cfg.has_memory else cfg.ffn_context_hidden
    ffn_context = L * 3 * d * dense_k
    ffn_memory = L * 3 * d * cfg.ffn_memory_hidden
    norms_per_layer = 1 + (1 if not cfg.has_memory else 0) + (1 if cfg.has_memory else 0) + (1 if cfg.is_flex else 0)
    norms = L * norms_per_layer * d + d  # + final norm
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    out = dict(embedding=embedding, head=head, attention=attention, ffn_context=ffn_context,
               ffn_memory=ffn_memory, norms=norms)
    out["non_embedding"] = attention + ffn_context + ffn_memory
    out["active"] = attention + ffn_context
    out["total"] = embedding + head + attention + ffn_context + ffn_memory + norms
    return out


def paper_millions(n: int) -> int:
    """The paper's rounding: millions, truncated (see the module docstring)."""
    return n // 1_000_000


def describe_params(cfg: ModelConfig) -> str:
    """One line per count, in the paper's convention, e.g. for `memllm train` and `memllm info`."""
    c = param_counts(cfg)
    line = (f"{cfg.name}: non-embedding {c['non_embedding'] / 1e6:.2f}M (paper convention "
            f"{paper_millions(c['non_embedding'])}M), active {c['active'] / 1e6:.2f}M "
            f"({paper_millions(c['active'])}M)")
    if cfg.has_memory:
        line += f", memory FFNs {c['ffn_memory'] / 1e6:.2f}M (replaced by ToLs)"
    line += f", embedding {c['embedding'] / 1e6:.2f}M, head {c['head'] / 1e6:.2f}M, total {c['total'] / 1e6:.2f}M"
    return line
