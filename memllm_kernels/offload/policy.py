"""Cache policies and the host bookkeeping of the row cache: which token sits in which slot.

Pure Python on the CPU (no tensors): the engine (engine.py) mirrors what `CacheDirectory` decides onto
the device, and bench/bench_offload.py replays real text through it to measure hit rates. Per access of
one token the work is O(1) (LRU: an OrderedDict) or O(log C) (LFU: a heap with lazy deletion).

A cache of C slots is split into a *hot set* (tokens chosen once from corpus frequencies, loaded at start
and never evicted: token frequencies follow Zipf's law, so a few thousand tokens carry most lookups) and a
*tail* run by a policy (LRU or LFU) that admits what the text at hand uses. Policies by name:
    lru        the whole cache is an LRU tail (no hot set)
    lfu        the whole cache is an LFU tail (frequencies counted over everything seen)
    static     the whole cache is a hot set; misses are never admitted
    hot+lru    hot set (hot_fraction of C) + LRU tail
    hot+lfu    hot set + LFU tail
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

from .ops import as_integer

POLICIES = ("lru", "lfu", "static", "hot+lru", "hot+lfu")


class TailPolicy:
    """Orders the tail's residents for eviction. The directory calls hit / insert / remove / victim."""

    name = "tail"

    def hit(self, tok: int) -> None: ...

    def miss(self, tok: int) -> bool:
        """A non-resident token was used: whether to admit it."""
        return True

    def insert(self, tok: int) -> None: ...

    def remove(self, tok: int) -> None: ...

    def victim(self, protect: set) -> int | None:
        """The resident to evict next, never one in `protect`; None if every resident is protected."""
        raise NotImplementedError


class LRU(TailPolicy):
    name = "lru"

    def __init__(self):
        self._order: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def hit(self, tok):
        self._order.move_to_end(tok)

    def insert(self, tok):
        self._order[tok] = None

    def remove(self, tok):
        del self._order[tok]

    def victim(self, protect):
        for tok in self._order:  # protected tokens were just inserted: they sit at the end
            if tok not in protect:
                return tok
        return None


class LFU(TailPolicy):
    """Least frequently used, frequencies counted over every use since start (resident or not), ties broken
    by least recent use. A heap of (count, last use, token) entries; stale entries are skipped on pop."""

    name = "lfu"

    def __init__(self):
        self._count: dict[int, int] = {}
        self._stamp: dict[int, int] = {}
        self._heap: list[tuple[int, int, int]] = []
        self._resident: set[int] = set()
        self._clock = 0

    def _use(self, tok):
        self._clock += 1
        self._count[tok] = self._count.get(tok, 0) + 1
        self._stamp[tok] = self._clock

    def hit(self, tok):
        self._use(tok)
        heapq.heappush(self._heap, (self._count[tok], self._clock, tok))

    def miss(self, tok):
        self._use(tok)
        return True

    def insert(self, tok):
        self._resident.add(tok)
        heapq.heappush(self._heap, (self._count[tok], self._stamp[tok], tok))

    def remove(self, tok):
        self._resident.discard(tok)

    def victim(self, protect):
        held = []
        found = None
        while self._heap:
            count, stamp, tok = self._heap[0]
            if tok not in self._resident or self._count[tok] != count or self._stamp[tok] != stamp:
                heapq.heappop(self._heap)  # stale
                continue
            if tok in protect:
                held.append(heapq.heappop(self._heap))
                continue
            found = tok
            break
        for e in held:
            heapq.heappush(self._heap, e)
        if len(self._heap) > 4 * max(len(self._resident), 1) + 1024:  # keep the lazy heap bounded
            self._heap = [(self._count[t], self._stamp[t], t) for t in self._resident]
            heapq.heapify(self._heap)
        return found


class NoAdmit(TailPolicy):
    """The static policy's tail: empty, nothing is admitted."""

    name = "none"

    def miss(self, tok):
        return False

    def victim(self, protect):
        return None


def hot_set_from_counts(counts: np.ndarray, n: int) -> np.ndarray:
    """The n most frequent token ids of a [V] count vector (ties: smaller id first), as int64 [n]."""
    counts = np.asarray(counts)
    n = int(min(max(n, 0), counts.shape[0]))
    order = np.lexsort((np.arange(counts.shape[0]), -counts.astype(np.int64)))
    return order[:n].astype(np.int64)


class CacheDirectory:
    """Slot bookkeeping of a row cache of `capacity` slots over a vocabulary of `vocab` tokens.

    slot_of: int32 [V], the host mirror of the device slot map (slot or -1); owner: int64 [C] (token or -1).
    Hot tokens take slots [0, H) at `preload()` and are never evicted by the policy; the tail policy
    manages the other C - H slots. `access(tokens)` records one step's distinct tokens and returns the
    admissions and evictions it decided, which the engine then applies to the device.
    """

    def __init__(self, vocab: int, capacity: int, policy: str = "hot+lru", hot: Sequence[int] = (),
                 hot_fraction: float = 0.5):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose one of {POLICIES}")
        if not 0 <= capacity <= vocab:
            raise ValueError(f"cache of {capacity} rows for a vocabulary of {vocab}: it must be in [0, {vocab}]")
        if not 0.0 <= hot_fraction <= 1.0:  # also NaN; above 1 the hot set would outgrow the cache
            raise ValueError(f"hot_fraction must be in [0, 1] (the hot set's share of the cache), got {hot_fraction}")
        self.vocab, self.capacity, self.policy_name = int(vocab), int(capacity), policy
        hot = [as_integer(t, "hot-set token ids") for t in hot]  # int(1.5) would silently make token 1 hot
        if policy in ("lru", "lfu"):
            hot = []
        elif policy == "static":
            hot = hot[:capacity]
        else:
            hot = hot[:int(round(capacity * hot_fraction))]
        if policy == "static" and capacity and not hot:
            raise ValueError("the static policy needs a hot set (token frequencies of a corpus)")
        bad = [t for t in hot if not 0 <= t < vocab]
        if bad:
            raise IndexError(f"hot-set token {bad[0]} is outside [0, V) for V={vocab}")
        if len(set(hot)) != len(hot):
            raise ValueError("hot-set tokens must be distinct")
        self.hot = hot
        self._hot_set = set(hot)
        self.tail: TailPolicy = {"lru": LRU, "hot+lru": LRU, "lfu": LFU, "hot+lfu": LFU, "static": NoAdmit}[policy]()
        self.tail_capacity = capacity - len(hot)
        self.slot_of = np.full(vocab, -1, dtype=np.int32)
        self.owner = np.full(capacity, -1, dtype=np.int64)
        self._free = list(range(capacity - 1, len(hot) - 1, -1))  # tail slots, popped lowest first
        self.tail_size = 0
        self.evictions = 0
        self.admissions = 0

    def preload(self) -> list[tuple[int, int]]:
        """Place the hot set in slots [0, H): returns [(token, slot)] to load."""
        out = []
        for s, tok in enumerate(self.hot):
            if self.slot_of[tok] < 0:
                self.slot_of[tok] = s
                self.owner[s] = tok
                out.append((tok, s))
        return out

    def resident(self, tok: int) -> bool:
        return self.slot_of[tok] >= 0

    def access(self, tokens: Iterable[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Record one step's distinct tokens, in order. Returns (admitted [(token, slot)], evicted
        [(token, slot)]): evictions free slots that admissions of this same step reuse. A step never
        evicts a token it admitted itself, so it admits at most the tail's capacity."""
        admitted, evicted = [], []
        new: set[int] = set()
        slot_of, tail = self.slot_of, self.tail
        for tok in tokens:
            if slot_of[tok] >= 0:
                if tok not in self._hot_set:
                    tail.hit(tok)
                continue
            if not tail.miss(tok) or self.tail_capacity == 0:
                continue
            if self._free:
                slot = self._free.pop()
                self.tail_size += 1
            else:
                victim = tail.victim(new)
                if victim is None:  # every tail slot holds a token of this step
                    continue
                slot = int(slot_of[victim])
                slot_of[victim] = -1
                tail.remove(victim)
                evicted.append((victim, slot))
                self.evictions += 1
            slot_of[tok] = slot
            self.owner[slot] = tok
            tail.insert(tok)
            new.add(tok)
            admitted.append((tok, slot))
        self.admissions += len(admitted)
        return admitted, evicted

    def evict(self, tokens: Iterable[int]) -> list[tuple[int, int]]:
        """Drop these tokens from the cache (hot ones too: they stop being hot). Returns [(token, slot)]."""
        out = []
        for tok in tokens:
            s = int(self.slot_of[tok])
            if s < 0:
                continue
            self.slot_of[tok] = -1
            self.owner[s] = -1
            if tok in self._hot_set:  # its slot joins the tail
                self._hot_set.discard(tok)
                self.tail_capacity += 1
            else:
                self.tail.remove(tok)
                self.tail_size -= 1
            self._free.append(s)
            out.append((tok, s))
            self.evictions += 1
        return out


def simulate(tokens: Sequence[int] | np.ndarray, vocab: int, capacity: int, policy: str = "hot+lru",
             hot: Sequence[int] = (), hot_fraction: float = 0.5, step: int = 1, warmup: int = 0) -> dict:
    """Replay a token stream through a cache directory, `step` tokens per step (1: decode). Counts a lookup
    per token (after the first `warmup` tokens): a hit if its row was resident when its step began.
    Returns {lookups, hits, hit_rate, evictions, admissions}."""
    d = CacheDirectory(vocab, capacity, policy, hot, hot_fraction)
    d.preload()
    toks = np.asarray(tokens, dtype=np.int64).tolist()
    hits = lookups = 0
    slot_of = d.slot_of
    for i in range(0, len(toks), step):
        chunk = toks[i:i + step]
        if i >= warmup:
            lookups += len(chunk)
            hits += sum(1 for t in chunk if slot_of[t] >= 0)
        d.access(dict.fromkeys(chunk))  # distinct, in order
    return {"lookups": lookups, "hits": hits, "hit_rate": hits / max(lookups, 1), "evictions": d.evictions,
            "admissions": d.admissions}
