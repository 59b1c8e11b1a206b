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

from .. import _checks
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
    """The n most frequent token ids of a [V] vector of counts or frequencies (ints or floats >= 0, ranked by
    value; ties: smaller id first), as int64 [n]."""
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"token counts must be a [V] vector, got shape {list(counts.shape)}")
    if counts.dtype.kind not in "iuf":
        raise TypeError(f"token counts must be integers or floats, got dtype {counts.dtype}")
    if counts.size and not counts.min() >= 0:  # a NaN minimum fails the comparison too
        raise ValueError(f"token counts must be >= 0 and not NaN, got {counts[~(counts >= 0)][0]}")
    n = min(_checks.int_at_least("n", n, 0), counts.shape[0])
    # Ranked by the values themselves: cast to int, frequencies in [0, 1) were all 0 and ranked by id alone.
    # (Integer counts as int64: negating an unsigned array wraps around.)
    key = counts if counts.dtype.kind == "f" else counts.astype(np.int64)
    return np.argsort(-key, kind="stable")[:n].astype(np.int64)


_PY_INT = frozenset((int,))


def _check_ids(op: str, toks: list, vocab: int) -> None:
    """TypeError for an id that is not an integer (a float was truncated, or failed as a numpy index halfway
    through a step), IndexError naming the first id outside [0, V) (numpy read -1 as token V - 1's slot). This
    runs every decode step, where access() itself takes ~0.3 us per token: builtins over the list (C loops: are
    all ids Python ints, the engine's case, then min and max), no Python loop per id and no numpy array (~1.5 us
    to build and reduce one; this check takes ~0.4 us for one id)."""
    if not _PY_INT.issuperset(map(type, toks)):  # numpy ints pass too; bool and float do not
        for t in set(map(type, toks)):
            if t is bool or not issubclass(t, (int, np.integer)):
                bad = next(v for v in toks if type(v) is t)
                raise TypeError(f"{op}: token ids must be integers, got {type(bad).__name__} {bad!r}")
    if toks and (min(toks) < 0 or max(toks) >= vocab):
        pos, bad = next((p, v) for p, v in enumerate(toks) if not 0 <= v < vocab)
        raise IndexError(f"{op}: id {bad} (at position {pos} of tokens) is outside [0, V) for V={vocab}")


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

    @property
    def hot_rows(self) -> int:
        """How many tokens are hot now (the hot set less those evict() dropped)."""
        return len(self._hot_set)

    def preload(self) -> list[tuple[int, int]]:
        """Place the hot set in slots [0, H): returns [(token, slot)] to load. Again after evict(): a hot
        token evicted is no longer hot (its slot may hold a tail token now) and stays out."""
        out = []
        for s, tok in enumerate(self.hot):
            if tok in self._hot_set and self.slot_of[tok] < 0:
                self.slot_of[tok] = s
                self.owner[s] = tok
                out.append((tok, s))
        return out

    def _checked(self, op: str, tokens) -> list:
        toks = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)  # an array or tensor: Python ints
        _check_ids(op, toks, self.vocab)
        return toks

    def resident(self, tok: int) -> bool:
        self._checked("CacheDirectory.resident", [tok])
        return self.slot_of[tok] >= 0

    def access(self, tokens: Iterable[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Record one step's distinct tokens, in order. Returns (admitted [(token, slot)], evicted
        [(token, slot)]): evictions free slots that admissions of this same step reuse. A step never
        evicts a token it admitted itself, so it admits at most the tail's capacity. TypeError for a
        non-integer id, IndexError for one outside [0, V), before anything changes."""
        return self._access(self._checked("CacheDirectory.access", tokens))

    def _access(self, tokens: Iterable[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """access() of ids already checked."""
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
        for tok in self._checked("CacheDirectory.evict", tokens):
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
    Returns {lookups, hits, hit_rate, evictions, admissions}. The stream's ids are checked once, up front."""
    step, warmup = _checks.int_at_least("step", step, 1), _checks.int_at_least("warmup", warmup, 0)
    d = CacheDirectory(vocab, capacity, policy, hot, hot_fraction)
    d.preload()
    toks = d._checked("simulate", np.asarray(tokens))  # once here (a float stream was truncated), not per step
    hits = lookups = 0
    slot_of = d.slot_of
    for i in range(0, len(toks), step):
        chunk = toks[i:i + step]
        counted = chunk[max(0, warmup - i):]  # a step may straddle the warm-up's end: count its later tokens
        lookups += len(counted)
        hits += sum(1 for t in counted if slot_of[t] >= 0)
        d._access(dict.fromkeys(chunk))  # distinct, in order
    return {"lookups": lookups, "hits": hits, "hit_rate": hits / max(lookups, 1), "evictions": d.evictions,
            "admissions": d.admissions}
