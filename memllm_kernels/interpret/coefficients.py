"""The token-key-value view of a memory FFN (paper sections 2.3.1 and 3).

For layer l's SwiGLU memory FFN with weights W_gate, W_up [K, d] and W_down [d, K], and a token t with
query q = norm_m,l(E[t]) [d]:

    key i   k_i = W_up[i, :]         gate i   g_i = W_gate[i, :]         value i   v_i = W_down[:, i]
    coefficient  c_i(t) = (q . k_i) * silu(q . g_i)                 output  FFN_l(q) = sum_i c_i(t) v_i

This decomposition is the only FFN arithmetic the toolkit writes itself; `check_decomposition` compares
sum_i c_i v_i against the model's own `MemoryFFN.lookup` for every token, and every analysis here runs the
check on the chunks it computes when asked (`verify=True`).

A key's *contribution* to token t is |c_i(t)| * ||v_i||: the norm of the term c_i v_i it adds. Rankings in
the toolkit use it rather than |c_i| because SwiGLU is invariant under k_i -> s k_i, v_i -> v_i / s (c_i
scales by s, c_i v_i does not): only the contribution is a property of the function, not of the weights'
parameterisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import int_at_least
from ..model.model import Transformer
from ._common import check_layer, check_token_ids, memory_ffn, new_figure, progress_bar, save_figure

DEFAULT_CHUNK_TOKENS = 2048
# float32 tolerance of the identity: both sides are float32 matmuls over d (and K) terms of the same
# products, summed in different orders; 1e-4 relative to the output's largest entry is ~100x the observed
# error (about 1e-6 on the tiny presets) and far below any real mismatch (a missing gate is O(1)).
IDENTITY_RTOL = 1e-4


def identity_rtol(dtype: torch.dtype) -> float:
    """The identity's tolerance for a memory FFN that computes in `dtype`: IDENTITY_RTOL in float32; a bf16 / fp16
    FFN rounds its output to 8 / 11 bits, and measured against the float32 sum it errs by 0.5-0.75 eps of the
    largest entry (d = 32 to 512, K = 88 to 1,368), so 8 eps there (bf16: 0.0625), still far below a missing gate."""
    return max(IDENTITY_RTOL, 8 * torch.finfo(dtype).eps)


@dataclass
class KeyValueWeights:
    """A layer's memory as keys, gates and values, each [K, d] float32 (values are W_down's columns as rows),
    and the value norms ||v_i|| [K]."""

    layer: int
    keys: torch.Tensor
    gates: torch.Tensor
    values: torch.Tensor

    @property
    def value_norms(self) -> torch.Tensor:
        return self.values.norm(dim=1)


@torch.inference_mode()
def key_value_weights(model: Transformer, layer: int) -> KeyValueWeights:
    """Layer `layer`'s keys (W_up rows), gates (W_gate rows) and values (W_down columns), float32 [K, d]."""
    m = memory_ffn(model, layer)
    f = m.ffn
    return KeyValueWeights(int(layer), f.w_up.weight.detach().float(), f.w_gate.weight.detach().float(),
                           f.w_down.weight.detach().float().t())


@torch.inference_mode()
def queries(model: Transformer, layer: int, tokens) -> torch.Tensor:
    """q = norm_m,l(E[t]) for token ids `tokens` [N]: [N, d] float32, through the model's own norm module."""
    m = memory_ffn(model, layer)
    ids = check_token_ids(model, tokens)
    return m.norm(model.tok_embeddings(ids)).float()


def coefficients_of(q: torch.Tensor, kv: KeyValueWeights) -> torch.Tensor:
    """c = (q K^T) * silu(q G^T): q [N, d] -> [N, K] float32 (the decomposition, see the module docstring)."""
    return (q @ kv.keys.t()) * F.silu(q @ kv.gates.t())


@torch.inference_mode()
def iter_coefficients(model: Transformer, layer: int, tokens=None, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                      verify: bool = False, progress: bool = False, desc: str | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (ids [C], c [C, K] float32) for `tokens` (None: the whole vocabulary) in chunks of chunk_tokens,
    so only one chunk's [C, K] activations are alive at a time.

    verify=True also checks sum_i c_i v_i against the model's MemoryFFN.lookup on every chunk and raises
    AssertionError on a mismatch, ValueError for a token whose output is NaN or inf (costs one more FFN pass).
    """
    m = memory_ffn(model, layer)
    kv = key_value_weights(model, layer)
    ids = check_token_ids(model, tokens)
    if ids.numel() == 0:
        raise ValueError("no tokens to analyse (an empty token list)")
    chunk_tokens = int_at_least("chunk_tokens", chunk_tokens, 1)
    starts = range(0, ids.numel(), chunk_tokens)
    bar = progress_bar(total=ids.numel(), enabled=progress, unit="tok", leave=False,
                       desc=desc or f"coefficients L{layer}")
    try:
        for s in starts:
            chunk = ids[s:s + chunk_tokens]
            x0 = model.tok_embeddings(chunk)
            c = coefficients_of(m.norm(x0).float(), kv)
            if verify:
                _assert_identity(c, kv, m.lookup(x0), layer, chunk)
            bar.update(chunk.numel())
            yield chunk, c
    finally:
        bar.close()


def _nonfinite(c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rows [C] bool whose coefficients or FFN output hold NaN or inf: a NaN error compared false with the
    tolerance (and max() dropped it), so such a token passed the check with error 0."""
    return ~(torch.isfinite(c).all(1) & torch.isfinite(out).all(1))


def _assert_identity(c: torch.Tensor, kv: KeyValueWeights, out: torch.Tensor, layer: int, ids: torch.Tensor) -> None:
    bad = _nonfinite(c, out)
    if bad.any():
        raise ValueError(f"layer {layer}: {int(bad.sum())} token(s) have a NaN or inf memory output or coefficient "
                         f"(first: token id {int(ids[bad][0])}); the embedding or the FFN weights hold NaN or inf")
    rtol = identity_rtol(out.dtype)
    out = out.float()
    err = (c @ kv.values - out).abs().max().item()
    scale = out.abs().max().item() or 1.0
    if err > rtol * scale:
        raise AssertionError(f"layer {layer}: sum_i c_i v_i differs from the memory FFN's output by {err:.3g} "
                             f"(largest output entry {scale:.3g}, tolerance {rtol:g} of it); the key-value "
                             "decomposition does not match this model's FFN")


@dataclass
class Coefficients:
    """Coefficient vectors of `tokens` [N] at `layer`: coef [N, K] float32, value_norms [K]."""

    layer: int
    tokens: np.ndarray
    coef: np.ndarray
    value_norms: np.ndarray

    @property
    def contributions(self) -> np.ndarray:
        """|c_i(t)| * ||v_i||: [N, K], the norm of each key's term in each token's output."""
        return np.abs(self.coef) * self.value_norms[None, :]

    def plot(self, path=None, sample: int = 64, seed: int = 0):
        """Left: histogram of all coefficients (log counts). Right: contributions of `sample` tokens
        (rows, seeded) on all keys (columns sorted by mean contribution)."""
        fig = new_figure(10, 4)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.hist(self.coef.ravel(), bins=200, log=True, color="tab:blue")
        ax1.set(title=f"layer {self.layer}: coefficients c_i(t)", xlabel="c", ylabel="count (log)")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(self.tokens), size=min(sample, len(self.tokens)), replace=False))
        contrib = self.contributions
        order = np.argsort(-contrib.mean(0))
        im = ax2.imshow(contrib[rows][:, order], aspect="auto", interpolation="nearest", cmap="magma")
        ax2.set(title=f"|c_i| ||v_i|| of {len(rows)} tokens", xlabel="key (by mean contribution)", ylabel="token")
        fig.colorbar(im, ax=ax2)
        return save_figure(fig, path)


def coefficients(model: Transformer, layer: int, tokens=None, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 verify: bool = True, progress: bool = False) -> Coefficients:
    """All coefficient vectors of `tokens` (None: the vocabulary) at `layer`, computed in vocabulary chunks.

    Memory: N * K * 4 bytes (the tiny preset's 8,192-token BPE vocabulary at K = 688: 23 MB; GPT-2's 50,257
    tokens: 138 MB). For larger models stream `iter_coefficients` instead.
    """
    layer = check_layer(model, layer)
    kv = key_value_weights(model, layer)
    ids, cs = [], []
    for chunk, c in iter_coefficients(model, layer, tokens, chunk_tokens=chunk_tokens, verify=verify,
                                      progress=progress):
        ids.append(chunk.cpu())
        cs.append(c.cpu())
    return Coefficients(layer, torch.cat(ids).numpy(), torch.cat(cs).numpy(), kv.value_norms.cpu().numpy())


@torch.inference_mode()
def check_decomposition(model: Transformer, layer: int, tokens=None, *,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, progress: bool = False) -> dict:
    """Compare sum_i c_i v_i with the memory FFN's own output for `tokens` (None: all) at `layer`; progress: a bar
    over the tokens (two FFN passes over the 1b vocabulary per layer).

    Returns {layer, tokens, max_abs_err, max_rel_err (relative to the largest output entry), rtol (the FFN's
    dtype's: identity_rtol), nonfinite_tokens (NaN or inf output or coefficients: errors are over the other
    tokens), ok (within rtol and no non-finite token)}.
    """
    layer = check_layer(model, layer)
    m = memory_ffn(model, layer)
    kv = key_value_weights(model, layer)
    max_err = max_out = 0.0
    n = n_bad = 0
    rtol = IDENTITY_RTOL
    for chunk, c in iter_coefficients(model, layer, tokens, chunk_tokens=chunk_tokens, progress=progress,
                                      desc=f"identity L{layer}"):
        out = m.lookup(model.tok_embeddings(chunk))
        rtol = identity_rtol(out.dtype)
        out = out.float()
        bad = _nonfinite(c, out)
        n_bad += int(bad.sum())
        c, out = c[~bad], out[~bad]
        if out.numel():
            max_err = max(max_err, (c @ kv.values - out).abs().max().item())
            max_out = max(max_out, out.abs().max().item())
        n += chunk.numel()
    rel = max_err / (max_out or 1.0)
    return {"layer": layer, "tokens": n, "max_abs_err": max_err, "max_rel_err": rel, "rtol": rtol,
            "nonfinite_tokens": n_bad, "ok": rel <= rtol and n_bad == 0}
