"""Shared plumbing of the interpretability toolkit: open a run, find a layer's memory FFN with clear errors,
turn token strings into ids and ids into printable names, progress bars, lazy optional imports.

Every analysis takes a `Transformer` (the reference model of `memllm_kernels.model`) and reads its own
modules: `model.tok_embeddings` (E), `model.layers[l].memory` (a `MemoryFFN`: `.norm` is norm_m,l,
`.ffn.w_gate / w_up / w_down` the SwiGLU; or a `ToLMemory` after `swap_ffn_for_tol`; or edits.py's
`RowOverride` around either inside an `edited_rows` block), `model.norm` and `model.output` (final norm and LM
head).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import int_at_least
from ..model.model import MemoryFFN, Transformer
from ..model.tol import ToLMemory

INTERPRET_EXTRA = "pip install 'memllm-kernels[interpret]'  (scikit-learn and matplotlib)"


# ---------------------------------------------------------------- optional dependencies
def require(module: str, what: str):
    """Import an optional dependency, or raise an ImportError saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {module.split('.')[0]}: {INTERPRET_EXTRA} ({e})") from None


def new_figure(width: float = 8.0, height: float = 4.5):
    """A matplotlib Figure that is not registered with pyplot: no display, no global state, any backend.

    Saving it uses the Agg canvas, so the toolkit never needs a display (and never switches the backend
    of a notebook that imports it).
    """
    require("matplotlib", "plotting")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | os.PathLike | None):
    """Write `fig` as a PNG (120 dpi) when `path` is given; returns the figure for chaining."""
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def progress_bar(iterable=None, *, enabled: bool, **kw):
    """tqdm when enabled, else the iterable itself (or a no-op object with update/close)."""
    if enabled:
        from tqdm import tqdm

        return tqdm(iterable, dynamic_ncols=True, **kw)
    if iterable is not None:
        return iterable
    return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def set_postfix_str(self, s):
        pass


# ---------------------------------------------------------------- argument checks
def check_layer(model: Transformer, layer) -> int:
    """Return `layer` as an int after checking 0 <= layer < n_layer (ValueError naming the range)."""
    L = model.config.n_layer
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an integer, got {layer!r}")
    if not 0 <= int(layer) < L:
        raise ValueError(f"layer {layer} is out of range: {model.config.name} has {L} layers (0..{L - 1})")
    return int(layer)


def check_layers(model: Transformer, layers) -> list[int]:
    """None means every layer; otherwise each index is checked."""
    if layers is None:
        return list(range(model.config.n_layer))
    return [check_layer(model, l) for l in layers]


def int_in(name: str, v, lo: int, hi: int, note: str = "") -> int:
    """An int option in [lo, hi], as an int: int_at_least's TypeError for a float or a bool (a float k reached
    topk, sklearn or range() and failed there), ValueError naming the range."""
    int_at_least(name, v, -math.inf)  # the type check alone
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}]{note}, got {v}")
    return int(v)


def refuse_overwrite(paths, force: bool) -> None:
    """FileExistsError naming those of `paths` that exist, unless force: nothing a user saved is overwritten
    without asking (the `memllm train` / `precompute` rule)."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not force:
        more = len(existing) - 4
        shown = ", ".join(p.name for p in existing[:4]) + (f" and {more} more" if more > 0 else "")
        raise FileExistsError(f"{existing[0].parent} already has {shown}; pass --force to overwrite "
                              + ("it" if len(existing) == 1 else "them"))


def require_memory(model: Transformer) -> None:
    cfg = model.config
    if not cfg.has_memory:
        raise ValueError(f"{cfg.name} is a dense model (kind 'dense'): it has no memory FFNs to analyse. The "
                         "memory analyses need a memoryllm or flex1/2/3 run; a dense run can only be given to the "
                         "layer sweep (memllm inspect MEMORY_RUN --dense DENSE_RUN)")


def memory_ffn(model: Transformer, layer) -> MemoryFFN:
    """Layer `layer`'s memory FFN (FFN-M for Flex models), with clear errors for dense, swapped or edited models."""
    from .edits import RowOverride  # (edits.py imports this module)

    require_memory(model)
    layer = check_layer(model, layer)
    m = model.layers[layer].memory
    if isinstance(m, MemoryFFN):
        return m
    if isinstance(m, RowOverride):
        # the FFN weights do not hold the edited rows: coefficients read inside the block would describe a
        # memory the model no longer uses
        raise ValueError(f"layer {layer}'s memory is being edited (an edited_rows block is active): the key/value "
                         "analyses and key edits read the FFN weights, which do not hold the edited rows; run them "
                         "outside the edited_rows block")
    if isinstance(m, ToLMemory):
        raise ValueError(f"layer {layer}'s memory FFN was swapped for a ToL ({type(m).__name__}): the key/value "
                         "analyses need the FFN weights; load the run without swapping (no --tol)")
    raise ValueError(f"layer {layer}'s memory module ({type(m).__name__}) is not a MemoryFFN: the key/value "
                     "analyses need the FFN weights; load the run without swapping its memory")


class IdOutOfRange(IndexError, ValueError):
    """An id outside its range: an IndexError, as the model's forward and the ops raise for a bad token id, and a
    ValueError, as the toolkit raised before (and `memllm inspect` reports in one line)."""


def checked_ids(ids, limit: int, name: str, what: str = "token id", of: str = "the vocabulary") -> torch.Tensor:
    """`ids` (ints, an array or a tensor, any shape) as a flat int64 tensor (on the tensor's device, else the CPU),
    each in [0, limit). The one place the toolkit checks ids: TypeError for non-integers (int(1.7) read id 1),
    IdOutOfRange naming the argument `name`, the first bad id, its position and the range (an out-of-range id
    otherwise failed deep inside torch, or silently read from the end of a table). One min/max pass."""
    if not torch.is_tensor(ids):
        ids = np.asarray(ids)
        if ids.size == 0:  # np.asarray([]) is float64: no ids is the caller's to refuse (or accept), not a dtype
            ids = ids.astype(np.int64)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{name}: {what}s must be integers, got dtype {ids.dtype}")
        ids = torch.from_numpy(ids.astype(np.int64))
    elif ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name}: {what}s must be integers, got dtype {ids.dtype}")
    t = ids.reshape(-1).to(torch.int64)
    if t.numel():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host sync on a GPU
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            pos = int((t == bad).nonzero()[0, 0])
            raise IdOutOfRange(f"{name}: {what} {bad} is outside {of} [0, {limit}) (at position {pos})")
    return t


def check_token_ids(model: Transformer, tokens, name: str = "tokens") -> torch.Tensor:
    """tokens (None = the whole vocabulary, or ints / an array / a tensor) -> 1-D int64 tensor on the model's
    device, each checked to lie in [0, V) (checked_ids; errors name the argument `name`)."""
    V = model.config.vocab_size
    device = model.output.weight.device  # (the embedding may be in host memory: offload_embedding)
    if tokens is None:
        return torch.arange(V, device=device)
    return checked_ids(tokens, V, name).to(device)


def check_token_set(model: Transformer, tokens, name: str = "tokens") -> torch.Tensor | None:
    """None (the vocabulary) or check_token_ids' tensor, refused when an id repeats (ValueError naming it). For the
    analyses of a set of tokens: a token stream passed as `tokens` listed a token twice in a key's inverted index,
    and its repeats made cosine-1 cliques that pushed the clustering coefficient towards 1 (1.0 for 3 tokens x 3)."""
    if tokens is None:
        return None
    ids = check_token_ids(model, tokens, name)
    s = ids.sort().values
    rep = s[1:][s[1:] == s[:-1]]
    if rep.numel():
        raise ValueError(f"{name}: token id {int(rep[0])} occurs more than once; give each token once "
                         "(np.unique(ids) for the tokens of a text)")
    return ids


def check_token(model: Transformer, token, name: str = "token") -> int:
    """One token id (an int, not 1.7) in [0, V), as an int."""
    ids = check_token_ids(model, [token], name)
    if ids.numel() != 1:
        raise ValueError(f"{name} must be one token id, got {token!r}")
    return int(ids[0])


def check_id_stream(model: Transformer, ids, name: str = "ids") -> np.ndarray:
    """A text of token ids (1-D: numpy, a list or a tensor) as int64 numpy, each in [0, V) (checked_ids): a float
    text was truncated to ids, and an id past the vocabulary failed inside the loss ('Target 300 is out of
    bounds')."""
    ndim = ids.ndim if hasattr(ids, "ndim") else np.ndim(ids)
    if ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got {ndim} dimensions")
    return checked_ids(ids, model.config.vocab_size, name).cpu().numpy()


@torch.inference_mode()
def memory_rows(model: Transformer, tokens, layer) -> torch.Tensor:
    """The unscaled memory value (what a ToL stores) of `tokens` [N] at `layer`: [N, d] float32.

    Works before and after `swap_ffn_for_tol`: FFN_l(norm_m,l(E[t])) through the model's own MemoryFFN,
    or the ToL row itself. Inside an `edited_rows` block it gives the edited rows, as the model reads them
    (nested blocks too).
    """
    require_memory(model)
    layer = check_layer(model, layer)
    return _rows(model, model.layers[layer].memory, check_token_ids(model, tokens), layer)


def _rows(model: Transformer, m, ids: torch.Tensor, layer: int) -> torch.Tensor:
    from .edits import RowOverride  # (edits.py imports this module)

    if isinstance(m, MemoryFFN):
        return m.lookup(model.tok_embeddings(ids)).float()
    if isinstance(m, ToLMemory):  # one shared [V, L, d] table
        table = m.store.checked()  # a mapped file that changed raises OSError, not SIGBUS
        return table[ids.to(table.device), layer].float().to(ids.device)
    if isinstance(m, RowOverride):  # the rows it wraps (themselves edited when blocks nest), plus its delta
        j = m.slot[ids]
        return _rows(model, m.inner, ids, layer) + torch.where((j >= 0)[:, None], m.delta[j.clamp(min=0)], 0.0)
    raise ValueError(f"layer {layer}'s memory module ({type(m).__name__}) is neither a MemoryFFN nor a ToLMemory: "
                     "the toolkit reads rows from the FFN or from an in-memory ToL (swap_ffn_for_tol)")


# ---------------------------------------------------------------- tokens <-> names
class TokenNames:
    """Printable names of token ids: the decoded text in repr() form (so spaces and newlines show), or '#id'
    when there is no tokenizer."""

    def __init__(self, tokenizer=None, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._cache: dict[int, str] = {}

    def __call__(self, i) -> str:
        i = int(i)
        if i not in self._cache:
            if self.tokenizer is None:
                self._cache[i] = f"#{i}"
            else:
                try:
                    text = self.tokenizer.decode([i])
                except Exception:  # a special or byte-fragment id some decoders refuse: still show something
                    text = None
                # a lone byte of a multi-byte character decodes to U+FFFD; the id tells such tokens apart
                self._cache[i] = f"#{i}" if text is None else repr(text) + (f"#{i}" if "\ufffd" in text else "")
        return self._cache[i]

    def md(self, i) -> str:
        """The name for a markdown table cell (pipes and backticks escaped)."""
        return "`" + self(i).replace("`", "'").replace("|", "\\|") + "`"

    def many(self, ids, md: bool = False, sep: str = " ") -> str:
        f = self.md if md else self
        return sep.join(f(i) for i in ids)


def resolve_token(tokenizer, text: str, vocab_size: int, option: str = "--token") -> tuple[int, str]:
    """A user's token string -> (id, note). '#123' is the raw id 123.

    Otherwise the text must encode to exactly one token. When the text has no leading space and both
    'king' and ' king' are single tokens, the space-prefixed one is chosen: in a GPT-2-style byte-level
    BPE that is the word at the start of a word, while 'king' alone is usually a word piece ('spea|king').
    The note then names the other token and how to pick it with `option` (the command-line flag).
    Raises ValueError for unknown or multi-token strings, naming the pieces.
    """
    if text.startswith("#") and text[1:].isdigit():
        i = int(text[1:])
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab_size})")
        return i, f"raw id {i}"
    if tokenizer is None:
        raise ValueError(f"no tokenizer to look up {text!r}; pass a raw id as '#ID'")
    if not text:
        raise ValueError("empty token string")
    cands = [text] if text.startswith(" ") else [" " + text, text]
    found = [(c, tokenizer.encode(c)) for c in cands]
    single = [(c, ids[0]) for c, ids in found if len(ids) == 1]
    if not single:
        pieces = "; ".join(f"{c!r} -> {[tokenizer.decode([i]) for i in ids]}" for c, ids in found)
        raise ValueError(f"unknown token {text!r}: it is not a single token of this vocabulary ({pieces}); "
                         "pass one token (e.g. one of those pieces) or a raw id as '#ID'")
    c, i = single[0]
    note = f"{c!r} is token {i}"
    if len(single) > 1:
        # only the raw id can pick it: a shell strips quotes around 'king', and "'king'" is three tokens;
        # the id is quoted because an unquoted # starts a shell comment
        note += f" (also {single[1][0]!r} = {single[1][1]}; pass {option} '#{single[1][1]}' to pick it)"
    return int(i), note


# ---------------------------------------------------------------- runs
@dataclass
class RunHandle:
    """A loaded run: the model (eval mode), its config.json contents, its tokenizer and the run folder."""

    model: Transformer
    config: dict
    tokenizer: object
    path: Path

    @property
    def names(self) -> TokenNames:
        return TokenNames(self.tokenizer, self.model.config.vocab_size)

    def token_ids(self, split: str = "val") -> np.ndarray:
        """The run's training ('train') or validation ('val') token ids (cached by the model's data module)."""
        from ..model.train import run_tokens

        ids, _ = run_tokens(self.config, self.path, split)
        return np.asarray(ids)


def open_run(run: str | os.PathLike, device: str = "cpu") -> RunHandle:
    """Load a run written by `memllm train` (FileNotFoundError / ValueError for a missing or damaged run)."""
    from ..model.data import load_run_tokenizer
    from ..model.train import load_run

    run = Path(run)
    model, cfg = load_run(run, device)
    tok = load_run_tokenizer(run, cfg["tokenizer"])
    return RunHandle(model, cfg, tok, run)


def token_counts(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id occurs in `ids`: [V] int64."""
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
