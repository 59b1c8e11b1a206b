"""Sweeps over the memory: validation perplexity with one layer's memory dropped (paper Fig. 4, against a
dense model with one layer's FFN dropped) and with the whole memory term scaled by alpha (paper Table 1).

The memory knobs are the model's own: `Transformer.set_memory_scale(alpha, drop_layers)`. The model has no
knob for dense FFNs, so `dropped_ffn` (below) removes a block's context FFN for the duration of a `with`
block; for a Flex model that is FFN-C, for a dense model its only FFN. Perplexity comes from the model's own
`evaluate` (model/train.py), the same numbers `memllm eval --drop-layers/--alpha` prints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from .._checks import int_at_least
from ..model.model import Transformer
from ..model.train import evaluate
from ._common import check_id_stream, check_layer, check_layers, new_figure, progress_bar, require_memory, save_figure

DEFAULT_ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
DEFAULT_EVAL_TOKENS = 16384


@contextlib.contextmanager
def memory_scale(model: Transformer, alpha: float = 1.0, drop_layers=()):
    """set_memory_scale for the duration of a `with` block, then each layer's previous scale back."""
    require_memory(model)
    saved = [m.scale for m in model.memory_modules()]
    model.set_memory_scale(alpha, drop_layers)
    try:
        yield model
    finally:
        for m, s in zip(model.memory_modules(), saved):
            m.scale = s


@contextlib.contextmanager
def dropped_ffn(model: Transformer, layer: int):
    """Layer `layer` without its context FFN (dense FFN, or Flex FFN-C) inside the `with` block.

    A helper here rather than a model knob: Block.forward skips `ffn` when it is None, so the block is
    exactly the model without that FFN. Raises for a layer that has no context FFN (MemoryLLM).
    """
    layer = check_layer(model, layer)
    block = model.layers[layer]
    if block.ffn is None:
        raise ValueError(f"layer {layer} of {model.config.name} has no context FFN to drop (kind "
                         f"{model.config.kind!r})")
    ffn = block.ffn
    block.ffn = None
    try:
        yield model
    finally:
        block.ffn = ffn


@dataclass
class SweepResult:
    """name: the model's name; what: 'memory' (a layer's memory dropped), 'ffn' (a layer's dense FFN dropped)
    or 'alpha'; points: [(label, loss, ppl)] in sweep order; baseline: (loss, ppl) of the untouched model."""

    name: str
    what: str
    baseline: tuple
    points: list = field(default_factory=list)
    tokens: int = 0

    def summary(self) -> dict:
        return {"name": self.name, "what": self.what, "tokens": self.tokens,
                "baseline": {"loss": self.baseline[0], "ppl": self.baseline[1]},
                "points": [{"at": p[0], "loss": p[1], "ppl": p[2]} for p in self.points]}

    def plot(self, path=None):
        return plot_layer_sweeps([self], path) if self.what != "alpha" else plot_alpha_sweep(self, path)


def _eval(model, ids, seq_len, batch_size, max_tokens) -> tuple[float, float, int]:
    r = evaluate(model, ids, seq_len, batch_size, max_tokens)
    return r["loss"], r["ppl"], r["tokens"]


def _eval_args(model, ids, seq_len, batch_size, max_tokens) -> tuple:
    """The text and evaluate()'s options, checked once before the first evaluation: a float text was truncated
    to ids and an id past the vocabulary failed inside the loss ('Target 300 is out of bounds')."""
    return (check_id_stream(model, ids), int_at_least("seq_len", seq_len, 1), int_at_least("batch_size", batch_size, 1),
            None if max_tokens is None else int_at_least("max_tokens", max_tokens, 1))


def layer_drop_sweep(model: Transformer, ids: np.ndarray, seq_len: int, *, layers=None, batch_size: int = 16,
                     max_tokens: int | None = DEFAULT_EVAL_TOKENS, progress: bool = False) -> SweepResult:
    """Perplexity on `ids` with each layer in `layers` (None: all) dropped in turn: its memory term for a
    MemoryLLM/Flex model, its FFN for a dense model. One evaluation per layer plus the baseline."""
    layers = check_layers(model, layers)
    ids, seq_len, batch_size, max_tokens = _eval_args(model, ids, seq_len, batch_size, max_tokens)
    what = "memory" if model.config.has_memory else "ffn"
    # the baseline at alpha 1 with no layer dropped, as every point below is (memory_scale(model, 1.0, [l])): a
    # model left at alpha 0.5 gave a baseline at 0.5 and points at 1
    with memory_scale(model, 1.0) if what == "memory" else contextlib.nullcontext():
        loss, ppl, n = _eval(model, ids, seq_len, batch_size, max_tokens)
    res = SweepResult(model.config.name, what, (loss, ppl), tokens=n)
    for l in progress_bar(layers, enabled=progress, desc=f"layer sweep ({what})", leave=False):
        ctx = memory_scale(model, 1.0, [l]) if what == "memory" else dropped_ffn(model, l)
        with ctx:
            loss, ppl, _ = _eval(model, ids, seq_len, batch_size, max_tokens)
        res.points.append((l, loss, ppl))
    return res


def alpha_sweep(model: Transformer, ids: np.ndarray, seq_len: int, *, alphas=DEFAULT_ALPHAS, batch_size: int = 16,
                max_tokens: int | None = DEFAULT_EVAL_TOKENS, progress: bool = False) -> SweepResult:
    """Perplexity on `ids` with every layer's memory term scaled by each alpha (paper Table 1)."""
    require_memory(model)
    ids, seq_len, batch_size, max_tokens = _eval_args(model, ids, seq_len, batch_size, max_tokens)
    alphas = [float(a) for a in alphas]
    if not alphas or any(not np.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be finite numbers, got {alphas}")
    with memory_scale(model, 1.0):
        loss, ppl, n = _eval(model, ids, seq_len, batch_size, max_tokens)
    res = SweepResult(model.config.name, "alpha", (loss, ppl), tokens=n)
    for a in progress_bar(alphas, enabled=progress, desc="alpha sweep", leave=False):
        if a == 1.0:
            res.points.append((a, loss, ppl))
            continue
        with memory_scale(model, a):
            la, pa, _ = _eval(model, ids, seq_len, batch_size, max_tokens)
        res.points.append((a, la, pa))
    return res


def plot_layer_sweeps(results: list[SweepResult], path=None):
    """Perplexity increase (x baseline) when one layer is dropped, one bar group per layer, one colour per run."""
    fig = new_figure(8, 3.8)
    ax = fig.subplots()
    w = 0.8 / max(1, len(results))
    for j, r in enumerate(results):
        ls = np.array([p[0] for p in r.points])
        ax.bar(ls + (j - (len(results) - 1) / 2) * w, [p[2] / r.baseline[1] for p in r.points], width=w,
               label=f"{r.name}: {'memory' if r.what == 'memory' else 'FFN'} dropped (base ppl {r.baseline[1]:.1f})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(title="perplexity with one layer's memory / FFN dropped", xlabel="dropped layer",
           ylabel="ppl / baseline ppl")
    if results and results[0].points:
        ax.set_xticks([p[0] for p in results[0].points])
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_alpha_sweep(result: SweepResult, path=None):
    fig = new_figure(6, 3.5)
    ax = fig.subplots()
    ax.plot([p[0] for p in result.points], [p[2] for p in result.points], "o-")
    ax.invert_xaxis()
    ax.set(title=f"{result.name}: memory scaled by alpha", xlabel="alpha", ylabel="validation perplexity")
    return save_figure(fig, path)
