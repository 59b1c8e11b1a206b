"""The two storage tiers below the device cache: a ToL file read in place (disk) and an exact-size,
page-locked host copy of it (pinned host). Both expose `.table`, a CPU tensor [V, L, d] the kernels read.

    disk         DiskTable(path): the safetensors file mapped read-only (mmap, nothing loaded up front).
                 Rows page in from storage as they are gathered; random-access advice (no read-ahead of
                 neighbours: a 1b row is 96 KiB, the kernel's default read-ahead would pull unrelated
                 rows), so `read_rows` first asks for all of its rows at once (`willneed`: without it a
                 cold row came in 24 page faults, one 4 KiB read after another), and `page_cache_bytes`
                 bounds how much of the file stays mapped/cached (the rest is dropped after that many bytes
                 read).
    pinned host  HostTable.from_file(path): tol_host_alloc (anonymous mmap + cudaHostRegister, never the
                 caching pinned allocator, which rounds 47.7 GiB up to 64 GiB), filled from the file in
                 64 MiB chunks straight into that memory (no second copy, never on the GPU), with the
                 file's page cache dropped behind the reads so the table is not held twice in RAM.
                 On a machine without CUDA (or a CPU-only build) it is ordinary memory: `pinned` is False
                 and `pin_note` says why.
Both check the file with the model's ToL checks (memllm_kernels.model.tol): a missing, truncated or
mismatched file raises before anything is allocated.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .. import _checks
from . import ops

CHUNK_BYTES = 64 << 20


def _open_tol(path, model=None):
    """(metadata, entry, data offset, shape, dtype) of a checked ToL file."""
    from ..model.tol import _TORCH_DTYPE, check_tol_matches, read_tol_header

    meta, entry, offset = read_tol_header(path)
    shape, dtype = [int(s) for s in entry["shape"]], _TORCH_DTYPE[entry["dtype"]]
    if model is not None:
        check_tol_matches(path, meta, shape, model)
    return meta, entry, offset, shape, dtype


class FileWatch:
    """An open file and its size and modification time when it was mapped. check() raises OSError naming the file
    once it has shrunk (a read of a page past its new end is SIGBUS, which kills the process instead of raising)
    or been written in place (its rows would mix with the old ones a cache holds): one fstat, 0.8 us on a 2-core
    AMD EPYC VM. A file renamed over it is harmless: the open file and its mapping keep the old one."""

    def __init__(self, path, size: int):
        self.path, self.size = str(path), size
        self.file = open(path, "rb")
        st = os.fstat(self.file.fileno())
        self.mtime = st.st_mtime_ns
        if st.st_size != size:  # replaced or cut between the header's read and this open
            self.file.close()
            raise ValueError(f"{path}: changed while it was opened ({st.st_size} bytes, its header describes {size})")

    def check(self) -> None:
        st = os.fstat(self.file.fileno())
        if st.st_size < self.size or st.st_mtime_ns != self.mtime:
            what = (f"shrank to {st.st_size} bytes while mapped ({self.size} when opened)"
                    if st.st_size < self.size else "was written while mapped")
            raise OSError(f"ToL file {self.path} {what}: it was truncated or overwritten in place, and its rows can "
                          "no longer be trusted; replace it with a new file instead (memllm precompute --force "
                          "renames one over it)")

    def __del__(self):
        if hasattr(self, "file"):
            self.file.close()  # quietly: a file left to its finalizer warns (ResourceWarning)

    def __reduce__(self):
        # A copy of what holds it (copy.deepcopy or torch.save of a model with a mapped table) holds the rows in
        # memory, not the mapping: None there. (An open file cannot be pickled: both raised TypeError.)
        return type(None), ()


# The tables model.tol.load_tol mapped, each with its file's FileWatch for as long as it lives: a model reading one
# checks the file first (model.tol.TokenLookupTable). Not an attribute of the tensor, which torch.save would pickle.
MAPPED = WeakTensorKeyDictionary()


def map_tol(path, model=None) -> tuple[torch.Tensor, FileWatch, mmap.mmap, dict]:
    """(table [V, L, d] over a private mapping of the ToL file, checked against `model` if given; its FileWatch; the
    mapping; the tensor entry). The tensor holds the mapping (through numpy) while it lives. DiskTable and
    model.tol.load_tol map files this way."""
    _, entry, offset, shape, dtype = _open_tol(path, model)
    nbytes = entry["data_offsets"][1]
    watch = FileWatch(path, offset + nbytes)
    # ACCESS_COPY (MAP_PRIVATE): reads come straight from the page cache like a shared mapping, but the buffer is
    # writable for torch; nothing ever writes it, so no page is ever copied.
    mapping = mmap.mmap(watch.file.fileno(), offset + nbytes, access=mmap.ACCESS_COPY)
    # Through numpy, which holds the mapping's buffer while the tensor lives (torch.frombuffer does not: an unmap
    # under a live view made the next read SIGSEGV). (read_tol_header refuses an empty table.)
    raw = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset)
    return torch.from_numpy(raw).view(dtype).view(shape), watch, mapping, entry


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_fits_in_ram(what: str, nbytes: int) -> None:
    avail = mem_available()
    if avail is not None and nbytes > avail:
        raise ValueError(f"{what} needs {nbytes / 2**30:.2f} GiB of host memory but only {avail / 2**30:.2f} GiB "
                          "is available; use the disk tier (--tol-location disk) or free memory")


class HostTable:
    """A ToL table in one exact-size host allocation (page-locked and device-mapped where CUDA allows).

    table: CPU tensor [V, L, d]; pinned: whether the GPU kernels can read it over PCIe by address
    (ops.tol_host_mapped: page-locked and device-mapped); pin_note: why not, when not; nbytes: its size.
    """

    location = "host"

    def __init__(self, table: torch.Tensor, path: str | None = None):
        self.table = table
        self.path = path
        self.pinned = ops.tol_host_mapped(table)
        self.pin_note = None if self.pinned else (ops.pin_unavailable_reason() or "pageable memory (not page-locked)")
        self.nbytes = table.numel() * table.element_size()

    @classmethod
    def from_file(cls, path, model=None, *, pin: bool = True, chunk_bytes: int = CHUNK_BYTES,
                  progress: bool = False) -> "HostTable":
        """Read a ToL file into the host tier, checked against `model` (if given) first, and its data against the
        crc32s in its header as it is read (model.tol.DataCheck: ValueError naming the damaged token rows).
        progress: a tqdm bar in bytes (12.6 GB at the 1b preset: tens of seconds from disk)."""
        from ..model.tol import DataCheck

        chunk_bytes = _checks.int_at_least("chunk_bytes", chunk_bytes, 1)  # 0 read as a truncated file
        meta, entry, offset, shape, dtype = _open_tol(path, model)
        check = DataCheck(path, meta, entry)
        nbytes = entry["data_offsets"][1]
        _check_fits_in_ram(f"the host tier for {path}", nbytes)
        table = ops.tol_host_alloc(shape, dtype, pin)
        dst = memoryview(table.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"host tier <- {Path(path).name}")
        with open(path, "rb", buffering=0) as f, bar if bar is not None else contextlib.nullcontext():
            fd = f.fileno()
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_SEQUENTIAL)
            done = 0
            f.seek(offset)
            while done < nbytes:
                n = f.readinto(dst[done:done + min(chunk_bytes, nbytes - done)])
                if not n:
                    raise ValueError(f"{path}: truncated while reading ({done} of {nbytes} data bytes)")
                if hasattr(os, "posix_fadvise"):  # this table is the copy we keep: drop the page cache's
                    os.posix_fadvise(fd, offset + done, n, os.POSIX_FADV_DONTNEED)
                done += n
                check.upto(dst, done)
                if bar is not None:
                    bar.update(n)
        return cls(table, str(path))

    @classmethod
    def from_tensor(cls, t: torch.Tensor, *, pin: bool = True) -> "HostTable":
        """Copy an in-memory [V, L, d] table (any device) into the host tier, in chunks of rows. A table that
        requires grad is copied as data (the host tier serves inference)."""
        table = ops.tol_host_alloc(t.shape, t.dtype, pin)
        rows = max(1, CHUNK_BYTES // max(1, t[0].numel() * t.element_size())) if t.shape[0] else 1
        with torch.no_grad():
            for i in range(0, t.shape[0], rows):
                table[i:i + rows].copy_(t[i:i + rows])
        return cls(table)

    def read_rows(self, ids: torch.Tensor, out: torch.Tensor, *, check_ids: bool = True) -> None:
        """out[:N] = table[ids] on the CPU (ids a CPU int tensor [N]). IndexError for an id outside [0, V);
        check_ids=False skips that (the engine checked the step's ids): a bad id then reads a NaN row."""
        ops.tol_host_gather(self.table, ids, out, check_ids=check_ids)

    def describe(self) -> dict:
        return {"location": self.location, "bytes": self.nbytes, "pinned": self.pinned, "pin_note": self.pin_note,
                "path": self.path}


class DiskTable:
    """A ToL file mapped read-only in place: table is a CPU tensor [V, L, d] over the mapping.

    advice: 'random' (default: no read-ahead around a row), 'normal' or 'sequential'.
    page_cache_bytes: if set, after that many bytes of rows were read the mapping's pages are released
    (MADV_DONTNEED) and the file's page cache dropped (POSIX_FADV_DONTNEED), bounding RSS and page cache to
    about that much plus one step's rows (0: after every read). None: the kernel keeps what it likes (fastest
    re-reads).
    """

    location = "disk"
    pinned = False

    def __init__(self, path, model=None, *, advice: str = "random", page_cache_bytes: int | None = None):
        flag = {"random": mmap.MADV_RANDOM, "normal": mmap.MADV_NORMAL, "sequential": mmap.MADV_SEQUENTIAL}
        if advice not in flag:
            raise ValueError(f"advice must be one of {sorted(flag)}, got {advice!r}")
        if page_cache_bytes is not None:
            page_cache_bytes = _checks.int_at_least("page_cache_bytes", page_cache_bytes, 0,
                                                    " (0: release the pages after every read)")
        self._table, self._watch, self._map, entry = map_tol(path, model)
        self.path = str(path)
        self.nbytes = entry["data_offsets"][1]
        self._offset = self._watch.size - self.nbytes
        self._file = self._watch.file
        self.advice = advice
        self._map.madvise(flag[advice])
        shape = self._table.shape
        self.row_bytes = int(np.prod(shape[1:])) * self._table.element_size()
        self.page_cache_bytes = page_cache_bytes
        self._since_drop = 0
        self.drops = 0
        self.pin_note = "rows are read from a file mapping (not page-locked)"

    @property
    def closed(self) -> bool:
        """Whether close() was called (as a file's `closed`)."""
        return self._table is None

    def _check_open(self) -> None:
        if self._table is None:  # else a use after close() failed on None ('NoneType' has no attribute 'shape')
            raise ValueError(f"DiskTable {self.path} is closed")

    @property
    def table(self) -> torch.Tensor:
        """The tensor over the mapping, after one fstat (0.8 us on a 2-core AMD EPYC VM) to check that the file has
        neither shrunk nor been written since it was opened: a read of a page past its new end would be SIGBUS,
        which kills the process instead of raising, and rows written in place would mix with the old ones the
        cache holds. The engine reads it through here at every step; a truncation during a read still kills it.
        ValueError once closed, as a closed file's reads."""
        self._check_open()
        self._watch.check()
        return self._table

    def read_rows(self, ids: torch.Tensor, out: torch.Tensor, *, check_ids: bool = True) -> None:
        """out[:N] = table[ids] (ids a CPU int tensor [N]): the rows are read from storage (willneed), then
        gathered. One cold 1b row: 0.21-0.27 ms this way, 1.24-1.30 ms when its 24 pages fault in one by one
        (2-core AMD EPYC VM's virtual disk; bench_offload.py, disk_read_rows). IndexError for an id outside
        [0, V); check_ids=False skips that (the engine checked the step's ids): a bad id then reads a NaN row."""
        self.willneed(ids)  # checks that the table is open and the file unchanged (self.table) before any read
        ops.tol_host_gather(self._table, ids, out, check_ids=check_ids)  # (willneed skips bad ids)
        self.note_read(ids.numel())

    def note_read(self, rows: int) -> None:
        """Counts rows read from the mapping; drops the mapping's pages past page_cache_bytes."""
        if self.page_cache_bytes is None:
            return
        self._since_drop += rows * self.row_bytes
        if self._since_drop > self.page_cache_bytes:
            self.drop_pages()

    def drop_pages(self) -> None:
        """Release every page of the mapping and the file's page cache (they are re-read on demand)."""
        self._check_open()
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._since_drop = 0
        self.drops += 1

    def willneed(self, ids) -> None:
        """Ask the kernel to start reading these tokens' rows now, all of them at once (ids: any iterable of
        ints, a tensor or an array; ids outside [0, V) are ignored). One madvise per run of consecutive tokens,
        each read as one request: under random advice a page fault reads only its own 4 KiB page. On rows
        already in the page cache it costs ~3 us per row."""
        V, page = self.table.shape[0], mmap.PAGESIZE  # (checks that the table is open and the file's size)
        if self._map is None:
            return
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.reshape(-1).tolist()
        toks = sorted({int(t) for t in ids if 0 <= t < V})
        i = 0
        while i < len(toks):
            j = i + 1
            while j < len(toks) and toks[j] == toks[j - 1] + 1:
                j += 1
            start = self._offset + toks[i] * self.row_bytes
            lo = start - start % page
            self._map.madvise(mmap.MADV_WILLNEED, lo, start + (j - i) * self.row_bytes - lo)
            i = j

    def describe(self) -> dict:
        return {"location": self.location, "bytes": self.nbytes, "pinned": False, "pin_note": self.pin_note,
                "path": self.path, "advice": self.advice, "page_cache_bytes": self.page_cache_bytes,
                "page_drops": self.drops}

    def close(self) -> None:
        """Unmap the file; the table's reads then raise ValueError. Closing twice is harmless. A tensor taken
        from `table` before stays valid: the mapping goes with the last such view."""
        self._table = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor view still exists (numpy holds the buffer): the mapping goes when it does
                pass
        self._file.close()
