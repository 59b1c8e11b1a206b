"""Pure-PyTorch references of the offload ops: the test oracle and the spec of each (see csrc/ops.cpp).

They run on any device (a CPU host_table with CUDA outputs is read with a host gather and a copy) and are
the fallback where no compiled kernel exists (e.g. tol_cache_prefetch with Triton only).
"""

from __future__ import annotations

import numpy as np
import torch

from ..reference import nan_where_bad, valid_ids


def tol_host_gather(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """out[rows[i]] = table[ids[i]] (out[i] without rows): whole token rows. table [V, ...]; ids [N];
    out [M, ...] with table's row shape and dtype; rows [N]. Returns out (modified in place).
    Out-of-range entries (reachable with check_ids=False): a bad id writes a NaN row, a bad row is skipped."""
    flat, ok = valid_ids(ids.to(table.device), table.shape[0])
    src = table.index_select(0, flat) if table.shape[0] else table.new_empty(flat.shape[0], *table.shape[1:])
    src = nan_where_bad(src, ok).to(out.device)
    dst = torch.arange(ids.shape[0], device=out.device) if rows is None else rows.to(out.device).long()
    keep = (dst >= 0) & (dst < out.shape[0])
    out.index_copy_(0, dst[keep], src[keep])
    return out


def cached_rows(ids: torch.Tensor, slot_map: torch.Tensor, cache: torch.Tensor, host_table: torch.Tensor,
                layer: int | None = None) -> torch.Tensor:
    """The rows tol_cached_gather_add adds: cache[slot_map[id]] where the slot is in [0, C), else
    host_table[id]; [..., d] (with layer, or for [V, d] tables) or [..., L, d] (whole token rows, layer None)
    in the tables' dtype on cache's device. An id outside [0, V) gets a NaN row (check_ids=False)."""
    flat, ok = valid_ids(ids, host_table.shape[0])
    if host_table.shape[0] == 0:  # V = 0: every id is bad (check_ids=False), nothing to read (indexing raised)
        rows = cache.new_empty(flat.shape[0], *cache.shape[1:])
    else:
        slots = slot_map[flat.to(slot_map.device)].long().to(cache.device)
        hit = (slots >= 0) & (slots < cache.shape[0])
        rows = host_table.index_select(0, flat.to(host_table.device)).to(cache.device)  # [N, ...]
        if cache.shape[0]:
            from_cache = cache.index_select(0, slots.clamp(0, cache.shape[0] - 1))
            rows = torch.where(hit.view(-1, *([1] * (rows.dim() - 1))), from_cache, rows)
    rows = nan_where_bad(rows, ok.to(rows.device))
    if layer is not None:
        rows = rows[:, layer]
    return rows.reshape(*ids.shape, *rows.shape[1:])


def tol_cached_gather_add(hidden: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor, cache: torch.Tensor,
                          host_table: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """hidden + row(ids, layer), the row from the cache slot on a hit, from host_table on a miss; the sum in
    float32 (float64 if an input is float64), rounded once to hidden's dtype (as tol_gather_add)."""
    rows = cached_rows(ids, slot_map, cache, host_table, layer)
    acc = torch.promote_types(torch.promote_types(hidden.dtype, cache.dtype), torch.float32)
    return (hidden.to(acc) + rows.to(acc)).to(hidden.dtype).contiguous()  # a new contiguous tensor, as the kernels


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """first[b] = the smallest a with ids[a] == ids[b]; ids [N] -> int32 [N]."""
    flat = ids.reshape(-1).long()
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.int32, device=ids.device)
    _, inverse = torch.unique(flat, return_inverse=True)
    pos = torch.arange(flat.numel(), device=ids.device)
    firsts = torch.full((int(inverse.max()) + 1,), flat.numel(), device=ids.device, dtype=torch.long)
    firsts.scatter_reduce_(0, inverse, pos, reduce="amin")
    return firsts[inverse].to(torch.int32)


def tol_cache_prefetch(ids: torch.Tensor, slot_map: torch.Tensor, cache: torch.Tensor, host_table: torch.Tensor,
                       out: torch.Tensor, first: torch.Tensor, slots: torch.Tensor, layer_begin: int = 0,
                       layer_end: int | None = None) -> None:
    """first[b] = first position of ids[b]; slots[b] = slot_map[ids[b]] (-1 outside [0, C)); at first
    occurrences, out[b, layer_begin:layer_end] = the token's row from its slot (hit) or host_table (miss)."""
    flat = ids.reshape(-1).long()
    first.copy_(first_occurrence(flat))
    clamped, ok = valid_ids(flat.to(slot_map.device), host_table.shape[0])
    s = slot_map[clamped].long() if slot_map.numel() else torch.full_like(clamped, -1)  # V = 0: no slot to read
    s = torch.where(ok & (s >= 0) & (s < cache.shape[0]), s, -1)  # a bad id (check_ids=False): -1, a NaN row
    slots.copy_(s.to(torch.int32))
    uniq = (first.long() == torch.arange(flat.numel(), device=first.device)).nonzero().reshape(-1)
    if uniq.numel() == 0:
        return
    L = cache.shape[1] if cache.dim() == 3 else 1
    end = L if layer_end is None else layer_end
    rows = cached_rows(flat[uniq], slot_map, cache, host_table, None)  # [U, L, d] or [U, d]
    if cache.dim() == 3:
        out[uniq.to(out.device), layer_begin:end] = rows[:, layer_begin:end].to(out.device)
    elif end > layer_begin:
        out[uniq.to(out.device)] = rows.to(out.device)


HOT_STAMP = torch.iinfo(torch.int64).max  # tol_cache_admit: the last_use of a hot slot (never evicted)
ADMIT_COUNTERS = ("clock", "step", "lookups", "hits", "unique_misses", "admissions", "evictions")


def tol_cache_admit(ids: torch.Tensor, first: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                    slot_map: torch.Tensor, owner: torch.Tensor, last_use: torch.Tensor, admitted_at: torch.Tensor,
                    cache: torch.Tensor, counters: torch.Tensor) -> None:
    """One step's LRU bookkeeping after tol_cache_prefetch (see csrc/ops.cpp), in place on slot_map [V],
    owner [C], last_use [C], admitted_at [C], cache [C, ...] and counters [7] (ADMIT_COUNTERS).

    The step's distinct tokens (positions b with first[b] == b, ids in [0, V)) in order: a resident token's
    slot gets last_use = clock (clock += 1) unless it is hot (HOT_STAMP); a missing one takes the slot of
    least last_use (ties: the lowest slot) among those not admitted this step and not hot, evicting its
    owner, and rows[b] is copied into it. No such slot: not admitted."""
    ids_l, first_l, slots_l = ids.tolist(), first.tolist(), slots.tolist()
    sm, own = slot_map.cpu().numpy().copy(), owner.cpu().numpy().copy()
    use, born = last_use.cpu().numpy().copy(), admitted_at.cpu().numpy().copy()
    cnt = counters.cpu().numpy().copy()
    V, C = sm.shape[0], own.shape[0]
    clock, step = int(cnt[0]), int(cnt[1]) + 1
    copies = []
    for b, tok in enumerate(ids_l):
        if first_l[b] != b or not 0 <= tok < V:
            continue
        s = int(sm[tok])
        if 0 <= s < C:
            if use[s] != HOT_STAMP:
                use[s], clock = clock, clock + 1
            continue
        if C == 0:
            continue
        key = np.where(born != step, use, HOT_STAMP)  # this step's admissions are never victims
        v = int(np.argmin(key))  # the first of equal keys: the lowest slot
        if key[v] == HOT_STAMP:
            continue
        if 0 <= own[v] < V:
            sm[own[v]] = -1
            cnt[6] += 1
        own[v], sm[tok], use[v], born[v] = tok, v, clock, step
        clock += 1
        cnt[5] += 1
        copies.append((b, v))
    cnt[0], cnt[1] = clock, step
    cnt[2] += len(ids_l)
    cnt[3] += sum(1 for s in slots_l if s >= 0)
    cnt[4] += sum(1 for b, s in enumerate(slots_l) if first_l[b] == b and s < 0)
    for t, a in ((slot_map, sm), (owner, own), (last_use, use), (admitted_at, born), (counters, cnt)):
        t.copy_(torch.from_numpy(a))
    for b, v in copies:  # in order: a slot is admitted into at most once per step
        cache[v] = rows[b]
