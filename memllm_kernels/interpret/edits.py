"""Memory edits: suppress or rewrite chosen keys or a token's ToL rows, and measure which losses change.

The paper proposes targeted editing of the FFN memory but never shows it. Two kinds of edit, each a
context manager that restores the model exactly (bit for bit) on exit:

    suppressed_keys(model, layer, keys, scale=0.0)
        multiplies the values v_i of `keys` (columns of W_down) by `scale`: every token's memory at that layer
        loses (1 - scale) * c_i(t) v_i, and nothing else changes. Which tokens are hit is predicted by the
        access map's inverted index.
    edited_rows(model, {(token, layer): new_row})
        replaces token t's memory row at a layer (what its ToL stores) by `new_row` [d]. The layer's memory
        module (a MemoryFFN or a ToLMemory) is wrapped for the duration, so the memory term of that one token
        is replaced and the weights or the table are not written (our helper: the model has no per-token
        hook). Edits nest: an inner block's rows replace the outer block's, and `memory_rows` and the lens
        read the edited rows. The key analyses and `suppressed_keys` read the FFN weights, which do not hold
        the edited rows: they refuse a layer whose rows are being edited.
        `suppress_token_rows` (zeros) and `copy_token_rows` (another token's rows) build the mapping.

`edit_effect` scores text before and inside an edit and reports the per-position loss changes: where the
edited token occurs, where it does not, and which next tokens gain or lose probability. Because the memory
enters the residual stream at the token's own position, a row edit cannot change any prediction made
before the token's first occurrence in a window (causal attention): the report prints that change, which
must be exactly zero, and warns when it is not.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._checks import int_at_least
from ..model.model import Transformer
from ..model.train import check_batch_fits
from ._common import (check_id_stream, check_layer, check_layers, check_token, check_token_ids, checked_ids, int_in,
                      memory_ffn, memory_rows, new_figure, progress_bar, require_memory, save_figure)


# ---------------------------------------------------------------- key edits
@contextlib.contextmanager
def suppressed_keys(model: Transformer, layer: int, keys, scale: float = 0.0):
    """Scale the values of `keys` at `layer` by `scale` (0: suppress) inside the `with` block."""
    m = memory_ffn(model, layer)
    scale = float(scale)
    if not math.isfinite(scale):  # NaN or inf made every token's memory at the layer NaN: a loss of NaN, not a number
        raise ValueError(f"scale must be a finite number, got {scale}")
    w = m.ffn.w_down.weight  # [d, K]: value i is column i
    K = w.shape[1]
    keys = checked_ids(keys, K, "keys", "key", f"layer {layer}'s keys")
    if keys.numel() == 0:
        raise ValueError("no keys to edit")
    keys = keys.to(w.device)
    saved = w.detach()[:, keys].clone()
    with torch.no_grad():
        w[:, keys] = saved * scale
    try:
        yield model
    finally:
        with torch.no_grad():
            w[:, keys] = saved


# ---------------------------------------------------------------- token-row edits
class RowOverride(nn.Module):
    """Wraps a layer's memory module (MemoryFFN, ToLMemory, or another RowOverride when edits nest): the memory
    term of the tokens in `slot` becomes their new rows, everyone else's is the inner module's.
    forward(h, x0, ids) like the inner one.

    `scale` reads and writes the inner module's, so set_memory_scale (alpha, dropped layers) still applies
    to edited rows as it would to a real ToL row.
    """

    def __init__(self, inner: nn.Module, vocab_size: int, tokens: torch.Tensor, delta: torch.Tensor):
        super().__init__()
        self.inner = inner
        slot = torch.full((vocab_size,), -1, dtype=torch.int64, device=tokens.device)
        slot[tokens] = torch.arange(tokens.numel(), device=tokens.device)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("delta", delta, persistent=False)  # new row - the inner module's row, [n, d]

    @property
    def scale(self) -> float:
        return self.inner.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.inner.scale = value

    def forward(self, h: torch.Tensor, x0: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(h, x0, ids)
        s = self.inner.scale
        if s == 0.0:
            return out
        j = self.slot[ids]
        hit = (j >= 0).unsqueeze(-1)
        return out + s * torch.where(hit, self.delta[j.clamp(min=0)], 0.0).to(out.dtype)


@contextlib.contextmanager
def edited_rows(model: Transformer, rows: dict):
    """Replace token rows of the memory inside the `with` block. rows: {(token, layer): new row [d]}.

    Blocks nest: an inner block's rows replace the rows the outer block set, and the outer block's other
    rows stay as it set them."""
    require_memory(model)
    if not rows:
        raise ValueError("no rows to edit")
    d = model.config.d_model
    by_layer: dict[int, dict[int, torch.Tensor]] = {}
    for (tok, layer), row in rows.items():
        layer = check_layer(model, layer)
        tok = check_token(model, tok, "rows")
        row = torch.as_tensor(row, dtype=torch.float32)
        if row.shape != (d,):
            raise ValueError(f"a new row must have shape ({d},), got {tuple(row.shape)} for token {tok} layer {layer}")
        by_layer.setdefault(layer, {})[tok] = row
    wrapped = []
    dev = model.output.weight.device  # (the embedding may be in host memory: offload_embedding)
    try:
        for layer, new in sorted(by_layer.items()):
            toks = torch.tensor(sorted(new), dtype=torch.int64, device=dev)
            old = memory_rows(model, toks, layer)  # as the model reads them now: an outer block's edit included
            target = torch.stack([new[int(t)] for t in toks]).to(dev)
            block = model.layers[layer]
            inner = block.memory
            block.memory = RowOverride(inner, model.config.vocab_size, toks, target - old)
            wrapped.append((block, inner))
        yield model
    finally:
        for block, inner in wrapped:
            block.memory = inner


def suppress_token_rows(model: Transformer, token: int, layers=None) -> dict:
    """{(token, l): zeros} for `layers` (None: all): the token's memory term removed."""
    token = check_token(model, token)
    return {(token, l): torch.zeros(model.config.d_model) for l in check_layers(model, layers)}


def copy_token_rows(model: Transformer, token: int, source: int, layers=None) -> dict:
    """{(token, l): source's row at l}: `token` reads `source`'s memory at `layers` (None: all)."""
    token, source = check_token(model, token), check_token(model, source, "source")
    out = {}
    for l in check_layers(model, layers):
        out[(token, l)] = memory_rows(model, [source], l)[0].cpu()
    return out


# ---------------------------------------------------------------- measuring an edit
@dataclass
class EditEffect:
    """Per scored position (N of them): inputs, targets [N] ids; base_loss, edited_loss [N] (nats);
    reached [N]: a focus token occurs at or before the position in its window (False: the edit cannot have
    changed it); focus: the edited tokens; dprob_focus [V] or None: mean change of p(next = v) at positions
    whose input is a focus token (probabilities, not log-probabilities: a rare token's log-probability can
    move a lot while its probability stays negligible)."""

    description: str
    inputs: np.ndarray
    targets: np.ndarray
    base_loss: np.ndarray
    edited_loss: np.ndarray
    reached: np.ndarray
    focus: list
    dprob_focus: np.ndarray | None

    @property
    def delta(self) -> np.ndarray:
        return self.edited_loss - self.base_loss

    def by_input(self, min_count: int = 5) -> list[tuple[int, float, int]]:
        """(input token, mean loss change at its positions, count), largest change first; tokens seen at
        least min_count times."""
        return _grouped(self.inputs, self.delta, min_count)

    def by_target(self, min_count: int = 5) -> list[tuple[int, float, int]]:
        """(target token, mean loss change when it is the next token, count), largest change first."""
        return _grouped(self.targets, self.delta, min_count)

    def summary(self, top: int = 10, min_count: int = 5) -> dict:
        d = self.delta
        at = np.isin(self.inputs, self.focus) if self.focus else np.zeros(len(d), bool)
        after = self.reached & ~at
        out = {"description": self.description, "positions": int(len(d)), "mean_delta": float(d.mean()),
               "focus_positions": int(at.sum()),
               "mean_delta_at_focus": float(d[at].mean()) if at.any() else None,
               "mean_abs_delta_after_focus": float(np.abs(d[after]).mean()) if after.any() else None,
               "unreached_positions": int((~self.reached).sum()),
               "max_abs_delta_unreached": float(np.abs(d[~self.reached]).max()) if (~self.reached).any() else None,
               "top_inputs": self.by_input(min_count)[:top], "top_targets": self.by_target(min_count)[:top]}
        if self.dprob_focus is not None:
            order = np.argsort(self.dprob_focus, kind="stable")
            out["rising_after_focus"] = [(int(v), float(self.dprob_focus[v])) for v in order[::-1][:top]]
            out["falling_after_focus"] = [(int(v), float(self.dprob_focus[v])) for v in order[:top]]
        return out

    def plot(self, path=None, names=None, top: int = 12, min_count: int = 5):
        """Left: mean loss change by input token (largest). Right: the same by target token."""
        names = names or (lambda i: f"#{int(i)}")
        fig = new_figure(11, 4.2)
        for ax, rows, what in zip(fig.subplots(1, 2), (self.by_input(min_count), self.by_target(min_count)),
                                  ("input", "next")):
            rows = rows[:top][::-1]
            ax.barh([names(t) for t, _, _ in rows], [v for _, v, _ in rows], color="tab:orange")
            ax.set(title=f"mean loss change by {what} token", xlabel="delta loss (nats)")
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle(self.description, fontsize=9)
        return save_figure(fig, path)


def _grouped(keys: np.ndarray, vals: np.ndarray, min_count: int) -> list[tuple[int, float, int]]:
    uniq, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=vals.astype(np.float64), minlength=len(uniq))
    means = sums / cnt
    keep = np.flatnonzero(cnt >= min_count)
    order = keep[np.argsort(-means[keep], kind="stable")]
    return [(int(uniq[i]), float(means[i]), int(cnt[i])) for i in order]


@torch.inference_mode()
def edit_effect(model: Transformer, ids: np.ndarray, edit, *, seq_len: int, focus=(), max_tokens: int | None = 16384,
                windows: str = "first", batch_size: int = 16, description: str = "", progress: bool = False) -> EditEffect:
    """Score non-overlapping windows of `ids` (seq_len + 1 tokens each, at most max_tokens predictions)
    without and with the edit, and return the per-position loss changes.

    edit: a zero-argument callable returning a context manager, e.g.
        lambda: edited_rows(model, suppress_token_rows(model, tok))
        lambda: suppressed_keys(model, layer, [k])
    focus: the token ids the edit targets (for the summary and `reached`; empty: every position is reached).
    windows: "first" scores the first windows of the text; "focus" the first windows (anywhere in the text)
        whose inputs hold a focus token -- a row edit cannot change any other window, and a word like ' king'
        may not occur in the first 16k tokens of a validation split at all.
    """
    ids = check_id_stream(model, ids)
    V = model.config.vocab_size
    seq_len = int_in("seq_len", seq_len, 1, model.config.block_size)
    batch_size = int_at_least("batch_size", batch_size, 1)
    if max_tokens is not None:
        max_tokens = int_at_least("max_tokens", max_tokens, 1)
    if windows not in ("first", "focus"):
        raise ValueError(f"windows must be 'first' or 'focus', got {windows!r}")
    focus = check_token_ids(model, focus, "focus").tolist()
    if windows == "focus" and not focus:
        raise ValueError("windows='focus' needs focus tokens")
    n_all = (len(ids) - 1) // seq_len  # every complete window of the text
    n_win = n_all if max_tokens is None else min(n_all, max_tokens // seq_len)
    if n_win < 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens (and max_tokens >= seq_len), got "
                         f"{len(ids)} tokens, max_tokens={max_tokens}")
    starts = np.arange(n_win) * seq_len
    if windows == "focus":
        inputs = ids[:n_all * seq_len].reshape(n_all, seq_len)
        has = np.flatnonzero(np.isin(inputs, focus).any(1))
        if not len(has):
            raise ValueError(f"no focus token {focus} occurs in the text's {n_all} windows of {seq_len} tokens")
        starts = has[:n_win] * seq_len
    dev = model.output.weight.device
    focus_t = torch.tensor(focus, dtype=torch.int64, device=dev)
    win = torch.from_numpy(np.stack([ids[s:s + seq_len + 1] for s in starts])).to(dev)
    n_win = len(starts)
    base, edited, reached = [], [], []
    dprob = torch.zeros(V, dtype=torch.float64, device=dev) if focus else None
    n_focus = 0
    check_batch_fits(min(batch_size, n_win), seq_len, V, dev)  # as evaluate() does, before the first forward
    for s in progress_bar(range(0, n_win, batch_size), enabled=progress, desc="edit effect", leave=False):
        x, y = win[s:s + batch_size, :-1], win[s:s + batch_size, 1:]
        at = torch.isin(x, focus_t) if focus else None
        # each pass is reduced to what is kept before the next runs: the base pass's [B, T, V] log-probabilities
        # stayed alive through the edited pass (3 such blocks at its peak, 2 now: 16 x 2,048 x 128,256 float32 is
        # 16.8 GB each at the 1B shape)
        for sign, losses, ctx in ((-1.0, base, contextlib.nullcontext), (1.0, edited, edit)):
            with ctx():
                lp = torch.log_softmax(model(x).float(), -1)
            losses.append(-lp.gather(-1, y[..., None])[..., 0].reshape(-1))
            if focus and at.any():
                dprob += sign * lp[at].exp().double().sum(0)
            del lp
        if focus:
            reached.append((at.cumsum(1) > 0).reshape(-1))
            n_focus += int(at.sum())
        else:
            reached.append(torch.ones(x.numel(), dtype=torch.bool, device=dev))
    inputs = win[:, :-1].reshape(-1).cpu().numpy()
    targets = win[:, 1:].reshape(-1).cpu().numpy()
    mean_dprob = (dprob / n_focus).cpu().numpy() if focus and n_focus else None
    return EditEffect(description, inputs, targets, torch.cat(base).cpu().numpy(), torch.cat(edited).cpu().numpy(),
                      torch.cat(reached).cpu().numpy(), focus, mean_dprob)
