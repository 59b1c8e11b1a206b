"""The offload engine: ToL rows move on demand from disk or host memory into a device row cache.

    engine = OffloadEngine(HostTable.from_file(path, model), device="cuda", cache_rows=6400,
                           policy="hot+lru", token_counts=train_counts)
    engine.prefetch(ids)                 # as soon as a step's ids exist: rows start moving (side stream)
    engine.gather_add_(h, ids, layer)    # per layer: h += ToL[ids, layer], waiting only for that layer's rows
    engine.stats()                       # lookups, hits, misses, bytes moved, evictions; per layer and total

Data path of one step (docs/offload.md has the full argument):
  1. prefetch(ids) records an event on the compute ("main") stream and, on a side stream that waits for it,
     runs tol_cache_prefetch once per layer group: every distinct token's rows of those layers go, in one
     token-major pass, into a step buffer `buf` [N, L, d] -- from its cache slot on a hit, from the host
     table over PCIe (mapped memory) on a miss -- and `first[b]` names the buffer row of position b.
     An event after each group lets layer l wait for its own group only. prefetch(ids, inline=True), for a
     step replayed from a CUDA graph, runs one group on main itself, after main waits for the side stream.
  2. gather_add_(h, ids, l) makes main wait for l's group event, then runs tol_gather_add_(h, first, buf, l).
  3. The host learns the step's ids and hit flags later, from a non-blocking device-to-host copy that it
     polls (event.query) at the next prefetch, after queuing that prefetch's transfer: no host
     synchronisation per decode step. That bookkeeping updates the statistics and the policy
     (CacheDirectory), which decides admissions and evictions; those are applied on the side stream, behind
     the new step's transfer (rows copied host -> cache slot, slot map updated), and so serve later steps.
     DecodeGraph defers this host work (finish_later=True) until it has launched the replay (finish_step()).
     With bookkeeping='device' step 3 is one kernel instead (tol_cache_admit, the same LRU decisions, queued
     after the transfer on the side stream), and DecodeGraph captures the whole step into its graph.
     On the CPU everything runs synchronously, in the same order, through the same ops.
Eviction safety: every cache write is on the side stream after an event recorded on main at the time it
is enqueued (so every kernel launched before it that reads the cache has finished), and every main-stream
read of the cache (the fused tol_cached_gather_add_ path, an inline transfer) first waits for the side
stream. So cache reads and writes execute in the order the host enqueued them, and a slot is never
overwritten while a launched kernel still reads it; the step buffer is reused only after the same
main-stream event.

Disk tier on a GPU: the device cannot map a file, so the miss path is 'staged': the step's ids come to the
host (one sync per step), the CPU gathers missing rows from the mapping into pinned staging, and on the device
tol_cache_prefetch copies the hits from the cache, then tol_host_gather the misses out of staging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _checks
from .. import ops as _ops
from . import ops
from . import reference as _ref
from .policy import POLICIES, CacheDirectory, hot_set_from_counts
from .tiers import DiskTable, mem_available

MISS_PATHS = ("auto", "mapped", "staged")
# Step buffers the engine keeps between steps: 256 MiB holds 2730 tokens' rows at the 1b shape (96 KiB each), any
# decode batch. A longer step (a prompt) gets buffers of its own, freed after it: a 16384-token prompt's 1.5 GiB
# would otherwise stay on the device for the rest of the decode (and the 1b decode's whole budget is 2.5 GB).
KEEP_BUFFER_BYTES = 256 << 20
BOOKKEEPING = ("host", "device")


class _TensorSource:
    """A plain CPU (or same-device) tensor used as the host tier, for tests and benchmarks."""

    location = "tensor"

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.pinned = table.device.type == "cuda" or ops.tol_host_mapped(table)
        self.pin_note = None if self.pinned else "a plain tensor"
        self.nbytes = table.numel() * table.element_size()

    def read_rows(self, ids, out, *, check_ids=True):
        ops.tol_host_gather(self.table, ids, out, check_ids=check_ids)

    def describe(self):
        return {"location": self.location, "bytes": self.nbytes, "pinned": self.pinned, "pin_note": self.pin_note}


def _version(t: torch.Tensor) -> int | None:
    """t's in-place version counter; None for inference tensors, which have none."""
    return None if t.is_inference() else t._version


@dataclass
class _Step:
    """One prefetched step: what the layers of its forward read."""

    ids: torch.Tensor
    n: int
    first: torch.Tensor  # ids.shape int32: buffer row of each position
    buf: torch.Tensor  # [>= N, L, d]
    events: list  # per layer group (CUDA), else empty
    layers_read: list = field(default_factory=list)
    whole: int = 0  # reads of all L layers at once (wait_step): counted in one go, not layer by layer
    waited: set = field(default_factory=set)
    counted: bool = False
    hits: int = 0
    unique_misses: int = 0
    inline: bool = False  # the transfer ran on the compute stream (events[0] recorded there after it)
    captured: bool = False  # recorded into a CUDA graph (capture_step): its reads wait on its events in the graph
    version: int | None = field(init=False)  # _version(ids) at the prefetch
    snapshot: torch.Tensor | None = field(init=False)  # a copy of CPU ids at the prefetch (see reads)

    def __post_init__(self):
        self.version = _version(self.ids)
        # The version misses writes that bypass it (inference tensors have none; numpy shares the memory without
        # it): CPU ids are compared by value too, a memcmp of N ids (~0.6 us a read). Copying or comparing CUDA
        # ids would cost a host sync per step or per layer, which the decode path must not have.
        self.snapshot = self.ids.clone() if self.ids.device.type == "cpu" else None

    def reads(self, ids: torch.Tensor) -> bool:
        """Whether `ids` still hold this step's ids: the same tensor, or the same memory and shape (a compiled
        forward may hand an op another Python object for the same tensor), at the prefetch's version, and for
        CPU ids with the same values. CUDA ids rewritten in place without a version bump (inference tensors)
        are not detected: see OffloadEngine.gather_add_."""
        if ids is not self.ids and not (ids.data_ptr() == self.ids.data_ptr() and ids.shape == self.ids.shape
                                        and ids.device == self.ids.device):
            return False
        return _version(ids) == self.version and (self.snapshot is None or torch.equal(ids, self.snapshot))


class OffloadEngine:
    """A device row cache over a ToL table held by a lower tier (HostTable, DiskTable or a CPU tensor).

    source: HostTable / DiskTable / CPU tensor [V, L, d].
    device: where the model runs ('cpu' or 'cuda[:n]'): the cache and step buffers live there.
    cache_rows: C, slots of the device cache (each holds one token's L x d rows); 0 <= C <= V.
    policy: one of POLICIES (see policy.py); hot-set policies take their hot set from `hot` (token ids,
        most important first) or the top tokens of `token_counts` ([V] counts of some corpus).
    hot_fraction: share of C given to the hot set by the hot+lru / hot+lfu policies (0.75 measured best on
        held-out Shakespeare, bench/results: 91.0% hits at 5% of GPT-2's vocabulary).
    layer_groups: how many groups of layers the prefetch is split into (each with its own event; default
        4 on a GPU, 1 on the CPU; at most L). miss_path: 'mapped' (the device reads host rows by address: pinned host
        tier, or the CPU), 'staged' (via the host: the disk tier on a GPU), 'auto' picks.
    check_memory: refuse a cache larger than the device's free memory (a clear error instead of an OOM).
    bookkeeping: where the policy runs. 'host' (default): CacheDirectory on the host learns each step's hit
        flags from a copy it polls and mirrors its decisions onto the device (any policy, any tier).
        'device': tol_cache_admit decides and applies them on the device right after each step's transfer,
        with the same decisions as the host's LRU (policies lru, hot+lru, static; the mapped miss path): a
        step costs the host two launches and no bookkeeping, and an admitted row is copied from the step's
        rows already on the device instead of read over PCIe a second time. Its statistics count each
        prefetched step once for every layer; explicit evict() frees slots that are refilled lowest first.
    keep_buffer_bytes: the step buffers ([N, L, d] rows and the index) are kept and reused while a step's rows fit
        in this many bytes (default 256 MiB: 2730 tokens at the 1b shape); a longer step, such as a long prompt,
        gets buffers of its own, freed after it, instead of holding its size on the device for good.
    """

    # The engine's state outlives the call that made it: made under torch.inference_mode() (generate, a user's
    # block), it would be inference tensors, which the ops refuse to write outside inference mode later.
    @torch.inference_mode(False)
    def __init__(self, source, *, device="cpu", cache_rows: int, policy: str = "hot+lru", hot=None,
                 token_counts=None, hot_fraction: float = 0.75, layer_groups: int | None = None,
                 miss_path: str = "auto", backend: str = "auto", check_memory: bool = True,
                 bookkeeping: str = "host", keep_buffer_bytes: int = KEEP_BUFFER_BYTES):
        if isinstance(source, torch.Tensor):
            source = _TensorSource(source)
        self.source = source
        table = source.table  # a closed DiskTable raises here
        # The table is checked here, else only the first prefetch refused it, with a message about the op's arguments.
        if table.dim() != 3:
            raise ValueError(f"the ToL table must be token-major [V, L, d], got shape {list(table.shape)}")
        self.V, self.L, self.d = (int(s) for s in table.shape)
        if self.V == 0:  # no id could be looked up (and every hit rate would divide by V)
            raise ValueError(f"the ToL table has no rows (shape {list(table.shape)}): V must be at least 1")
        if self.L == 0 or self.d == 0:  # nothing to look up ("rows must be dense" at the first prefetch, for d=0)
            raise ValueError(f"the ToL table's rows are empty (shape {list(table.shape)}): L and d must be at least 1")
        if table.dtype not in _checks.FLOATS:
            raise TypeError(f"the ToL table must be float32, float16, bfloat16 or float64, got {table.dtype}")
        _checks.token_table("OffloadEngine", "the ToL table", table)  # each token's [L, d] rows dense: not layer-major
        if table.requires_grad:  # the engine moves rows with in-place ops, which have no autograd
            raise ValueError("the ToL table requires grad, but the engine's copies of its rows have no autograd (it "
                             "is for inference); pass table.detach()")
        self.dtype = table.dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r}, but CUDA is not available here (torch {torch.__version__}, "
                               f"{torch.cuda.device_count()} GPUs visible); use device='cpu'")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = backend
        # Backends resolved once (raising here if `backend` cannot run on this device). tol_cache_prefetch has no
        # Triton kernel: with backend='triton' it uses the CUDA kernels if built, else the reference. The hot
        # path calls the compiled ops directly (~20 us less per call than through the checking wrappers).
        self._prefetch_backend = ops._backend("auto" if backend == "triton" else backend, self.device, triton_ok=False)
        self._gather_compiled = _ops._pick_backend(backend, self.device) in ("cpu", "cuda")
        self._rows_backend = ops._backend(backend, self.device, triton_ok=True)  # tol_host_gather's
        self.row_bytes = self.L * self.d * table.element_size()
        self._layer_bytes = self.d * table.element_size()
        self.keep_buffer_bytes = _checks.int_at_least("keep_buffer_bytes", keep_buffer_bytes, 0)
        cache_rows = _checks.int_at_least("cache_rows", cache_rows, 0)
        if cache_rows > self.V:
            raise ValueError(f"a cache of {cache_rows} rows is larger than the vocabulary (V={self.V}); "
                             f"use at most {self.V} (all of it: then --tol-location device is simpler)")
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose one of {POLICIES}")
        if check_memory:
            self._check_free_memory(cache_rows)
        if miss_path not in MISS_PATHS:
            raise ValueError(f"miss_path must be one of {MISS_PATHS}, got {miss_path!r}")
        mappable = self.device.type == "cpu" or bool(getattr(source, "pinned", False))
        if miss_path == "auto":
            miss_path = "mapped" if mappable else "staged"
        elif miss_path == "mapped" and not mappable:
            raise ValueError(f"miss_path='mapped' needs host memory the device can read by address; this "
                             f"{getattr(source, 'location', 'source')} tier is not ({source.pin_note})")
        self.miss_path = miss_path
        if bookkeeping not in BOOKKEEPING:
            raise ValueError(f"bookkeeping must be one of {BOOKKEEPING}, got {bookkeeping!r}")
        if bookkeeping == "device" and policy not in ("lru", "hot+lru", "static"):
            raise ValueError(f"bookkeeping='device' runs an LRU tail (tol_cache_admit); policy {policy!r} needs the "
                             "host's bookkeeping: use policy 'lru', 'hot+lru' or 'static', or bookkeeping='host'")
        if bookkeeping == "device" and miss_path == "staged":
            raise ValueError("bookkeeping='device' needs the mapped miss path (a tier the device reads by address); "
                             "the staged path (disk on a GPU) learns each step's ids on the host anyway: "
                             "use bookkeeping='host'")
        self.bookkeeping = bookkeeping
        # The staged path's host table for tol_cache_prefetch: the device cannot read this tier, so a miss reads
        # this one zero row (stride 0 over all V ids), which the staged copy of the miss then overwrites.
        self._unread = (torch.zeros((1, self.L, self.d), dtype=self.dtype, device=self.device).expand(self.V, -1, -1)
                        if miss_path == "staged" else None)
        if hot is None and token_counts is not None:
            counts = np.asarray(token_counts)
            if counts.shape != (self.V,):
                raise ValueError(f"token_counts must be [V] = [{self.V}], got shape {list(counts.shape)}")
            hot = hot_set_from_counts(counts, cache_rows)
        if policy in ("static", "hot+lru", "hot+lfu") and hot is None:
            if policy == "static":
                raise ValueError("policy 'static' needs a hot set: pass hot= or token_counts=")
            hot = ()
        self.directory = CacheDirectory(self.V, cache_rows, policy, () if hot is None else hot, hot_fraction)
        self.capacity = cache_rows
        self.cache = torch.empty((cache_rows, self.L, self.d), dtype=self.dtype, device=self.device)
        self.slot_map = torch.full((self.V,), -1, dtype=torch.int32, device=self.device)
        self._cuda = self.device.type == "cuda"
        self.layer_groups = min(self.L, _layer_groups(layer_groups, 4 if self._cuda else 1))
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self._buf = self._first = None
        self._staging = None
        self._staging_event = None
        self._pending: list = []  # (step, pinned ids, pinned slots, pinned first, event) awaiting bookkeeping
        self._deferred = None  # the staged path's last admissions: _apply's arguments, queued at the next step
        self._unfinished = None  # the mapped CUDA path's last step, until its host copies are queued (_finish)
        self._step: _Step | None = None
        self._fork = torch.cuda.Stream(self.device) if self._cuda else None  # capture_step's forked stream
        self._forked = False  # whether capture_step forked it (end_capture joins it then)
        self.captured_layers: list[int] = []  # layers read by a forward under CUDA-graph capture (wait_step)
        # Per-layer counters as Python lists: a numpy scalar update costs ~1 us, four per layer per step add up.
        self._lookups, self._hits, self._misses, self._bytes = ([0] * self.L for _ in range(4))
        # The same four for reads of every layer at once (a replayed or compiled step), added to each layer by
        # stats(): one update per step instead of 4 x 24.
        self._whole = [0, 0, 0, 0]
        self._all_layers = list(range(self.L))
        self._fused_hits = torch.zeros(self.L, dtype=torch.int64, device=self.device) if self._cuda else None
        self.prefetches = 0
        self.host_waits = 0  # times the host waited for the device to catch up (CUDA; _drain)
        self.bytes_admitted = 0
        self.rows_from_disk = 0
        # The hot set goes in at start, before any step.
        self._preload(self.directory.preload())
        self._preload_bytes = self.bytes_admitted  # stats' bytes_h2d counts admissions, not the hot set's load
        if bookkeeping == "device":
            # tol_cache_admit's state (reference.tol_cache_admit): the directory's placement at start; hot slots
            # (every slot under 'static') are never evicted; the directory is not consulted again.
            d = self.directory
            last_use = np.where(d.owner >= 0, _ref.HOT_STAMP, -1) if policy != "static" else np.full(
                cache_rows, _ref.HOT_STAMP)
            self._owner = torch.from_numpy(d.owner.astype(np.int32)).to(self.device)
            self._last_use = torch.from_numpy(last_use.astype(np.int64)).to(self.device)
            self._admitted_at = torch.full((cache_rows,), -1, dtype=torch.int64, device=self.device)
            self._counters = torch.zeros(len(_ref.ADMIT_COUNTERS), dtype=torch.int64, device=self.device)
        if self._cuda:  # written on the side stream: an engine dropped without close() frees them after its work
            state = (self._owner, self._last_use, self._admitted_at, self._counters) if bookkeeping == "device" else ()
            for t in (self.cache, self.slot_map, *state):
                t.record_stream(self._side)

    # ------------------------------------------------------------ set-up helpers
    def _check_free_memory(self, rows: int) -> None:
        need = rows * self.row_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            where = f"{self.device} has {free / 2**30:.2f} GiB free"
        else:
            free = mem_available()
            where = f"the host has {(free or 0) / 2**30:.2f} GiB available"
        if free is not None and need > free:
            raise ValueError(f"a cache of {rows} rows needs {need / 2**30:.2f} GiB ({self.row_bytes} bytes per row) "
                             f"but {where}; use fewer --cache-rows")

    def _ensure_buffers(self, n: int, most: int | None = None) -> None:
        """Grow the engine's step buffers to hold n tokens: to the next power of two (fewer regrowths, each of
        which makes a CUDA graph capture again), but not past `most` rows where n fits in them."""
        if self._buf is None or self._buf.shape[0] < n:
            cap = 1 << max(0, (n - 1).bit_length())
            if most is not None and n <= most:
                cap = min(cap, most)
            old = self._buf
            with torch.inference_mode(False):  # state, as in __init__ (the three buffers below too)
                self._buf = torch.empty((cap, self.L, self.d), dtype=self.dtype, device=self.device)
            if self._cuda:
                self._buf.record_stream(self._side)  # used on the side stream; freed on main
                if old is not None:
                    old.record_stream(self._side)
        if self._first is None or self._first.shape[0] < 2 * n:
            # first [n] and slots [n] of a step, back to back (_first_slots): the host copies both in one transfer
            with torch.inference_mode(False):
                self._first = torch.empty(2 * max(n, 1), dtype=torch.int32, device=self.device)
            if self._cuda:
                self._first.record_stream(self._side)

    def _first_slots(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's first [n] (buffer row of each position; a CUDA graph reads it at the buffer's start) and
        slots [n] (cache slot or -1), after it in the same buffer."""
        return self._first[:n], self._first[n:2 * n]

    def _step_buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first_slots int32 [2n]: first [n] then slots [n]; buf [>= n, L, d]) for a step of n tokens: the
        engine's own buffers, grown to n, if they hold n already or n tokens' rows fit in keep_buffer_bytes; else
        new ones for this step alone (a long prompt), freed with it, so the engine's stay as they were (a CUDA
        graph that reads them stays valid)."""
        held = self._buf is not None and self._buf.shape[0] >= n and self._first.shape[0] >= 2 * n
        if held or n * self.row_bytes <= self.keep_buffer_bytes:
            self._ensure_buffers(n, self.keep_buffer_bytes // self.row_bytes)
            return self._first[:2 * n], self._buf
        with torch.inference_mode(False):  # like the engine's own (a step may be read outside inference mode)
            first_slots = torch.empty(2 * n, dtype=torch.int32, device=self.device)
            buf = torch.empty((n, self.L, self.d), dtype=self.dtype, device=self.device)
        if self._cuda:  # used on the side stream too; freed on main with the step
            first_slots.record_stream(self._side)
            buf.record_stream(self._side)
        return first_slots, buf

    def _groups(self, G: int):
        return [(g * self.L // G, (g + 1) * self.L // G) for g in range(G)]

    def _group_of(self, layer: int, G: int) -> int:
        """The g of _groups(G) whose [g L // G, (g + 1) L // G) holds `layer`: the last g with g L // G <= layer,
        i.e. g L < (layer + 1) G. (layer G // L was not that where G does not divide L: with L=6 and 4 groups,
        layers 1 and 4 waited for the group before their own, and read rows still in flight on a GPU.)"""
        return ((layer + 1) * G - 1) // self.L if G > 1 else 0

    def _indices(self, longs: list, ints: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Host ints as an int64 [len(longs)] and an int32 [len(ints)] tensor on the device, through one pinned
        buffer and one non-blocking copy (each transfer costs the host a pinned allocation and a copy launch)."""
        k = 8 * len(longs)
        a = np.empty(k + 4 * len(ints), dtype=np.uint8)
        a[:k].view(np.int64)[:] = longs
        a[k:].view(np.int32)[:] = ints
        t = torch.from_numpy(a)
        if self._cuda:
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t[:k].view(torch.int64), t[k:].view(torch.int32)

    # ------------------------------------------------------------ admissions and evictions
    def _apply(self, admitted, evicted, src=None, src_rows=None, *, fence) -> None:
        """Mirror the directory's decisions onto the device: rows of admitted tokens into their slots (from the
        source table, or from rows `src_rows` of `src`), then slot_map[evicted] = -1 and slot_map[admitted] =
        slot. On CUDA, on the side stream after `fence` (a main-stream event; see the module docstring). One
        index transfer and two launches, however many tokens: on a replayed decode step the host's own time
        per step can set the pace (on the H200 machine a synced VRAM step spent 54 us on its 4 launches)."""
        if not admitted and not evicted:
            return
        # A token that hit, was then evicted by an earlier admission of this step and came back (into another
        # slot) is in both lists: its one write is the new slot. index_copy_ with a repeated index keeps an
        # unspecified one of the writes on a GPU (where -1 won, the disk tier read zero rows for that token).
        readmitted = {t for t, _ in admitted}
        evicted = [(t, s) for t, s in evicted if t not in readmitted]
        E, A = len(evicted), len(admitted)
        toks = [t for t, _ in evicted] + [t for t, _ in admitted]
        slots = [s for _, s in admitted]
        ctx = torch.cuda.stream(self._side) if self._cuda else _nullcontext()
        with ctx:
            if self._cuda and fence is not None:
                self._side.wait_event(fence)
            longs, values = self._indices(toks + slots + ([] if src is None else list(src_rows)), [-1] * E + slots)
            if A:
                ids = longs[E:E + A] if src is None else longs[E + 2 * A:]  # tokens, or rows of src
                self._gather_rows(self.source.table if src is None else src, ids, longs[E + A:E + 2 * A])
                if src is None:
                    self.bytes_admitted += A * self.row_bytes
                    if isinstance(self.source, DiskTable):
                        self.source.note_read(A)
                        self.rows_from_disk += A
            # Evictions and admissions in one launch: no index repeats (see above; access() never evicts a token
            # it admitted, and admits a token once per call).
            self.slot_map.index_copy_(0, longs[:E + A], values)

    def _gather_rows(self, table, ids, rows, out=None) -> None:
        """out[rows] = table[ids] (out: the cache by default): the engine built the arguments, so the compiled op
        is called directly (its wrapper's checks cost ~20 us of host time per call)."""
        out = self.cache if out is None else out
        if self._rows_backend in ("cpu", "cuda"):
            torch.ops.memllm.tol_host_gather(table, ids, out, rows, False)
        else:
            ops.tol_host_gather(table, ids, out, rows, backend=self.backend, check_ids=False)

    def _preload(self, admitted) -> None:
        """Rows of the hot set into their slots at start-up. A tier the device cannot read by address (the
        staged miss path: disk, or host memory that is not page-locked) is read on the host into pinned
        memory first, in chunks of about 64 MiB (not one staging buffer the size of a 2.5 GB cache)."""
        # After the compute stream's queued work, which includes the slot map's fill with -1 (the side stream
        # does not wait for it by itself: the fill could land after the hot set's slots and drop them).
        fence = self._main_fence()
        if not (self._cuda and self.miss_path == "staged"):
            self._apply(admitted, [], fence=fence)
            return
        chunk = max(1, (64 << 20) // max(1, self.row_bytes))
        for i in range(0, len(admitted), chunk):
            part = admitted[i:i + chunk]
            staging = torch.empty((len(part), self.L, self.d), dtype=self.dtype, pin_memory=True)
            self.source.read_rows(torch.tensor([t for t, _ in part], dtype=torch.int64), staging, check_ids=False)
            self.rows_from_disk += len(part) if isinstance(self.source, DiskTable) else 0
            self.bytes_admitted += len(part) * self.row_bytes
            self._apply(part, [], staging, list(range(len(part))), fence=fence)
            self._side.synchronize()  # staging is reused by the allocator once freed: the copy must be done

    def evict(self, ids) -> int:
        """Drop these tokens' rows from the cache (hot ones too). ids: an int tensor or a list of ints (an empty one:
        no ids). Returns how many were resident."""
        flat = torch.as_tensor(ids).reshape(-1)
        if flat.numel() == 0 and not isinstance(ids, torch.Tensor):
            flat = flat.long()  # torch.as_tensor([]) is float32: an empty list is no ids
        self._check_ids(flat)
        if self.bookkeeping == "device":
            return self._evict_on_device(flat)
        self._drain(block=True)
        evicted = self.directory.evict(dict.fromkeys(int(t) for t in flat.tolist()))
        self._apply([], evicted, fence=self._main_fence())
        return len(evicted)

    def _evict_on_device(self, flat: torch.Tensor) -> int:
        """evict() with bookkeeping='device': after everything queued so far (a rare call: it synchronises), the
        resident tokens' slots become free tail slots (a hot one joins the tail, as on the host; under 'static',
        which admits nothing, the slot stays empty)."""
        self.synchronize()
        toks = torch.tensor(list(dict.fromkeys(flat.tolist())), dtype=torch.int64, device=self.device)
        slots = self.slot_map[toks].long() if toks.numel() else toks
        toks, slots = toks[slots >= 0], slots[slots >= 0]
        self._owner[slots] = -1
        self._last_use[slots] = _ref.HOT_STAMP if self.directory.policy_name == "static" else -1
        self._admitted_at[slots] = -1
        self.slot_map[toks] = -1
        self._counters[_ref.ADMIT_COUNTERS.index("evictions")] += toks.numel()
        self.synchronize()
        return int(toks.numel())

    def _main_fence(self):
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    # ------------------------------------------------------------ the step path
    def _check_ids(self, flat: torch.Tensor) -> None:
        if not isinstance(flat, torch.Tensor) or flat.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an int32 or int64 tensor, got "
                            f"{flat.dtype if isinstance(flat, torch.Tensor) else type(flat).__name__}")
        _ops._check_id_range("OffloadEngine", flat, self.V)

    def prefetch(self, ids: torch.Tensor, *, check_ids: bool = True, layer_groups: int | None = None,
                 inline: bool = False, finish_later: bool = False) -> None:
        """Start moving every layer's rows of `ids` ([...] int32/int64, any shape) for the next forward.

        Deduplicated (a repeated token moves once). On CUDA it returns at once (the transfer runs on a side
        stream) and needs no host synchronisation, except check_ids=True on CUDA ids (one sync for the
        range check; the model's hook passes False there: its embedding lookup rejects bad ids anyway) and
        the staged (disk) miss path, which reads the ids on the host. layer_groups: this step's number of layer
        groups (default the engine's). inline: one group, queued on the current stream instead of the side
        stream (CUDA; on the CPU everything is inline). DecodeGraph passes it: a replay waits for every layer's
        rows anyway, so the side stream only added two waits across streams between replays (on an H200, 47 us
        more idle device time per compiled 1b step than with ToLs in VRAM, decode_profile.py).
        finish_later (with inline): queue only the transfer now; finish_step() then queues the rest (the host's
        copies of the step's hit flags, earlier steps' bookkeeping and admissions). For a caller that queues a
        forward reading only the step buffer in between (DecodeGraph: the replay), so that the host's share is
        off the path from this call to that launch (it counts when the host waits for each step, as a token
        streamer does). Before the next prefetch; prefetch and synchronize() call it if the caller did not.
        """
        if finish_later and not inline:
            raise ValueError("finish_later=True needs inline=True (the transfer on the current stream)")
        _checks.flag("prefetch", "check_ids", check_ids)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        self._finish()  # a step prefetched with finish_later: its copies of first/slots precede this step's
        flat = ids.reshape(-1)
        if flat.device != self.device:
            flat = flat.to(self.device)
        if check_ids and self.miss_path != "staged":  # the staged path checks the ids on the host, where it reads them
            self._check_ids(flat)
        elif flat.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be int32 or int64, got {flat.dtype}")
        inline = bool(inline) and self._cuda
        if self.miss_path == "staged":
            self._step = self._prefetch_staged(ids, flat, inline)
        else:
            groups = min(self.L, _layer_groups(layer_groups, self.layer_groups))
            self._step = self._prefetch_mapped(ids, flat, groups, inline)
        self.prefetches += 1
        if not (finish_later and inline):
            self.finish_step()

    def finish_step(self) -> None:
        """The host's share of the last prefetch, after its transfer was queued: the device-to-host copies of
        its ids, slots and first (the mapped path on CUDA; polled later, never waited for), then earlier steps'
        bookkeeping. Their admissions (index updates and host rows into cache slots, on the side stream) queue
        behind this step's transfer and run during the forward, instead of delaying the rows it waits for:
        each after the transfer's event (inline) or, on the side stream, in order after the transfer, so an
        eviction still follows every read of its slot. Called by prefetch, unless finish_later=True."""
        step = self._step
        fence = step.events[0] if step is not None and step.inline else None
        self._finish()
        self._drain(block=False, fence=fence)

    def _prefetch_op(self, flat, buf, first, slots, lb, le, table=None) -> None:
        table = self.source.table if table is None else table
        if self._prefetch_backend in ("cpu", "cuda"):  # arguments built by the engine: straight to the kernel
            torch.ops.memllm.tol_cache_prefetch(flat, self.slot_map, self.cache, table, buf, first, slots, lb, le,
                                                False)
        else:
            ops.tol_cache_prefetch(flat, self.slot_map, self.cache, table, buf, first, slots, lb, le,
                                   backend="reference", check_ids=False)

    def _prefetch_mapped(self, ids, flat, groups: int, inline: bool) -> _Step:
        n = flat.numel()
        first_slots, buf = self._step_buffers(n)
        first, slots = first_slots[:n], first_slots[n:]
        if not self._cuda:
            if isinstance(self.source, DiskTable):  # the op would fault each missing row in page by page
                host = flat.numpy()
                self.source.willneed(host[self.slot_map.numpy()[np.clip(host, 0, self.V - 1)] < 0])
            self._prefetch_op(flat, buf, first, slots, 0, None)
            step = _Step(ids, n, first.view(ids.shape), buf, [])
            if self.bookkeeping == "device":
                self._admit(flat, first, slots, buf)
                if isinstance(self.source, DiskTable):  # the rows the op read from the mapping: its page bound
                    host, f, s = flat.numpy(), first.numpy(), slots.numpy()
                    self.source.note_read(int(((f == np.arange(n)) & (s < 0) & (host >= 0) & (host < self.V)).sum()))
            else:
                self._bookkeep(step, flat.numpy(), slots.numpy(), first.numpy())
            return step
        events = []
        if inline:
            # Before the transfer reads the cache, the side stream's queued work is done: cache writes (each
            # queued after the compute stream's reads of its slot) and the last step's copies of first/slots,
            # which this step overwrites. In decode that work finished during the last forward.
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            self._prefetch_op(flat, buf, first, slots, 0, None)
            events.append(self._main_fence())
        else:
            fence = self._main_fence()
            with torch.cuda.stream(self._side):
                self._side.wait_event(fence)  # the ids exist; the last step's reads of buf are done
                flat.record_stream(self._side)
                for lb, le in self._groups(groups):
                    self._prefetch_op(flat, buf, first, slots, lb, le)
                    ev = torch.cuda.Event()
                    ev.record(self._side)
                    events.append(ev)
        step = _Step(ids, n, first.view(ids.shape), buf, events, inline=inline)
        self._unfinished = (step, flat, first_slots)
        return step

    def _finish(self) -> None:
        """Queue the host's copies of the last mapped CUDA step's ids, slots and first, on the side stream after
        its transfer, into pinned memory that _drain polls: the host learns hits later, without waiting. With
        bookkeeping='device', queue the step's tol_cache_admit there instead (off the compute stream: the
        forward reads only the step's rows, and the next step's transfer waits for the side stream)."""
        if self._unfinished is None:
            return
        step, flat, first_slots = self._unfinished
        self._unfinished = None
        n, k = step.n, step.n * flat.element_size()
        with torch.cuda.stream(self._side):
            if step.inline:  # else the transfer ran here already, and marked flat
                self._side.wait_event(step.events[0])
                flat.record_stream(self._side)
            if self.bookkeeping == "device":
                self._admit(flat, first_slots[:n], first_slots[n:], step.buf)
                return
            # One pinned allocation and two copies (ids; first and slots, back to back), not three and three:
            # on a replayed decode step the host's time can set the pace (see _apply).
            h = torch.empty(k + 8 * n, dtype=torch.uint8, pin_memory=True)
            h_ids, h_fs = h[:k].view(flat.dtype), h[k:].view(torch.int32)
            h_ids.copy_(flat, non_blocking=True)
            h_fs.copy_(first_slots, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side)
        self._pending.append((step, h_ids, h_fs[n:], h_fs[:n], done))

    def _admit(self, flat, first, slots, buf) -> None:
        """bookkeeping='device': tol_cache_admit on the current stream, straight to the kernel where one exists
        (the engine built the arguments)."""
        args = (flat, first, slots, buf, self.slot_map, self._owner, self._last_use, self._admitted_at, self.cache,
                self._counters)
        if self._prefetch_backend in ("cpu", "cuda"):
            torch.ops.memllm.tol_cache_admit(*args)
        else:
            ops.tol_cache_admit(*args, backend="reference")

    def _prefetch_staged(self, ids, flat, inline: bool) -> _Step:
        """The ids go to the host (a sync on CUDA), which reads the misses into (pinned) staging; on the device
        one tol_cache_prefetch copies the hits from the cache (as on the mapped path, so a step that only hits,
        most decode steps, moves no index to the device) and one tol_host_gather puts the misses in their
        buffer rows. Statistics and policy are immediate; the admissions they decide are queued at the next
        step (or the next synchronize), before its sync. Every host microsecond here is on the critical path
        (the device idles from the sync to the next launch): 30 us per one-token step that hits on a 2-core AMD
        EPYC VM, where the path that built index tensors for the hits took 94-120 (bench_offload.py,
        offload_engine_step)."""
        self._apply_deferred()  # while the device still runs the last forward: off the path from the sync below
        host_ids = flat.cpu().numpy()  # a sync on CUDA: the disk tier needs the ids on the host
        n = host_ids.shape[0]
        tokens, positions, miss_toks, miss_pos, hits = _plan_step(host_ids, self.directory.slot_of)  # checks ids
        nm = len(miss_toks)
        first_slots, buf = self._step_buffers(max(n, 1))
        first, slots = first_slots[:n], first_slots[n:2 * n]
        if nm:
            if self._staging_event is not None:
                self._staging_event.synchronize()  # the last step's copy out of staging is done
            if self._staging is None or self._staging.shape[0] < nm:
                cap = 1 << (nm - 1).bit_length()
                with torch.inference_mode(False):
                    self._staging = torch.empty((cap, self.L, self.d), dtype=self.dtype, pin_memory=self._cuda)
            self.source.read_rows(torch.tensor(miss_toks, dtype=torch.int64), self._staging[:nm], check_ids=False)
            self.rows_from_disk += nm if isinstance(self.source, DiskTable) else 0
        fence = None if inline else self._main_fence()
        stream = (torch.cuda.current_stream(self.device) if inline else self._side) if self._cuda else None
        ctx = torch.cuda.stream(stream) if self._cuda else _nullcontext()
        with ctx:
            if inline:
                stream.wait_stream(self._side)  # as on the mapped path: the side stream's cache writes are done
            elif self._cuda:
                self._side.wait_event(fence)
                flat.record_stream(self._side)
            # Into the engine's own buffers (not new tensors): a CUDA graph that captured this step's reads
            # reads the next step's through the same addresses.
            self._prefetch_op(flat, buf, first, slots, 0, None, self._unread)
            if nm:
                src_dst, _ = self._indices(list(range(nm)) + miss_pos, [])  # one transfer for both index rows
                self._gather_rows(self._staging, src_dst[:nm], src_dst[nm:], buf)
            events = []
            if self._cuda:
                ev = torch.cuda.Event()
                ev.record(stream)
                self._staging_event = ev
                events = [ev]
        step = _Step(ids, n, first.view(ids.shape), buf, events, inline=inline)
        self._count(step, hits, nm)
        admitted, evicted = self.directory._access(tokens)  # (ids checked by _plan_step: not again, ~0.5 us)
        if admitted or evicted:
            # Admitted tokens' rows are already on the device, in buf (at the first position holding them). Not only
            # misses: a hit evicted by an earlier admission of this step is admitted again (into a new slot).
            # Queued at the next step, before its sync, not now: from the sync to the next launch the device
            # idles, and these are an index transfer and two launches. buf keeps this step's rows until the
            # next step's transfer, which is queued after them. On the side stream after this step's transfer
            # (inline: after an event on the stream that ran it).
            row_of_token = dict(zip(tokens, positions))
            self._deferred = (admitted, evicted, buf, [row_of_token[t] for t, _ in admitted],
                              events[0] if inline else None)
        return step

    def _apply_deferred(self) -> None:
        if self._deferred is not None:
            admitted, evicted, buf, rows, fence = self._deferred
            self._deferred = None
            self._apply(admitted, evicted, buf, rows, fence=fence)

    def _bookkeep(self, step: _Step, host_ids: np.ndarray, host_slots: np.ndarray, host_first: np.ndarray,
                  fence=None) -> None:
        """Statistics and policy for one step whose ids and hit flags are on the host; applies admissions (on
        CUDA after `fence`, default an event recorded now on the current stream)."""
        n = step.n
        ids_l, slots_l, first_l = host_ids[:n].tolist(), host_slots[:n].tolist(), host_first[:n].tolist()
        tokens = [t for b, t in enumerate(ids_l) if first_l[b] == b and 0 <= t < self.V]
        hits = sum(1 for s in slots_l if s >= 0)
        unique_misses = sum(1 for b in range(n) if first_l[b] == b and slots_l[b] < 0)
        self._count(step, hits, unique_misses)
        admitted, evicted = self.directory._access(tokens)  # (ids in [0, V): filtered above)
        if admitted or evicted:
            self._apply(admitted, evicted, fence=self._main_fence() if fence is None else fence)
        if unique_misses and isinstance(self.source, DiskTable):
            self.source.note_read(unique_misses)
            self.rows_from_disk += unique_misses

    def _count(self, step: _Step, hits: int, unique_misses: int) -> None:
        step.hits, step.unique_misses, step.counted = hits, unique_misses, True
        for layer in step.layers_read:
            self._count_layer(step, layer)
        if step.whole:
            self._count_whole(step, step.whole)

    def _count_whole(self, step: _Step, times: int) -> None:
        w = self._whole
        w[0] += times * step.n
        w[1] += times * step.hits
        w[2] += times * (step.n - step.hits)
        w[3] += times * step.unique_misses * self._layer_bytes

    def _count_layer(self, step: _Step, layer: int) -> None:
        self._lookups[layer] += step.n
        self._hits[layer] += step.hits
        self._misses[layer] += step.n - step.hits
        self._bytes[layer] += step.unique_misses * self._layer_bytes

    def _drain(self, block: bool, fence=None) -> None:
        """Bookkeeping of CUDA steps whose device-to-host copies have landed (all of them if block; then also
        the last step's copies and the staged path's deferred admissions). fence: as in _bookkeep."""
        if block:
            self._finish()
            self._apply_deferred()
        while self._pending:
            step, h_ids, h_slots, h_first, done = self._pending[0]
            if not block and not done.query():
                if len(self._pending) <= 8:
                    return
                # More than 8 steps behind: wait for the oldest rather than let the backlog grow. Counted: a
                # host that waits here runs ahead of the device (its time per step then says little).
                self.host_waits += 1
            done.synchronize()
            self._pending.pop(0)
            self._bookkeep(step, h_ids.numpy(), h_slots.numpy(), h_first.numpy(), fence)

    # ------------------------------------------------------------ per-layer reads
    def gather_add_(self, hidden: torch.Tensor, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden += ToL[ids, layer], in place; returns hidden. hidden [..., d] on the engine's device, ids [...].

        If `ids` is the tensor last passed to prefetch, still holding the ids it held then, this reads that step's
        buffer (waiting only for the layer's group); otherwise it reads the cache and the host table directly
        (tol_cached_gather_add_: hit or miss per token), without changing the cache.
        Rewriting the prefetched ids in place is noticed through the tensor's version counter, and for CPU ids
        also by value (numpy writes, inference tensors). CUDA ids are not compared by value (a host sync per
        layer): an inference tensor on a GPU (under torch.inference_mode it has no version counter) rewritten
        in place after prefetch() would read the old ids' rows, so prefetch it again after writing it.
        """
        if type(layer) is not int:  # an int skips the call (0.2 us per layer per step); 1.0 failed in pybind
            _checks.int_arg("gather_add_", "layer", layer)
        if not 0 <= layer < self.L:
            raise IndexError(f"layer={layer} is outside the table's [0, {self.L}) layers")
        step = self._step
        if step is None or not step.reads(ids):
            if self.miss_path == "staged":  # the device cannot read this tier directly: prefetch first
                self.prefetch(ids)
                return self.gather_add_(hidden, ids, layer)
            return self._fused(hidden, ids, layer)
        if self._cuda:
            g = self._group_of(layer, len(step.events))
            if g not in step.waited:
                torch.cuda.current_stream(self.device).wait_event(step.events[g])
                step.waited.add(g)
        if self._gather_compiled:  # the engine made first and buf: skip the wrapper's Python checks (C++ still checks)
            torch.ops.memllm.tol_gather_add_(hidden, step.first, step.buf, layer, False)
        else:
            _ops.tol_gather_add_(hidden, step.first, step.buf, layer, backend=self.backend, check_ids=False)
        if self._cuda and torch.cuda.is_current_stream_capturing():
            self.captured_layers.append(layer)  # each replay counts it, through wait_step
            return hidden
        step.layers_read.append(layer)
        if step.counted:
            self._count_layer(step, layer)
        return hidden

    def step_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ToL[ids] of every layer, [*ids.shape, L, d] in the table's dtype on the engine's device: the step's
        rows copied out of its buffer (one gather for all layers), counted as read by every layer.

        For a compiled forward (memllm::engine_step_rows): each layer then reads its row by indexing, which
        Inductor fuses with the residual add and the next norm, where gather_add_ would be an opaque kernel per
        layer. If `ids` is not the step last prefetched it is prefetched first; the copy waits for all of the
        step's rows (no per-layer overlap). Under CUDA-graph capture the waits and counts are left to
        wait_step before each replay, as for gather_add_.
        """
        step = self._step
        if step is None or not step.reads(ids):
            self.prefetch(ids, check_ids=not self._cuda)
            step = self._step
        if self._cuda and torch.cuda.is_current_stream_capturing():
            self.captured_layers.extend(range(self.L))
            if step.captured:  # the rows move on capture_step's stream, inside the same graph
                torch.cuda.current_stream(self.device).wait_event(step.events[0])
        else:
            self.wait_step(range(self.L))
        return step.buf.index_select(0, step.first.reshape(-1)).view(*ids.shape, self.L, self.d)

    def wait_step(self, layers) -> None:
        """Make the current stream wait for all of the current step's rows, and count them as read by `layers`.

        For a forward replayed from a CUDA graph (memllm_kernels.model.DecodeGraph): its captured reads of the
        step buffer cannot wait on the step's events or count lookups themselves, so the caller does both
        between prefetch() and the replay. `layers`: the layers the captured forward reads (captured_layers).
        """
        step = self._step
        if step is None:
            raise RuntimeError("wait_step needs a prefetched step: call prefetch(ids) first")
        whole = isinstance(layers, (list, range)) and len(layers) == self.L and list(layers) == self._all_layers
        if not whole:  # checked before anything waits or counts
            layers = list(layers)
            bad = [layer for layer in layers if not 0 <= layer < self.L]
            if bad:
                raise IndexError(f"wait_step: layer {bad[0]} is outside the table's [0, {self.L}) layers")
        if self._cuda:
            main = torch.cuda.current_stream(self.device)
            for g, ev in enumerate(step.events):
                if g not in step.waited:
                    main.wait_event(ev)
                    step.waited.add(g)
        if whole:
            step.whole += 1
            if step.counted:
                self._count_whole(step, 1)
            return
        for layer in layers:
            step.layers_read.append(layer)
            if step.counted:
                self._count_layer(step, layer)

    # ------------------------------------------------------------ a whole step inside a CUDA graph
    @property
    def graph_step(self) -> bool:
        """Whether a CUDA graph can capture this engine's whole step, transfer and bookkeeping (bookkeeping=
        'device' on the mapped miss path of a CUDA device): DecodeGraph then replays it with the forward, and a
        decode step costs the host no engine work at all. Needs the CUDA kernels: the reference ops synchronise
        with the host, which a capture forbids (without them DecodeGraph prefetches eagerly before each replay)."""
        return (self._cuda and self.bookkeeping == "device" and self.miss_path == "mapped"
                and self._prefetch_backend == "cuda")

    def capture_step(self, ids: torch.Tensor) -> None:
        """Under CUDA-graph capture, for a graph_step engine: the step's transfer (tol_cache_prefetch) and then
        its bookkeeping (tol_cache_admit) on a stream forked from the capturing one, which end_capture() joins.
        The forward's reads of the step buffer (gather_add_, step_rows) wait for the transfer's event inside the
        graph, so the transfer overlaps whatever comes before the first of them (the embedding, a compiled
        step's first attention: Inductor schedules its read of the rows there), and the admission the rest of the
        forward, which reads only the step buffer. ids: the graph's static input [...]; each replay runs the
        step for what it holds then. reserve(ids.numel()) (or a prefetch of as
        many ids) must come before the capture: nothing is allocated while capturing."""
        if not self.graph_step:
            raise RuntimeError("capture_step needs bookkeeping='device' on the mapped miss path of a CUDA device")
        if not torch.cuda.is_current_stream_capturing():
            raise RuntimeError("capture_step records a step into a CUDA graph: call it while capturing")
        flat = ids.reshape(-1)
        n = flat.numel()
        if self._buf is None or self._buf.shape[0] < n or self._first.shape[0] < 2 * n:
            raise RuntimeError(f"capture_step: reserve({n}) before the capture, so the step buffers exist")
        (first, slots), buf = self._first_slots(n), self._buf
        self._fork.wait_stream(torch.cuda.current_stream(self.device))
        self._forked = True  # end_capture joins the fork from here on, even if what follows raises
        with torch.cuda.stream(self._fork):
            self._prefetch_op(flat, buf, first, slots, 0, None)
            rows = torch.cuda.Event()
            rows.record(self._fork)
            self._admit(flat, first, slots, buf)
        self._step = _Step(ids, n, first.view(ids.shape), buf, [rows], inline=True, captured=True)

    def reserve(self, n: int) -> None:
        """Make the step buffers hold steps of n tokens (they grow, never shrink; keep_buffer_bytes does not
        apply to what is reserved)."""
        self._ensure_buffers(max(1, int(n)))

    def end_capture(self) -> None:
        """Join capture_step's forked stream into the capturing stream (before the capture ends). The captured
        step is dropped: its event belongs to the graph, and an eager read may not wait on it (it prefetches).
        Nothing to join when capture_step raised before it forked (a wait on the fork would then wait, inside the
        capture, on work recorded outside it)."""
        if self._forked:
            torch.cuda.current_stream(self.device).wait_stream(self._fork)
            self._forked = False
        self._step = None

    def wait_side(self) -> None:
        """Make the current stream wait for the engine's queued side-stream work. Among it are the host copies of
        the last step's ids, which read the caller's ids tensor after the step's transfer: a caller that rewrites
        that tensor in place (DecodeGraph's static input) calls this first. No-op on the CPU."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def before_replay(self) -> None:
        """Before each replay of a graph with a captured step: what eager steps left (an admission still to queue,
        work on the side stream) runs before the replayed transfer reads the cache; counts the step."""
        self._finish()
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        self.prefetches += 1

    def step_buffers(self) -> tuple:
        """The device tensors a prefetched step is read from (first-row index, rows). They stay the same
        tensors until a step of more tokens than any before grows them (within keep_buffer_bytes; a longer step
        reads buffers of its own): a CUDA graph that captured reads of them is stale after that (DecodeGraph
        checks and recaptures)."""
        return self._first, self._buf

    def _fused(self, hidden, ids, layer):
        check = not self._cuda
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        ops.tol_cached_gather_add_(hidden, ids, self.slot_map, self.cache, self.source.table, layer,
                                   backend=self.backend, check_ids=check)
        n = ids.numel()
        self._lookups[layer] += n
        if self._cuda:  # ids were not checked here (the kernel gives a bad id a NaN row): count only valid ones
            flat = ids.reshape(-1).long()
            valid = (flat >= 0) & (flat < self.V)
            self._fused_hits[layer] += (valid & (self.slot_map[flat.clamp(0, self.V - 1)] >= 0)).sum()
        else:
            h = int((self.slot_map[ids.reshape(-1).long()] >= 0).sum())
            self._hits[layer] += h
            self._misses[layer] += n - h
            self._bytes[layer] += (n - h) * self.d * self.cache.element_size()
        return hidden

    # ------------------------------------------------------------ statistics and checks
    def synchronize(self) -> None:
        """Wait for all transfers and finish all pending bookkeeping (tests, statistics, shutdown)."""
        # Bookkeeping first: it queues the last steps' admissions on the side stream, which the syncs then wait for.
        self._drain(block=True)
        if self._cuda:
            self._side.synchronize()
            torch.cuda.current_stream(self.device).synchronize()

    def stats(self) -> dict:
        """Cache statistics, total and per layer (synchronises first).

        lookups: token positions read (per layer that read them); hits: rows found in the cache at the
        step's prefetch; misses = lookups - hits; bytes_h2d: bytes of rows moved from the lower tier to the
        device (step misses, counted once per distinct token, plus admitted rows the mapped path reads from the
        tier again; the staged path admits rows already in the step buffer; not the hot set's load); evictions and
        admissions are token granular (all L layers of a row at once); host_waits: how often the host, more
        than 8 steps ahead of the device's bookkeeping copies, waited for it (CUDA).
        """
        self.synchronize()
        w_lookups, w_hits, w_misses, w_bytes = self._whole
        admissions, evictions = self.directory.admissions, self.directory.evictions
        # Per layer: the mapped path reads each admitted row from the tier again; the staged path copies it
        # from the step buffer, already on the device (nothing more moves).
        admitted_bytes = (self.bytes_admitted - self._preload_bytes) // self.L
        hot_rows, rows_from_disk = self.directory.hot_rows, self.rows_from_disk
        if self.bookkeeping == "device":
            # Every prefetched step, counted once for every layer; admissions copy rows already on the device.
            c = dict(zip(_ref.ADMIT_COUNTERS, self._counters.tolist()))
            w_lookups, w_hits, w_misses = c["lookups"], c["hits"], c["lookups"] - c["hits"]
            w_bytes = c["unique_misses"] * self._layer_bytes
            admissions, evictions, admitted_bytes = c["admissions"], c["evictions"], 0
            hot_rows = int(((self._last_use == _ref.HOT_STAMP) & (self._owner >= 0)).sum())  # evict() un-hots
            if isinstance(self.source, DiskTable):  # the steps' misses, read by the kernel from the mapping
                rows_from_disk += c["unique_misses"]
        hits = np.array(self._hits, dtype=np.int64) + w_hits
        misses = np.array(self._misses, dtype=np.int64) + w_misses
        lookups_arr = np.array(self._lookups, dtype=np.int64) + w_lookups
        fused_bytes = np.zeros(self.L, dtype=np.int64)  # the CPU counts the fused path's bytes in _bytes
        if self._cuda:
            fh = self._fused_hits.cpu().numpy()
            # fused-path lookups are counted at launch; their hits on the device; each miss reads its host row
            fused_lookups = lookups_arr - (hits + misses)
            hits += fh
            misses += fused_lookups - fh
            fused_bytes = (fused_lookups - fh) * self._layer_bytes
        per_layer = []
        for l in range(self.L):
            lk = int(lookups_arr[l])
            per_layer.append({"layer": l, "lookups": lk, "hits": int(hits[l]), "misses": int(misses[l]),
                              "hit_rate": (int(hits[l]) / lk) if lk else None,
                              "bytes_h2d": int(self._bytes[l]) + int(fused_bytes[l]) + w_bytes + admitted_bytes})
        lookups = int(lookups_arr.sum())
        total_hits = int(hits.sum())
        return {
            "policy": self.directory.policy_name, "bookkeeping": self.bookkeeping, "cache_rows": self.capacity,
            "vocab": self.V, "cache_fraction": self.capacity / self.V, "hot_rows": hot_rows,
            "resident": int((self.slot_map >= 0).sum()), "device": str(self.device),
            "miss_path": self.miss_path, "tier": self.source.describe(), "pinned": bool(self.source.pinned),
            "lookups": lookups, "hits": total_hits, "misses": lookups - total_hits,
            "hit_rate": total_hits / lookups if lookups else None,
            "bytes_h2d": int(sum(p["bytes_h2d"] for p in per_layer)), "admissions": admissions,
            "evictions": evictions, "prefetches": self.prefetches, "host_waits": self.host_waits,
            "rows_from_disk": rows_from_disk, "per_layer": per_layer,
        }

    def check_consistency(self) -> None:
        """Raise AssertionError unless the device slot map mirrors the directory and every occupied slot holds
        exactly its token's rows (tests)."""
        self.synchronize()
        slot_of = self.slot_map.cpu().numpy()
        if self.bookkeeping == "device":
            owner = self._owner.cpu().numpy()
        else:
            owner = self.directory.owner
            assert np.array_equal(slot_of, self.directory.slot_of), "device slot map differs from the directory"
        occupied = np.nonzero(owner >= 0)[0]
        toks = owner[occupied]
        assert np.array_equal(slot_of[toks], occupied), "slot owners and slot map disagree"
        assert int((slot_of >= 0).sum()) == occupied.size, "a token maps to a slot it does not own"
        if occupied.size:
            got = self.cache[torch.from_numpy(occupied).to(self.device)].cpu()
            want = self.source.table[torch.from_numpy(toks)].cpu()
            assert torch.equal(got, want), "a cache slot holds stale or wrong rows"

    def close(self) -> None:
        self.synchronize()
        self._step = None
        self._pending.clear()


def _layer_groups(groups, default: int) -> int:
    """A layer_groups argument: None for `default`, else an int >= 1 (more than L groups means L)."""
    return default if groups is None else _checks.int_at_least("layer_groups", groups, 1)


def _plan_step(ids: np.ndarray, slot_of: np.ndarray) -> tuple[list, list, list, list, int]:
    """What the staged path needs of a step's ids [N] (on the host) and the directory's slot map [V]: the
    distinct tokens in order of first occurrence and the first position of each (its buffer row, as
    tol_cache_prefetch's `first` makes it), the same two of the missing ones, and how many positions hit.
    Python lists up to 64 ids (a decode step: ~2 us, where each numpy call costs ~1 us and np.unique ~15),
    numpy above. Raises IndexError for an id outside [0, V)."""
    n = ids.shape[0]
    if n and not (0 <= ids.min() and ids.max() < slot_of.shape[0]):
        _ops._check_id_range("OffloadEngine", torch.from_numpy(ids), slot_of.shape[0])
    if n <= 64:
        ids_l = ids.tolist()
        seen: dict = {}
        for b, t in enumerate(ids_l):
            seen.setdefault(t, b)
        missing = [(t, b) for t, b in seen.items() if slot_of[t] < 0]
        hits = sum(1 for t in ids_l if slot_of[t] >= 0)
        return list(seen), list(seen.values()), [t for t, _ in missing], [b for _, b in missing], hits
    uniq, index = np.unique(ids, return_index=True)
    order = np.argsort(index, kind="stable")
    tokens, positions = uniq[order], index[order]
    miss = slot_of[tokens] < 0
    hits = int((slot_of[ids] >= 0).sum())
    return tokens.tolist(), positions.tolist(), tokens[miss].tolist(), positions[miss].tolist(), hits


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def format_stats(s: dict) -> str:
    """A few lines of text for the CLI."""
    gb = 1e9
    hr = "-" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f}%"
    tier = s["tier"]
    pinned = "pinned" if s["pinned"] else f"not pinned: {tier.get('pin_note')}"
    where = " (run on the device)" if s.get("bookkeeping") == "device" else ""
    lines = [f"cache: {s['policy']}{where}, {s['cache_rows']} of {s['vocab']} rows ({100 * s['cache_fraction']:.1f}%, "
             f"{s['hot_rows']} hot) on {s['device']}; tier {tier['location']} ({pinned}), miss path {s['miss_path']}",
             f"cache: {s['lookups']:,} lookups, {s['hits']:,} hits ({hr}), {s['misses']:,} misses, "
             f"{s['bytes_h2d'] / gb:.4f} GB moved to the device, {s['admissions']:,} admissions, "
             f"{s['evictions']:,} evictions, {s['rows_from_disk']:,} rows read from disk"]
    per = [p for p in s["per_layer"] if p["lookups"]]
    if per:
        lines.append("cache per layer (lookups/hit rate): " + ", ".join(
            f"{p['layer']}:{p['lookups']}/{100 * p['hit_rate']:.0f}%" for p in per))
    return "\n".join(lines)
