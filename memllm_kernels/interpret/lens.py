"""Logit lens on the memory: each token's ToL row at each layer, FFN_l(norm_m,l(E[t])), sent through the
model's own final norm and LM head: the next tokens that layer's memory of t promotes on its own.

"sum" is the whole memory term sum_l ToL[t, l] (alpha = 1) through the same head. `bigram_agreement`
measures how much of that is a bigram table: for every frequent token it asks whether the token that most
often follows it in the training text is among the lens's top-k, against a unigram reference (the k most
frequent tokens, which a lens that ignored its input would promote at best).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._checks import int_at_least
from ..model.model import Transformer
from ._common import (check_id_stream, check_layers, check_token_ids, int_in, memory_rows, new_figure, progress_bar,
                      require_memory, save_figure)

SUM = "sum"


@dataclass
class LensResult:
    """tokens [N]; layers: layer indices, plus "sum" when included; top_ids, top_logits [N, len(layers), k]."""

    tokens: np.ndarray
    layers: list
    top_ids: np.ndarray
    top_logits: np.ndarray

    def promoted(self, token: int, layer) -> list[tuple[int, float]]:
        """(next token, logit) promoted by `token`'s memory at `layer` (an index or "sum")."""
        rows = np.flatnonzero(self.tokens == token)
        if not len(rows):
            raise ValueError(f"token {token} is not in this lens result")
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not in this lens result (layers {self.layers})")
        j = self.layers.index(layer)
        return [(int(t), float(v)) for t, v in zip(self.top_ids[rows[0], j], self.top_logits[rows[0], j])]

    def plot(self, token: int, path=None, names=None, k: int = 5):
        """A table figure: `token`'s top-k promoted tokens at each layer."""
        names = names or (lambda i: f"#{int(i)}")
        fig = new_figure(2 + 1.6 * k, 0.5 + 0.35 * len(self.layers))
        ax = fig.subplots()
        ax.axis("off")
        cells = [[names(t) for t, _ in self.promoted(token, l)[:k]] for l in self.layers]
        ax.table(cellText=cells, rowLabels=[f"layer {l}" if l != SUM else "sum" for l in self.layers],
                 colLabels=[f"#{i + 1}" for i in range(k)], loc="center")
        ax.set_title(f"tokens promoted by the memory of {names(token)}")
        return save_figure(fig, path)


@torch.inference_mode()
def memory_lens(model: Transformer, tokens=None, layers=None, *, k: int = 10, include_sum: bool = True,
                chunk_tokens: int = 1024, progress: bool = False) -> LensResult:
    """Top-k next tokens promoted by each token's memory row at each layer: output(norm(ToL[t, l])).

    tokens: ids (None: the vocabulary); layers: indices (None: all). Only one [chunk, V] block of logits
    is alive at a time (1,024 x 50,257 float32: 206 MB).
    """
    require_memory(model)
    ids = check_token_ids(model, tokens)
    if ids.numel() == 0:  # an empty result would only hide the mistake (a filter that kept nothing)
        raise ValueError("no tokens to analyse (an empty token list)")
    layers = check_layers(model, layers)
    V = model.config.vocab_size
    k = int_in("k", k, 1, V)
    chunk_tokens = int_at_least("chunk_tokens", chunk_tokens, 1)
    labels = list(layers) + ([SUM] if include_sum else [])
    all_l = check_layers(model, None)
    top_i = np.empty((ids.numel(), len(labels), k), dtype=np.int64)
    top_v = np.empty((ids.numel(), len(labels), k), dtype=np.float32)
    bar = progress_bar(total=ids.numel(), enabled=progress, unit="tok", leave=False, desc="logit lens")
    for s in range(0, ids.numel(), chunk_tokens):
        chunk = ids[s:s + chunk_tokens]
        rows = {l: memory_rows(model, chunk, l) for l in (all_l if include_sum else layers)}
        for j, l in enumerate(labels):
            r = torch.stack(list(rows.values())).sum(0) if l == SUM else rows[l]
            logits = model.output(model.norm(r.to(model.output.weight.dtype))).float()
            v, i = logits.topk(k, dim=1)
            top_i[s:s + len(chunk), j] = i.cpu().numpy()
            top_v[s:s + len(chunk), j] = v.cpu().numpy()
        bar.update(len(chunk))
    bar.close()
    return LensResult(ids.cpu().numpy(), labels, top_i, top_v)


@dataclass
class BigramAgreement:
    """hit[layer] = share of the analysed tokens whose most frequent successor is in their memory lens's
    top-k; unigram = the same share for the k most frequent tokens of the text (input-independent)."""

    k: int
    min_count: int
    tokens: np.ndarray
    successor: np.ndarray
    hit: dict
    unigram: float

    def summary(self) -> dict:
        return {"k": self.k, "min_count": self.min_count, "tokens": int(len(self.tokens)),
                "hit": {str(l): v for l, v in self.hit.items()}, "unigram": self.unigram}

    def plot(self, path=None):
        fig = new_figure(7, 3.5)
        ax = fig.subplots()
        labels = [str(l) for l in self.hit]
        ax.bar(labels, list(self.hit.values()), color="tab:purple")
        ax.axhline(self.unigram, color="gray", ls="--", label=f"unigram top-{self.k}")
        ax.set(title=f"memory lens: top successor in the lens's top-{self.k} ({len(self.tokens)} tokens seen "
                     f">= {self.min_count} times)", xlabel="layer", ylabel="hit rate", ylim=(0, 1))
        ax.legend()
        return save_figure(fig, path)


def top_successors(ids: np.ndarray, vocab_size: int, min_count: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, their most frequent successor) for every token seen at least min_count times as an input in
    the 1-D id stream `ids` (ties: the smallest id)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise ValueError("the text needs at least 2 tokens for successor statistics")
    pairs = ids[:-1] * vocab_size + ids[1:]
    uniq, cnt = np.unique(pairs, return_counts=True)
    first, second = uniq // vocab_size, uniq % vocab_size
    # pairs are sorted by first token then successor id: a stable sort by -count within each first token
    order = np.lexsort((second, -cnt, first))
    first, second, cnt = first[order], second[order], cnt[order]
    is_first = np.r_[True, first[1:] != first[:-1]]
    totals = np.bincount(ids[:-1], minlength=vocab_size)
    toks, succ = first[is_first], second[is_first]
    keep = totals[toks] >= min_count
    return toks[keep], succ[keep]


def bigram_agreement(model: Transformer, ids: np.ndarray, layers=None, *, k: int = 10, min_count: int = 20,
                     progress: bool = False) -> BigramAgreement:
    """How often each layer's memory lens (and their sum) puts a token's most frequent successor in its
    top-k, over the tokens seen at least `min_count` times in the id stream `ids` (e.g. the training split)."""
    V = model.config.vocab_size
    ids = check_id_stream(model, ids)
    min_count = int_at_least("min_count", min_count, 1)  # (2.5 was taken as 3)
    toks, succ = top_successors(ids, V, min_count)
    if not len(toks):
        raise ValueError(f"no token occurs {min_count} times in the text; lower min_count")
    lens = memory_lens(model, toks, layers, k=k, progress=progress)
    hit = {l: float((lens.top_ids[:, j] == succ[:, None]).any(1).mean()) for j, l in enumerate(lens.layers)}
    unigram_top = np.argsort(-np.bincount(ids, minlength=V), kind="stable")[:k]
    return BigramAgreement(k, min_count, toks, succ, hit, float(np.isin(succ, unigram_top).mean()))
