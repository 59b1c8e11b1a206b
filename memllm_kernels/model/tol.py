"""Token-wise lookups (ToLs): precompute every memory FFN for the whole vocabulary, store, check, swap in.

    ToL[v, l, :] = FFN_l(norm_m,l(E[v]))      token-major [V, L, d] (paper section 2.3.2)

For Flex models the table holds FFN-M only; FFN-C reads the residual stream and stays an FFN.

File format: a plain safetensors file with one tensor "tol" [V, L, d] and string metadata:
    format "memllm-tol", version, config (the model's ModelConfig as JSON), dtype, weights_sha256 (see
    `weights_checksum`), layout, data_crc32 (the crc32 of each 64 MiB block of the data, in hex, comma-separated:
    `DataCheck`; files written before it have none, and are read unchecked). It is written in vocabulary chunks straight to disk: we write the
    safetensors header ourselves (8-byte little-endian header length, JSON padded with spaces to a
    multiple of 8, then the raw row-major data), so peak memory is one chunk (64 MiB by default), not
    the table -- the 1b preset's table is 12.6 GB in bf16, more than half of a 24 GB machine.
Any safetensors reader opens the result; `load_tol` additionally refuses a file that does not belong
to the model, is truncated, or has a corrupted header, with a ValueError that names the file. Readers that read the
whole table (load_tol(mmap=False), the host tier) also compare its data with data_crc32 as they read; a mapped
table or the disk tier reads rows on demand, unchecked: `verify_tol` (`memllm check`) reads the file once to check.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import weakref
import zlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .. import _checks, ops, reference
from ..offload import ops as offload_ops
from ..offload.tiers import MAPPED, map_tol
from .config import ModelConfig
from .model import MemoryFFN, Transformer

TOL_FORMAT = "memllm-tol"
TOL_VERSION = "1"
TENSOR = "tol"
DEFAULT_CHUNK_BYTES = 64 << 20
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _st_dtype(dtype) -> str:
    """The safetensors name of a ToL file's dtype; TypeError for any other (float64 failed as a bare KeyError)."""
    if dtype not in _ST_DTYPE:
        raise TypeError(f"a ToL's dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return _ST_DTYPE[dtype]
_TORCH_DTYPE = {v: k for k, v in _ST_DTYPE.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# Bytes of table data per crc32 in the header: 188 blocks (1.7 KB of header) for the 1b preset's 12.6 GB; crc32
# runs at 2.6 GB/s on one core of the 2-core AMD EPYC VM (blake2b 0.6, sha256 1.2), so a check adds ~5 s to a read
# of that table. Per block, so that an error names the token rows that changed.
DATA_CRC_BLOCK = 64 << 20
DATA_CRC_KEY = "data_crc32"


# ---------------------------------------------------------------- weights the table comes from
def _memory_ffns(model: Transformer) -> list[MemoryFFN]:
    cfg = model.config
    if not cfg.has_memory:
        raise ValueError(f"{cfg.name} is a dense model (kind 'dense'): it has no memory FFN to turn into a "
                         "ToL; only memoryllm and flex1/2/3 models have one")
    mems = model.memory_modules()
    if not all(isinstance(m, MemoryFFN) for m in mems):
        raise ValueError("this model's memory FFNs were already swapped for a ToL; use the FFN model")
    return mems


def source_tensors(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """The tensors a ToL is a function of, in a fixed order: the embedding, then per layer the memory
    norm and the memory FFN's gate, up and down weights."""
    mems = _memory_ffns(model)
    out = [("tok_embeddings.weight", model.tok_embeddings.weight)]
    for i, m in enumerate(mems):
        out += [(f"layers.{i}.memory.norm.weight", m.norm.weight),
                (f"layers.{i}.memory.ffn.w_gate.weight", m.ffn.w_gate.weight),
                (f"layers.{i}.memory.ffn.w_up.weight", m.ffn.w_up.weight),
                (f"layers.{i}.memory.ffn.w_down.weight", m.ffn.w_down.weight)]
    return out


def weights_checksum(model: Transformer) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of `source_tensors(model)`: equal iff the ToL would be.

    About 1 s per GB of weights on one core (the 1b preset's 7 GB of float32 sources: ~7 s).
    """
    h = hashlib.sha256()
    for name, t in source_tensors(model):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # buffer protocol: no copy of the bytes
    return h.hexdigest()


# ---------------------------------------------------------------- precompute
def chunk_tokens_for(cfg: ModelConfig, dtype: torch.dtype, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Vocabulary rows per chunk so one [C, L, d] chunk takes about chunk_bytes (at least 1 row)."""
    chunk_bytes = _checks.int_at_least("chunk_bytes", chunk_bytes, 1)
    row = cfg.n_layer * cfg.d_model * torch.empty(0, dtype=dtype).element_size()
    return max(1, min(cfg.vocab_size, chunk_bytes // row))


@torch.inference_mode()
def iter_tol_chunks(model: Transformer, chunk_tokens: int, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield the ToL in vocabulary order as CPU chunks [C, L, d] (C = chunk_tokens, the last one shorter).

    Computed on the model's device in the model's dtype, rounded once to `dtype` (default: the
    embedding's dtype). Only one chunk and its FFN activations ([C, K_M] x 3) are alive at a time.
    """
    mems = _memory_ffns(model)
    if isinstance(model.tok_embeddings, HostEmbedding):
        raise ValueError("the model's token embedding was moved to host memory for inference (offload_embedding): "
                         "precompute the ToL before that")
    emb = model.tok_embeddings.weight
    dtype = dtype or emb.dtype
    V, L, d = emb.shape[0], len(mems), emb.shape[1]
    for start in range(0, V, chunk_tokens):
        x0 = emb[start:start + chunk_tokens]
        out = torch.empty(x0.shape[0], L, d, dtype=dtype, device=emb.device)
        for l, m in enumerate(mems):
            out[:, l] = m.lookup(x0)  # the unscaled value: alpha and dropped layers apply at run time
        if not bool(torch.isfinite(out).all()):  # one sync per chunk (~190 at 1b): a NaN table is no ToL
            raise ValueError(f"the memory FFNs give non-finite outputs for tokens {start}..{start + len(x0) - 1} "
                             f"(in {dtype}): the model's weights hold NaN/inf, or its outputs overflow {dtype}")
        yield out.cpu()


def _header_bytes(shape, dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    nbytes = 1
    for s in shape:
        nbytes *= s
    nbytes *= torch.empty(0, dtype=dtype).element_size()
    header = {"__metadata__": metadata,
              TENSOR: {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [0, nbytes]}}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # pad like safetensors does, so the data starts 8-byte aligned (mmap views)
    return struct.pack("<Q", len(hb)) + hb


def write_tol_file(path: str | os.PathLike, chunks, shape, dtype: torch.dtype, metadata: dict[str, str],
                   *, progress=None) -> int:
    """Stream `chunks` (tensors whose row-major concatenation is the [V, L, d] table) into a safetensors
    file. Writes `<path>.partial` (ValueError if that exists) and renames it at the end, so `path` is complete
    or absent.

    progress: optional callable(rows_written) after each chunk. Returns the file size in bytes.
    """
    _st_dtype(dtype)
    path = Path(path)
    if path.exists() and not path.is_file():  # the rename would replace a folder's entry or a device node
        raise ValueError(f"{path} exists and is not a regular file; write the ToL somewhere else")
    expected = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
    # The data's crc32s go in the header, which precedes the data: written with placeholders of the same length
    # first, and again at the end.
    crcs = [0] * -(-expected // DATA_CRC_BLOCK)
    head = _header_bytes(shape, dtype, _with_crcs(metadata, crcs))
    crc = block_fill = 0  # the running crc32 of the block being written, and its bytes so far
    tmp = Path(f"{path}.partial")
    written = rows = 0
    try:  # created, never truncated: a file of that name is not ours to overwrite (nor, below, to delete)
        f = open(tmp, "xb")
    except FileExistsError:
        raise ValueError(f"{tmp} exists (what an interrupted write left, or a file of yours): remove it, or write "
                         "the ToL somewhere else") from None
    try:
        with f:
            f.write(head)
            for chunk in chunks:
                if chunk.dtype != dtype or tuple(chunk.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(f"chunk {tuple(chunk.shape)} {chunk.dtype} does not fit a {tuple(shape)} "
                                     f"{dtype} table")
                buf = chunk.cpu().contiguous().view(-1).view(torch.uint8).numpy()
                f.write(buf)
                at = 0
                while at < buf.nbytes and written + at < expected:  # split at block boundaries
                    take = min(buf.nbytes - at, DATA_CRC_BLOCK - block_fill)
                    crc = zlib.crc32(buf[at:at + take], crc)
                    at, block_fill = at + take, block_fill + take
                    if block_fill == DATA_CRC_BLOCK or written + at == expected:
                        crcs[(written + at - 1) // DATA_CRC_BLOCK] = crc
                        crc = block_fill = 0
                written += buf.nbytes
                rows += chunk.shape[0]
                if progress is not None:
                    progress(chunk.shape[0])
            if written != expected:
                raise ValueError(f"chunks held {rows} rows ({written} bytes), the table needs {shape[0]} "
                                 f"({expected} bytes)")
            final = _header_bytes(shape, dtype, _with_crcs(metadata, crcs))
            assert len(final) == len(head)  # fixed-width hex: the data stays where it is
            f.seek(0)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())  # on storage before the rename: a crash leaves the old file or the whole new one
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder refuses the unlink too: the first error is the one to report
            pass
        raise
    return len(head) + written


def _with_crcs(metadata: dict[str, str], crcs: list[int]) -> dict[str, str]:
    return {**metadata, DATA_CRC_KEY: ",".join(f"{c:08x}" for c in crcs)}


def tol_metadata(model: Transformer, dtype: torch.dtype) -> dict[str, str]:
    return {"format": TOL_FORMAT, "version": TOL_VERSION, "config": model.config.to_json(),
            "dtype": _st_dtype(dtype), "weights_sha256": weights_checksum(model),
            "layout": "token-major [V, L, d]: tol[v, l] = FFN_l(norm_m,l(E[v]))"
                      + (" (FFN-M of Flex)" if model.config.is_flex else "")}


def precompute_tol(model: Transformer, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool = False) -> dict:
    """Compute the model's ToL and stream it to `path` (overwrites: callers check first).

    Returns {path, shape, dtype, bytes, chunks, chunk_tokens, seconds}.
    """
    emb = model.tok_embeddings.weight
    dtype = dtype or emb.dtype
    cfg = model.config
    meta = tol_metadata(model, dtype)  # also raises for dense / swapped models before any work
    shape = (cfg.vocab_size, cfg.n_layer, cfg.d_model)
    ct = chunk_tokens_for(cfg, dtype, chunk_bytes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.vocab_size, unit="tok", desc=f"precompute {Path(path).name}")
    t0 = time.perf_counter()
    try:
        size = write_tol_file(path, iter_tol_chunks(model, ct, dtype), shape, dtype, meta,
                              progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    return {"path": str(path), "shape": list(shape), "dtype": _ST_DTYPE[dtype], "bytes": size,
            "chunks": -(-cfg.vocab_size // ct), "chunk_tokens": ct, "seconds": time.perf_counter() - t0}


def estimate_tol(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 weight_dtype: torch.dtype = torch.float32) -> dict:
    """Sizes of a precompute without running it: table bytes, chunks, and the peak memory beyond the model
    (one chunk in `dtype`, one [C, L, d] copy on the device, and the FFN's [C, K_M] activations)."""
    if not cfg.has_memory:
        raise ValueError(f"{cfg.name} is dense: no ToL")
    _st_dtype(dtype)
    es = torch.empty(0, dtype=dtype).element_size()
    ws = torch.empty(0, dtype=weight_dtype).element_size()
    ct = chunk_tokens_for(cfg, dtype, chunk_bytes)
    table = cfg.vocab_size * cfg.n_layer * cfg.d_model * es
    work = 2 * ct * cfg.n_layer * cfg.d_model * es + 4 * ct * max(cfg.ffn_memory_hidden, cfg.d_model) * ws
    from .config import param_counts

    c = param_counts(cfg)
    return {"shape": [cfg.vocab_size, cfg.n_layer, cfg.d_model], "dtype": _ST_DTYPE[dtype], "table_bytes": table,
            "chunk_tokens": ct, "chunks": -(-cfg.vocab_size // ct), "work_bytes": work,
            "model_bytes": c["total"] * ws, "flops": 2 * 3 * cfg.vocab_size * cfg.n_layer * cfg.d_model
            * cfg.ffn_memory_hidden}


# ---------------------------------------------------------------- read and check
def read_tol_header(path: str | os.PathLike) -> tuple[dict[str, str], dict, int]:
    """Parse and validate a ToL file's header without reading its data.

    Returns (metadata, tensor entry {dtype, shape, data_offsets}, byte offset of the data).
    Raises FileNotFoundError, or ValueError naming the file for a truncated file or corrupted header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ToL file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ValueError(f"{path}: truncated ToL file: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw_len)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: corrupted or truncated safetensors header: it declares {n} header "
                             f"bytes but the file has {size} bytes in all")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also a 4,301-digit number (int's limit), arrays nested 10,000 deep
        raise ValueError(f"{path}: corrupted safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupted safetensors header (__metadata__ is a JSON {type(meta).__name__})")
    if meta.get("format") != TOL_FORMAT:
        raise ValueError(f"{path}: not a memllm ToL file (metadata format={meta.get('format')!r}, expected "
                         f"{TOL_FORMAT!r}); write one with `memllm precompute`")
    if meta.get("version", TOL_VERSION) != TOL_VERSION:  # a later layout would be read as this one's
        raise ValueError(f"{path}: ToL format version {meta['version']!r}, but this memllm-kernels reads version "
                         f"{TOL_VERSION!r}; write the table again with this version's `memllm precompute`")
    entry = header.get(TENSOR)
    try:
        dtype = _TORCH_DTYPE[entry["dtype"]]
        shape, offsets = list(entry["shape"]), list(entry["data_offsets"])
        if not all(type(v) is int and v >= 0 for v in shape + offsets) or len(offsets) != 2:  # JSON ints only
            raise ValueError(f"shape {shape} and data_offsets {offsets} must be non-negative integers")
        begin, end = offsets
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: corrupted header: bad or missing entry for tensor {TENSOR!r} ({e})") from None
    if meta.get("dtype", entry["dtype"]) != entry["dtype"]:  # precompute writes both: one was edited
        raise ValueError(f"{path}: corrupted header: the tensor is {entry['dtype']} but the metadata says "
                         f"{meta['dtype']}")
    if (8 + n) % 8:  # every safetensors writer pads to 8; unaligned data cannot be viewed as the table in place
        raise ValueError(f"{path}: corrupted header: its length {n} leaves the data unaligned (safetensors pads "
                         "headers to a multiple of 8 bytes)")
    if len(shape) != 3 or 0 in shape:  # an empty table passed here, and its reads failed without naming the file
        raise ValueError(f"{path}: corrupted header: ToL shape {shape} is not [V, L, d] with V, L, d >= 1")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: torch.Size's numel wraps past 2**63
    if begin != 0 or end != nbytes:
        raise ValueError(f"{path}: corrupted header: data_offsets [{begin}, {end}] do not fit shape {shape} "
                         f"{entry['dtype']} ({nbytes} bytes)")
    DataCheck(path, meta, entry)  # a malformed data_crc32 is a corrupted header too
    expected = 8 + n + nbytes
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(f"{path}: {what}: {size} bytes on disk, the header describes {expected} "
                         f"({shape} {entry['dtype']})")
    return meta, entry, 8 + n


class DataCheck:
    """A ToL file's data against the crc32 of each DATA_CRC_BLOCK bytes in its header (data_crc32), block by block
    as a reader reads them in order. A file without data_crc32 (written before it) is read unchecked (`enabled`
    False). ValueError for a malformed data_crc32 (at construction) and for a block that differs (naming its token
    rows)."""

    def __init__(self, path, meta: dict, entry: dict):
        self.path, self.nbytes = path, entry["data_offsets"][1]
        self.row_bytes = self.nbytes // max(1, entry["shape"][0])
        self.crcs, self.done = None, 0  # the file's crc32s; the blocks checked so far
        text = meta.get(DATA_CRC_KEY)
        if text is None:
            return
        n = -(-self.nbytes // DATA_CRC_BLOCK)
        parts = text.split(",") if isinstance(text, str) and text else []
        if len(parts) != n or not all(len(p) == 8 and set(p) <= set("0123456789abcdef") for p in parts):
            raise ValueError(f"{path}: corrupted header: {DATA_CRC_KEY} is not {n} crc32s in hex (one per "
                             f"{DATA_CRC_BLOCK >> 20} MiB of its {self.nbytes} data bytes)")
        self.crcs = [int(p, 16) for p in parts]

    @property
    def enabled(self) -> bool:
        return self.crcs is not None

    def block(self, b: int, data) -> None:
        """Compare data (a buffer of block b's bytes) with block b's crc32."""
        if zlib.crc32(data) != self.crcs[b]:
            lo, hi = b * DATA_CRC_BLOCK, min((b + 1) * DATA_CRC_BLOCK, self.nbytes)
            raise ValueError(f"{self.path}: corrupted data: bytes {lo} to {hi - 1} of its table (token rows "
                             f"{lo // self.row_bytes} to {(hi - 1) // self.row_bytes}) differ from what memllm "
                             "precompute wrote (their crc32 in the header): the file was damaged after it was "
                             f"written; compute it again ({_precompute_hint(self.path)})")

    def upto(self, data, n: int) -> None:
        """data: a buffer of the table's data bytes, of which the first n have been read: checks each block that is
        complete in them and not yet checked."""
        if self.crcs is None:
            return
        while self.done < len(self.crcs):
            lo = self.done * DATA_CRC_BLOCK
            hi = min(lo + DATA_CRC_BLOCK, self.nbytes)
            if hi > n:
                return
            self.block(self.done, data[lo:hi])
            self.done += 1


def verify_tol(path: str | os.PathLike, model: Transformer | None = None, *, progress: bool = False) -> dict:
    """Read a ToL file once and compare its data with the crc32s in its header (and its header with `model`, if
    given): what the disk tier and a mapped table, which read rows on demand, never do. ValueError naming the file
    and the token rows of a damaged block. The file's pages are dropped from the page cache behind the reads.
    progress: a tqdm bar in bytes. Returns {path, bytes, blocks (0: the file has no checksums), seconds}."""
    meta, entry, offset = read_tol_header(path)
    if model is not None:
        check_tol_matches(path, meta, entry["shape"], model)
    check = DataCheck(path, meta, entry)
    nbytes = entry["data_offsets"][1]
    t0 = time.perf_counter()
    if check.enabled:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"check {Path(path).name}")
        buf = bytearray(min(DATA_CRC_BLOCK, nbytes))
        try:
            with open(path, "rb", buffering=0) as f:
                fd = f.fileno()
                f.seek(offset)
                for b in range(len(check.crcs)):
                    lo = b * DATA_CRC_BLOCK
                    view = memoryview(buf)[:min(DATA_CRC_BLOCK, nbytes - lo)]
                    got = 0
                    while got < len(view):
                        k = f.readinto(view[got:])
                        if not k:
                            raise ValueError(f"{path}: truncated while reading ({lo + got} of {nbytes} data bytes)")
                        got += k
                    check.block(b, view)
                    if hasattr(os, "posix_fadvise"):  # a check, not a read to keep: leave the page cache as it was
                        os.posix_fadvise(fd, offset + lo, len(view), os.POSIX_FADV_DONTNEED)
                    if bar is not None:
                        bar.update(len(view))
        finally:
            if bar is not None:
                bar.close()
    return {"path": str(path), "bytes": nbytes, "blocks": len(check.crcs) if check.enabled else 0,
            "seconds": time.perf_counter() - t0}


def check_tol_matches(path, meta: dict[str, str], shape, model: Transformer) -> None:
    """Raise ValueError (naming the file) unless the ToL was computed from exactly this model's weights."""
    cfg = model.config
    if not cfg.has_memory:
        raise ValueError(f"{cfg.name} is a dense model: it has no memory FFN a ToL could replace")
    want = [cfg.vocab_size, cfg.n_layer, cfg.d_model]
    if list(shape) != want:
        raise ValueError(f"{path}: ToL shape {list(shape)} does not match the model's [V, L, d] = {want}")
    try:
        theirs = json.loads(meta.get("config", ""))
    except (ValueError, TypeError, RecursionError):  # RecursionError: arrays nested 10,000 deep
        theirs = None
    if not isinstance(theirs, dict):
        raise ValueError(f"{path}: corrupted metadata: 'config' is not a JSON object")
    ours = cfg.to_dict()
    diff = sorted(k for k in set(ours) | set(theirs) if k != "name" and ours.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"{path}: ToL was computed for another model config; differing fields: "
                         + ", ".join(f"{k} (file {theirs.get(k)!r}, model {ours.get(k)!r})" for k in diff))
    have = weights_checksum(model)
    if meta.get("weights_sha256") != have:
        raise ValueError(f"{path}: ToL was computed from other weights (weights_sha256 "
                         f"{meta.get('weights_sha256')} in the file, {have} for this model); rerun "
                         f"`{_precompute_hint(path)}` for this model (it replaces the stale file)")


def _precompute_hint(path) -> str:
    """The command that writes the ToL at `path` again: a run's own file (RUN/tol.safetensors) names its run."""
    path = Path(path)
    if path.name == "tol.safetensors":
        return f"memllm precompute {path.parent} --force"
    return f"memllm precompute RUN --out {path} --force"


def load_tol(path: str | os.PathLike, model: Transformer | None = None, *, mmap: bool = True) -> torch.Tensor:
    """Read a ToL file as a CPU tensor [V, L, d], after checking it belongs to `model` (if given).

    mmap=True maps the file (private, copy-on-write): rows are paged in from disk as lookups touch
    them, so a table larger than RAM still opens. mmap=False reads it all into memory and compares it with the
    crc32s in its header (DataCheck; ValueError naming the damaged rows). A mapped table
    put in a model (swap_ffn_for_tol) is checked before each layer's read: OSError once its file has
    been truncated or written in place (a read past a truncated file's end is SIGBUS, which kills the
    process); reads of it elsewhere are not.
    """
    if mmap:
        table, watch, _, _ = map_tol(path, model)
        MAPPED[table] = watch  # (where TokenLookupTable finds it; the file stays open while the table lives)
        return table
    meta, entry, offset = read_tol_header(path)
    shape, dtype = entry["shape"], _TORCH_DTYPE[entry["dtype"]]
    if model is not None:
        check_tol_matches(path, meta, shape, model)
    out = torch.empty(shape, dtype=dtype)
    with open(path, "rb") as f:
        f.seek(offset)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        got = f.readinto(view)
    if got != entry["data_offsets"][1]:
        raise ValueError(f"{path}: truncated while reading ({got} of {entry['data_offsets'][1]} data bytes)")
    DataCheck(path, meta, entry).upto(view, got)
    return out


# ---------------------------------------------------------------- the swap
class TokenLookupTable(nn.Module):
    """Holds the [V, L, d] table once; every layer's ToLMemory shares this module, so `model.to()` moves
    the table once (a second visit finds it already moved) and state_dict() leaves it out."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.watch = MAPPED.get(table)  # a table load_tol mapped: its file's FileWatch

    def checked(self) -> torch.Tensor:
        """The table, after checking that the file load_tol mapped it from has neither shrunk nor been written in
        place (an fstat: 4 us a layer in all on a 2-core AMD EPYC VM, where a CPU forward takes milliseconds): `memllm
        eval --tol` on the CPU read a truncated file's mapping, and SIGBUS killed it. Not while torch.compile traces
        (no Python there), nor once model.to() copied the table."""
        table = self.table
        if not torch.compiler.is_compiling() and self.watch is not None:
            self.watch = MAPPED.get(table)  # None once moved or cast: a copy, which no file change reaches
            if self.watch is not None:
                self.watch.check()
        return table


class ToLMemory(nn.Module):
    """Layer `layer`'s memory term as a lookup: h + scale * ToL[ids, layer], via memllm_kernels' ops."""

    def __init__(self, store: TokenLookupTable, layer: int, scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.store, self.layer, self.scale, self.backend = store, layer, scale, backend

    def forward(self, h: torch.Tensor, x0: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """h: [B, T, d], updated in place unless it is x0 (the first layer's h, which later layers read);
        x0: [B, T, d]; ids: [B, T]. Returns h + scale * ToL[ids, layer]."""
        if self.scale == 0.0:
            return h
        table = self.store.checked()
        if self.scale != 1.0:
            # The op adds rows unscaled. alpha != 1 is an analysis knob (paper Table 1), not the serving
            # path, so a plain torch gather does it rather than a scaled copy of the whole table.
            return h + self.scale * reference.tol_rows(table, ids, self.layer).to(h.dtype)
        grad = torch.is_grad_enabled() and h.requires_grad
        if torch.compiler.is_compiling() and not grad:
            # Compiled, the row is read by indexing: Inductor fuses the gather with the residual add and the next
            # layer's norm into one kernel (the op is opaque to it: a kernel of its own per layer). The same
            # arithmetic as the op (one rounding of h + row), and no copy of the table (checked in the tests).
            return reference.tol_gather_add(h, ids, table, self.layer)
        if grad or h is x0:
            return ops.tol_gather_add(h, ids, table, self.layer, backend=self.backend, check_ids=False)
        # check_ids=False: the model's forward already rejected any id outside [0, V) (its embedding lookup on
        # the CPU, its check on a GPU unless the caller checked: generate, DecodeGraph), and V is the table's row
        # count (swap_ffn_for_tol checks), so the check would only add a pass over ids (and a device sync on
        # CUDA) per layer.
        with torch.no_grad():
            return ops.tol_gather_add_(h, ids, table, self.layer, backend=self.backend, check_ids=False)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, scale={self.scale}, backend={self.backend!r}"


def _check_swap(model: Transformer, shape: tuple, device: torch.device, what: str, fix: str) -> None:
    """What a swap of the memory FFNs for a lookup needs: a model with memory FFNs not yet swapped, and a table
    of the model's [V, L, d] on the model's device."""
    cfg = model.config
    if not cfg.has_memory:
        raise ValueError(f"{cfg.name} is a dense model (kind 'dense'): it has no memory FFN to swap for a ToL")
    if any(not isinstance(m, MemoryFFN) for m in model.memory_modules()):
        raise ValueError("this model's memory FFNs were already swapped for a ToL")
    want = (cfg.vocab_size, cfg.n_layer, cfg.d_model)
    if tuple(shape) != want:
        raise ValueError(f"{what} shape {tuple(shape)} does not match the model's [V, L, d] = {list(want)}")
    model_device = model.output.weight.device  # (the embedding may be in host memory: offload_embedding)
    if device != model_device:
        raise ValueError(f"{what} is on {device} but the model is on {model_device}; {fix}")


def swap_ffn_for_tol(model: Transformer, tol: torch.Tensor, *, backend: str = "auto") -> Transformer:
    """Replace every layer's memory FFN by a lookup in `tol` [V, L, d]; FFN-C of Flex models stays.

    In place (returns `model`): the memory FFN weights are dropped, which is the point. The memory scale
    (alpha, dropped layers) carries over. `tol` must already be on the model's device: moving a
    multi-GB table is the caller's decision. Use load_tol(path, model) first to check a file belongs to
    the model; this function checks shapes only.
    """
    if not isinstance(tol, torch.Tensor) or not tol.is_floating_point():
        what = f"a {tol.dtype} tensor" if isinstance(tol, torch.Tensor) else type(tol).__name__
        raise TypeError(f"swap_ffn_for_tol: tol must be a float tensor [V, L, d], got {what}")
    _check_swap(model, tuple(tol.shape), tol.device, "ToL", "move one of them first")
    store = TokenLookupTable(tol)
    for i, block in enumerate(model.layers):
        block.memory = ToLMemory(store, i, block.memory.scale, backend)
    return model


# ---------------------------------------------------------------- the swap onto the offload engine
# The engine's per-layer read as an opaque op, so that torch.compile traces a model reading through an engine
# whole (no graph break per layer): the op's body is the engine's Python (which step buffer, which events,
# counting), run at call time. Engines are named by a handle, as an op takes no Python objects.
_ENGINES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


@torch.library.custom_op("memllm::engine_gather_add_", mutates_args=("hidden",))
def _engine_gather_add_(hidden: torch.Tensor, ids: torch.Tensor, layer: int, engine: int) -> None:
    """hidden += ToL[ids, layer] through the engine with handle `engine` (OffloadEngine.gather_add_)."""
    _engine(engine, "engine_gather_add_").gather_add_(hidden, ids, layer)


@_engine_gather_add_.register_fake
def _(hidden, ids, layer, engine):
    return None


@torch.library.custom_op("memllm::engine_step_rows", mutates_args=())
def _engine_step_rows(ids: torch.Tensor, engine: int) -> torch.Tensor:
    """ToL[ids] of every layer, [*ids.shape, L, d], through the engine with handle `engine`
    (OffloadEngine.step_rows)."""
    return _engine(engine, "engine_step_rows").step_rows(ids)


@_engine_step_rows.register_fake
def _(ids, engine):
    target = _engine(engine, "engine_step_rows")
    return ids.new_empty(*ids.shape, target.L, target.d, dtype=target.dtype)


def _engine(handle: int, op: str):
    target = _ENGINES.get(handle)
    if target is None:
        raise RuntimeError(f"{op}: the offload engine {handle} no longer exists")
    return target


class EngineMemory(nn.Module):
    """Layer `layer`'s memory term read through an OffloadEngine (memllm_kernels/offload): the table lives in
    host memory or on disk, hot rows in a device cache. h + scale * ToL[ids, layer], inference only."""

    def __init__(self, engine, layer: int, scale: float = 1.0):
        super().__init__()
        self.engine, self.layer, self.scale = engine, layer, scale
        self.handle = id(engine)
        _ENGINES[self.handle] = engine

    def step_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Every layer's rows of this step, [B, T, L, d] (one op; the model calls it once per compiled step)."""
        return torch.ops.memllm.engine_step_rows(ids, self.handle)

    def forward(self, h: torch.Tensor, x0: torch.Tensor, ids: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """h: [B, T, d], updated in place unless it is x0 (the first layer's h, which later layers read);
        x0: [B, T, d]; ids: [B, T]; rows: step_rows(ids) [B, T, L, d] or None.
        Returns h + scale * ToL[ids, layer].

        With rows (a compiled forward: Transformer.forward passes them), the layer's row is read from them by
        indexing and added out of place, which Inductor fuses with the residual add and the next norm."""
        if self.scale == 0.0:
            return h
        if torch.is_grad_enabled() and h.requires_grad:
            raise RuntimeError("the offload engine serves inference only; train with the memory FFNs or with "
                               "swap_ffn_for_tol on an in-memory table")
        if rows is not None:
            r = rows[..., self.layer, :]
            if self.scale != 1.0:
                return h + self.scale * r.to(h.dtype)
            acc = torch.promote_types(torch.promote_types(h.dtype, r.dtype), torch.float32)  # the op's one rounding
            return (h.to(acc) + r.to(acc)).to(h.dtype)
        with torch.no_grad():
            if self.scale != 1.0:  # an analysis knob (paper Table 1), as in ToLMemory
                rows = torch.zeros(*ids.shape, h.shape[-1], dtype=self.engine.dtype, device=h.device)
                self._gather_add_(rows, ids)
                return h + self.scale * rows.to(h.dtype)
            if h is x0:
                h = h.clone()
            self._gather_add_(h, ids)
            return h

    def _gather_add_(self, h: torch.Tensor, ids: torch.Tensor) -> None:
        # The op only where torch.compile traces: its dispatch costs ~22 us a call (measured on the CPU), 0.5 ms
        # per eager decode step at 24 layers, which the direct call does not.
        if torch.compiler.is_compiling():
            torch.ops.memllm.engine_gather_add_(h, ids, self.layer, self.handle)
        else:
            self.engine.gather_add_(h, ids, self.layer)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, scale={self.scale}"


def prefetch_for_forward(engine, ids: torch.Tensor, model: Transformer) -> None:
    """What a forward of `model` through `engine` does first (the model's pre-hook; compile_decode before its
    compiled step): engine.prefetch(ids), except while a CUDA graph is captured or when no layer reads its
    memory (every layer dropped: the rows would move, and be admitted, for nothing)."""
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # a DecodeGraph capture: it prefetches eagerly before each replay instead
    if not model.reads_memory():
        return
    # The step's ids are known before the embedding runs: start moving their rows now. On a GPU the range
    # check is left to the embedding lookup (a check here would cost a host sync per step).
    engine.prefetch(ids, check_ids=ids.device.type == "cpu")


def _prefetch_hook(engine):
    def hook(model, args, kwargs):
        prefetch_for_forward(engine, args[0] if args else kwargs["ids"], model)
    return hook


def swap_ffn_for_engine(model: Transformer, engine) -> Transformer:
    """Replace every layer's memory FFN by a lookup through `engine` (an OffloadEngine over this model's ToL).

    In place (returns `model`), like swap_ffn_for_tol; the memory scale carries over. It also registers a
    forward pre-hook on the model that calls engine.prefetch(ids) as soon as a forward starts (the prompt at
    prefill, the sampled token at decode), so every layer finds its rows moving or arrived; the handle is
    `model.tol_engine_hook` (remove() it to undo). Check the file against the model when building the
    engine (HostTable.from_file(path, model) / DiskTable(path, model)); here only shapes are checked.
    """
    _check_swap(model, (engine.V, engine.L, engine.d), engine.device, "engine table", "build the engine there")
    for i, block in enumerate(model.layers):
        block.memory = EngineMemory(engine, i, block.memory.scale)
    model.tol_engine = engine
    model.tol_engine_hook = model.register_forward_pre_hook(_prefetch_hook(engine), with_kwargs=True)
    return model


# ---------------------------------------------------------------- the token embedding in host memory
class HostEmbedding(nn.Module):
    """The token embedding E [V, d] kept in host memory: forward(ids [...]) -> E[ids] [..., d] on `device`,
    gathered by the device straight from page-locked memory (tol_host_gather; on a CPU, ordinary memory).

    Like a ToL row, E is read one row per token: a decode step moves d values (4 KiB at 1b in bf16) instead of
    the device holding all of E (0.53 GB at 1b). `weight` is the host tensor; it is neither a parameter nor a
    buffer, so model.to() leaves it where it is and state_dict() leaves it out (an inference deployment).
    Ids are range-checked on the CPU (eagerly); on a GPU the check would cost a host sync per step, and a
    compiled step cannot read values, so there an id outside [0, V) gives a NaN row (the kernel never reads
    outside E) -- generate() checks its prompts on the host.
    """

    def __init__(self, weight: torch.Tensor, device):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors name their GPU: cuda:0, not cuda
            self.device = torch.device("cuda", torch.cuda.current_device())
        if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError(f"HostEmbedding needs a contiguous [V, d] CPU tensor, got {list(weight.shape)} on "
                             f"{weight.device}")
        if self.device.type == "cuda" and not offload_ops.tol_host_mapped(weight):
            raise ValueError("HostEmbedding on a GPU needs page-locked, mapped memory (offload.tol_host_alloc)")
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device != self.device:
            raise RuntimeError(f"HostEmbedding: ids are on {ids.device}, the model on {self.device}")
        flat = ids.reshape(-1)
        out = torch.empty(flat.shape[0], self.embedding_dim, dtype=self.weight.dtype, device=self.device)
        if torch.compiler.is_compiling():  # the op itself: the wrapper's checks read tensor values
            torch.ops.memllm.tol_host_gather(self.weight, flat, out, None, False)
        else:
            offload_ops.tol_host_gather(self.weight, flat, out, check_ids=self.device.type == "cpu")
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host -> {self.device}"


def offload_embedding(model: Transformer, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Transformer:
    """Move the model's token embedding into host memory (HostEmbedding), freeing its [V, d] of device memory.

    In place (returns `model`); call it after the model is on its device. The copy is page-locked and mapped
    where a GPU is visible (tol_host_alloc) and is filled in chunks of about chunk_bytes. Raises for tied
    embeddings (the output head reads all of E every step, so E must stay on the device) and for an
    embedding already in host memory. The outputs do not change (a gather is exact).
    """
    if model.config.tie_embeddings:
        raise ValueError(f"{model.config.name} ties its embedding to the output head, which reads all of it every "
                         "step: it must stay on the device")
    emb = model.tok_embeddings
    if isinstance(emb, HostEmbedding):
        raise ValueError("the token embedding is already in host memory")
    w = emb.weight.detach()
    if w.device.type == "cuda" and offload_ops.pin_unavailable_reason() is not None:
        raise ValueError(f"cannot page-lock host memory for the embedding: {offload_ops.pin_unavailable_reason()}")
    host = offload_ops.tol_host_alloc(list(w.shape), w.dtype)
    rows = max(1, chunk_bytes // max(1, w.shape[1] * w.element_size()))
    for i in range(0, w.shape[0], rows):
        host[i:i + rows].copy_(w[i:i + rows])
    model.tok_embeddings = HostEmbedding(host, w.device)
    return model
