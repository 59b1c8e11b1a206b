"""Access maps: which keys each token reads, which tokens read each key, how evenly keys are used.

Per layer, streaming over the vocabulary in chunks (one [C, K] coefficient chunk alive at a time):
    top keys        each token's k keys of largest contribution |c_i(t)| ||v_i|| (coefficients.py says why
                    contributions, not raw coefficients)
    inverted index  each key's m tokens of largest contribution: "the tokens that use key i most"
    utilization     per key, how many tokens have it among their top-k keys
    dead keys       keys in no token's top-k (utilization 0): the memory never reads them as a main term.
                    The definition depends on k (default 8 of the tiny preset's K = 688); `key_max` (the
                    key's largest contribution to any token) is kept for a k-free view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._checks import int_at_least
from ..model.model import Transformer
from ._common import check_layer, check_token_set, int_in, new_figure, save_figure
from .coefficients import DEFAULT_CHUNK_TOKENS, iter_coefficients, key_value_weights


@dataclass
class AccessMap:
    """layer; tokens [N] analysed (ids); k keys per token; m tokens per key.
    top_keys [N, k] int64, top_coef [N, k] (signed c_i), top_contrib [N, k] (|c_i| ||v_i||), rows in `tokens`
    order; utilization [K] int64; key_max [K]; key_tokens [K, m] (token ids), key_contrib [K, m]."""

    layer: int
    k: int
    tokens: np.ndarray
    top_keys: np.ndarray
    top_coef: np.ndarray
    top_contrib: np.ndarray
    utilization: np.ndarray
    key_max: np.ndarray
    key_tokens: np.ndarray
    key_contrib: np.ndarray

    @property
    def dead_keys(self) -> np.ndarray:
        """Keys in no token's top-k: [n_dead] int64."""
        return np.flatnonzero(self.utilization == 0)

    @property
    def n_keys(self) -> int:
        return len(self.utilization)

    def keys_of(self, token: int) -> list[tuple[int, float, float]]:
        """(key, coefficient, contribution) of `token`'s top-k keys."""
        rows = np.flatnonzero(self.tokens == token)
        if not len(rows):
            raise ValueError(f"token {token} was not analysed in this access map")
        r = rows[0]
        return [(int(a), float(b), float(c)) for a, b, c in zip(self.top_keys[r], self.top_coef[r], self.top_contrib[r])]

    def tokens_of(self, key: int) -> list[tuple[int, float]]:
        """The inverted index: (token, contribution) of the tokens that use `key` most."""
        if not 0 <= key < self.n_keys:
            raise ValueError(f"key {key} is out of range: layer {self.layer} has {self.n_keys} keys")
        return [(int(t), float(c)) for t, c in zip(self.key_tokens[key], self.key_contrib[key])]

    def summary(self) -> dict:
        u = self.utilization
        n = len(self.tokens)
        return {"layer": self.layer, "k": self.k, "tokens": n, "keys": self.n_keys, "dead_keys": int((u == 0).sum()),
                "utilization_max": int(u.max()), "utilization_median": float(np.median(u)),
                # share of all top-k slots taken by the 1% most used keys: 1% = perfectly even use
                "top1pct_key_share": float(np.sort(u)[::-1][:max(1, self.n_keys // 100)].sum() / max(1, n * self.k))}

    def plot(self, path=None):
        """Left: utilization histogram (keys per count of tokens). Right: utilization sorted, log scale."""
        fig = new_figure(10, 3.8)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.hist(self.utilization, bins=50, color="tab:green", log=True)
        ax1.set(title=f"layer {self.layer}: key utilization (top-{self.k})", xlabel="tokens with the key in their top-k",
                ylabel="keys (log)")
        ax2.plot(np.sort(self.utilization)[::-1] + 1, color="tab:green")
        ax2.set_yscale("log")
        ax2.set(title=f"{len(self.dead_keys)} dead keys of {self.n_keys}", xlabel="key rank", ylabel="utilization + 1 (log)")
        return save_figure(fig, path)


@torch.inference_mode()
def access_map(model: Transformer, layer: int, *, k: int = 8, tokens_per_key: int = 16, tokens=None,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, verify: bool = False, progress: bool = False) -> AccessMap:
    """Top-k keys per token, the inverted index (top `tokens_per_key` tokens per key), key utilization and
    dead keys of layer `layer`, over `tokens` (None: the whole vocabulary), streamed in chunks."""
    layer = check_layer(model, layer)
    kv = key_value_weights(model, layer)
    K = kv.keys.shape[0]
    k = int_in("k", k, 1, K, " (the layer's key count)")
    tokens_per_key = int_at_least("tokens_per_key", tokens_per_key, 1)
    tokens = check_token_set(model, tokens)
    vnorm = kv.value_norms
    dev = vnorm.device
    utilization = torch.zeros(K, dtype=torch.int64, device=dev)
    key_max = torch.zeros(K, device=dev)
    best_c = torch.full((K, 0), -1.0, device=dev)  # running top-m contributions per key
    best_t = torch.zeros((K, 0), dtype=torch.int64, device=dev)
    ids_all, tk, tc, tcon = [], [], [], []
    for ids, c in iter_coefficients(model, layer, tokens, chunk_tokens=chunk_tokens, verify=verify,
                                    progress=progress, desc=f"access L{layer}"):
        contrib = c.abs() * vnorm
        bad = ~torch.isfinite(contrib).all(1)
        if bad.any():  # (verify=False) topk ranks NaN first, and one NaN row made key_max NaN for every key
            raise ValueError(f"layer {layer}: token id {int(ids[bad][0])} has NaN or inf coefficients; the "
                             "embedding or the memory FFN's weights hold NaN or inf")
        val, idx = contrib.topk(k, dim=1)
        ids_all.append(ids.cpu())
        tk.append(idx.cpu())
        tcon.append(val.cpu())
        tc.append(c.gather(1, idx).cpu())
        utilization += torch.bincount(idx.reshape(-1), minlength=K)
        key_max = torch.maximum(key_max, contrib.max(0).values)
        # merge this chunk's tokens into each key's running top-m
        cand_c = torch.cat([best_c, contrib.t()], dim=1)
        cand_t = torch.cat([best_t, ids[None, :].expand(K, -1)], dim=1)
        m = min(tokens_per_key, cand_c.shape[1])
        best_c, pos = cand_c.topk(m, dim=1)
        best_t = cand_t.gather(1, pos)
    return AccessMap(layer, k, torch.cat(ids_all).numpy(), torch.cat(tk).numpy(), torch.cat(tc).numpy(),
                     torch.cat(tcon).numpy(), utilization.cpu().numpy(), key_max.cpu().numpy(),
                     best_t.cpu().numpy(), best_c.cpu().numpy())
