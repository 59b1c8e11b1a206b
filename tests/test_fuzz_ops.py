"""Seeded differential fuzzer: every backend that runs here against the pure-torch reference, on random cases.

What is fuzzed (each test draws its cases from MEMLLM_FUZZ_SEED; the fixed tests of test_tol_gather_add.py,
test_offload.py, test_triton_raw_checks.py and test_decode_attention.py walk a grid, this file walks what lies
between its points and combines what they vary one at a time):
  tol_gather_add(_), tol_cached_gather_add(_): hidden/table dtypes (float32/float16/bfloat16/float64, mixed), d in
      {0, 1, odd, 2^k, 2^k +- 1}, T in {0, 1, small, a few hundred} in 0-, 1-, 2- and 3-d leading shapes, int32/int64
      ids with repeats, 0 and V-1, [V, d] and [V, L, d] tables (layer a numpy int now and then), hidden/ids/tables
      as random strided views (permuted dims, gaps, column steps, storage offsets, expanded dims), values with
      zeros, infinities, NaN, subnormals and rounding ties, check_ids=False with bad ids (NaN rows), and for the
      cached op slot maps with misses, hits and slots outside the cache, and caches that differ from the table.
  tol_host_gather, tol_cache_prefetch: the same tables, out with padded rows, destination rows, layer ranges, bad
      ids and rows with check_ids=False.
  tol_cache_admit: a few steps from consistent and from arbitrary cache states, the CPU kernel against the reference.
  decode_attention: random batch, heads, grouping, head_dim, cache length (split keys too), pos and pad (pad > pos
      too), dtypes (a cache of another dtype), strided qkv rows and permuted caches; Triton against the reference.
  invalid input: a valid call with one or two random faults (ids out of range, dtypes, shapes, layer, strides, an
      output sharing memory with an input, grad, inference tensors): every backend raises the same exception type
      (the README's: TypeError for a dtype, ValueError for a shape, IndexError for an id or a layer, RuntimeError
      for memory) and writes nothing, an IndexError names an id that is out of range where it says; the raw ops (C++,
      Triton, the fake kernels on meta tensors) raise the raw form (TypeError, IndexError for an id, RuntimeError).
  opcheck: torch.library.opcheck on a few random valid cases of each op.

The oracle is memllm_kernels/reference.py and memllm_kernels/offload/reference.py. Gathers and copies must match it
bit for bit, and so must the gather-adds: the README promises one rounding of the float32 sum (float64 if an operand
is float64, reaching a 16-bit hidden through float32) "so every backend gives the same bits" -- Triton's interpreter
included, since the kernels no longer use its own bfloat16 conversions (test_triton_bfloat16_conversions_are_exact).
Rows of bad ids are NaN on every backend (any payload). The reference itself is held to the README's claims about
torch: a 16-bit sum equals torch's own same-dtype `hidden + rows`, a float64 sum reaches a 16-bit hidden through
float32. decode_attention's output and appended key are compared within test_decode_attention's tolerances, its
appended value bit for bit. Inputs are never modified, nor anything of an output's buffer outside the output. A
destination row that tol_host_gather is given twice holds one of its writes (which one is not specified).

Reproducing: a failure lists MEMLLM_FUZZ_SEED and each failing case with what it drew;
MEMLLM_FUZZ_SEED=<s> MEMLLM_FUZZ_CASE=<i> runs case i alone, MEMLLM_FUZZ_SCALE=<x> draws x times as many cases.
PYTEST_DONT_REWRITE: the asserts' own messages, without pytest's rendering of their operands (tensors).
"""

from __future__ import annotations

import math
import os
import random
import re
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch

import memllm_kernels as mk
from memllm_kernels import reference
from memllm_kernels.offload import reference as oref

from test_decode_attention import BAD as ATTN_BAD, TOL as ATTN_TOL, ULP, _good as attn_good, rotation_size

SEED = int(os.environ.get("MEMLLM_FUZZ_SEED", "20260"))
SCALE = float(os.environ.get("MEMLLM_FUZZ_SCALE", "1"))
ONLY = os.environ.get("MEMLLM_FUZZ_CASE")
TRITON = mk.backend_unavailable_reason("triton", "cpu") is None
INTERPRETED = TRITON and os.environ.get("TRITON_INTERPRET") == "1"
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}
ops = torch.ops.memllm
pytestmark = [  # the interpreter computing on the drawn infinities, and a complex hidden cast to int (two faults)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Casting complex values to real:UserWarning"),
]


# ================================================================ the runner
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread while fuzzing: thousands of small ops, each a parallel region whose threads spin waiting for
    a core that the machine's other work holds (2 threads took 2 to 10 times as long as 1 on a busy 2-core machine).
    The kernels' multi-threaded splits are covered by the large cases of test_tol_gather_add.py and test_offload.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fuzz(name: str, n: int, body: Callable[[random.Random, torch.Generator, dict], None]) -> None:
    """Runs body(rng, gen, case) for n cases, each seeded from (SEED, name, its number); body records what it drew in
    `case`. Every case runs; the failures are reported together, each with its number and draw."""
    numbers = [int(ONLY)] if ONLY is not None else range(max(1, round(n * SCALE)))
    failures = []
    for i in numbers:
        rng = random.Random(f"{SEED}/{name}/{i}")
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        case: dict = {}
        try:
            body(rng, gen, case)
        except Exception as e:  # a wrong result, or an error a backend should not have raised
            drawn = ", ".join(f"{k}={v}" for k, v in case.items())
            failures.append(f"case {i} ({drawn}):\n    {type(e).__name__}: {str(e)[:700]}")
    if failures:
        pytest.fail(f"{name}: {len(failures)} of {len(numbers)} cases failed (MEMLLM_FUZZ_SEED={SEED}; rerun one "
                    "with MEMLLM_FUZZ_CASE=<i>)\n" + "\n".join(failures[:6]), pytrace=False)


def describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return repr(t)
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}/{list(t.stride())}+{t.storage_offset()}"


# ================================================================ values
SCALES = (-24, -12, -8, -1, 0, 0, 0, 1, 4, 12)  # powers of two: hidden and rows of far-apart sizes round often


def float_values(n: int, dtype: torch.dtype, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """n values: normal at a random scale, or signed powers of two (sums that fall on rounding ties), with zeros of
    both signs, infinities, NaN, the largest finite value, the smallest normal and a subnormal now and then."""
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if rng.random() < 0.15:
        x = torch.sign(x) * torch.exp2(torch.randint(-14, 6, (n,), generator=gen).double())
    else:
        x = x * 2.0 ** rng.choice(SCALES)
    if n and rng.random() < 0.3:
        fi = torch.finfo(dtype)
        pool = [0.0, -0.0, math.inf, -math.inf, math.nan, fi.max, -fi.max, fi.tiny, -fi.tiny, fi.tiny / 8, fi.eps, 1.0]
        k = rng.randint(1, max(1, n // 8))
        x[torch.randint(0, n, (k,), generator=gen)] = torch.tensor([rng.choice(pool) for _ in range(k)],
                                                                   dtype=torch.float64)
    return x.to(dtype)


def bad_indices(bound: int, dtype: torch.dtype) -> list[int]:
    """Indices outside [0, bound) that `dtype` can hold."""
    vals = [-1, -2, bound, bound + 1, bound + 1000, -(2**31), 2**31 - 1]
    return vals + ([2**40, -(2**40), 2**63 - 1, -(2**63)] if dtype == torch.int64 else [])


def id_values(n: int, V: int, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """n ids in [0, V) (int64): uniform, a few distinct ones repeated, one id, or only 0 and V-1."""
    hi = max(V, 1)
    mode = rng.choice(("uniform", "uniform", "few", "one", "ends"))
    if mode == "uniform":
        return torch.randint(0, hi, (n,), generator=gen)
    if mode == "few":
        pool = torch.randint(0, hi, (rng.randint(1, 3),), generator=gen)
        return pool[torch.randint(0, len(pool), (n,), generator=gen)]
    if mode == "one":
        return torch.full((n,), rng.randrange(hi), dtype=torch.int64)
    return torch.tensor([0, hi - 1])[torch.randint(0, 2, (n,), generator=gen)]


def poke(t: torch.Tensor, rng: random.Random, values) -> None:
    """Writes each value at a random element of t (through the view: every alias of an expanded element)."""
    if t.numel():
        for v in values:
            t[tuple(rng.randrange(n) for n in t.shape)] = v


# ================================================================ layouts
def layout(shape, rng: random.Random, *, fixed: int, col_step: bool = False, expand: bool = False):
    """(strides, storage offset, elements of the buffer) of a random layout of `shape`: the last `fixed` dims dense,
    row-major and innermost (1: a unit last dim; 2: dense [L, d] token rows), the others in a random order with
    gaps between them, a stride of 0 (an expanded dim) now and then if `expand`, and if `col_step` (fixed=0) a step of
    2 or 3 along the innermost dim."""
    nd = len(shape)
    fixed = min(fixed, nd)
    free = list(range(nd - fixed))
    if len(free) > 1 and rng.random() < 0.35:
        rng.shuffle(free)
    strides, step = [0] * nd, 1
    for k, dim in enumerate(reversed(free + list(range(nd - fixed, nd)))):  # innermost first
        if dim >= nd - fixed:
            s = step
        elif expand and shape[dim] > 1 and rng.random() < 0.15:
            continue  # stride 0
        elif k == 0:
            s = rng.choice((1, 1, 2, 3)) if col_step else 1
        else:
            s = step + rng.choice((0, 0, 0, 0, 1, 3, 8))
        strides[dim] = s
        step = max(step, s * max(shape[dim], 1))
    offset = rng.choice((0, 0, 0, 1, 5, 64))
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + 1 if all(shape) else 1
    return strides, offset, offset + span


def make_float(shape, dtype, rng, gen, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(a random strided view of `shape`, its 1-D buffer), the buffer filled by float_values."""
    strides, offset, numel = layout(tuple(shape), rng, **kw)
    base = float_values(numel, dtype, rng, gen)
    return base.as_strided(tuple(shape), strides, offset), base


def make_ids(shape, V: int, rng, gen, *, bad: bool, dtype=None, **kw) -> torch.Tensor:
    """Random int32/int64 ids of `shape` in [0, V) in a random layout, with 0 and V-1 poked in now and then, and
    with bad=True (or V=0) some ids outside [0, V)."""
    dtype = dtype or rng.choice((torch.int32, torch.int64))
    strides, offset, numel = layout(tuple(shape), rng, fixed=0, **kw)
    base = id_values(numel, V, rng, gen)
    if V == 0:
        base = torch.tensor(bad_indices(0, dtype))[torch.randint(0, len(bad_indices(0, dtype)), (numel,),
                                                                 generator=gen)]
    ids = base.to(dtype).as_strided(tuple(shape), strides, offset)
    if V and rng.random() < 0.6:
        poke(ids, rng, [0, V - 1])
    if bad:
        poke(ids, rng, [rng.choice(bad_indices(V, dtype)) for _ in range(rng.randint(1, 3))])
    return ids


def overlapping(t: torch.Tensor) -> bool:
    """Elements that share memory (an expanded dim): not writable in place."""
    return any(n > 1 and s == 0 for n, s in zip(t.shape, t.stride()))


def view_of(base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`like`'s view of a copy of its buffer."""
    return base.as_strided(like.shape, like.stride(), like.storage_offset())


# ================================================================ comparisons
def same_elements(a: torch.Tensor, b: torch.Tensor, nan_payload: bool = False) -> torch.Tensor:
    """Elementwise: the same bits (any NaN equals any NaN unless nan_payload)."""
    if a.dtype not in INT_OF:
        return a == b
    same = a.contiguous().view(INT_OF[a.dtype]) == b.contiguous().view(INT_OF[b.dtype])
    return same if nan_payload else same | (a.isnan() & b.isnan())


def assert_bits(got: torch.Tensor, want: torch.Tensor, what: str, nan_payload: bool = False) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    ok = same_elements(got, want, nan_payload)
    if not bool(ok.all()):
        at = tuple(int(i) for i in (~ok).nonzero()[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; first at {list(at)}: got "
                             f"{got[at].item()!r}, want {want[at].item()!r}")


def assert_reference_claims(want: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor) -> None:
    """The oracle against torch's own arithmetic, where the README says they agree."""
    h, t = hidden.dtype, rows.dtype
    if torch.float64 in (h, t):
        s = hidden.double() + rows.double()
        assert_bits(want, s if h == torch.float64 else s.float().to(h), "reference vs the float64 sum (rounded "
                    "through float32)")
    elif h == t and h in (torch.float16, torch.bfloat16):
        assert_bits(want, hidden + rows, "reference vs torch's same-dtype hidden + rows")
    elif h == torch.float32:
        assert_bits(want, hidden + rows.float(), "reference vs hidden + rows.float()")


class Snapshot:
    """The bytes of every storage behind some tensors: unchanged() names a tensor whose bytes moved; restore() puts
    them back."""

    def __init__(self, **tensors):
        self.items = [(name, t, self._bytes(t).clone()) for name, t in tensors.items()
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"]

    @staticmethod
    def _bytes(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())

    def unchanged(self, what: str) -> None:
        for name, t, saved in self.items:
            assert torch.equal(self._bytes(t), saved), f"{what} modified {name} ({describe(t)})"

    def restore(self) -> None:
        for _, t, saved in self.items:
            self._bytes(t).copy_(saved)


def assert_written_only_in(base_after: torch.Tensor, base_before: torch.Tensor, view: torch.Tensor, what: str):
    """Every element of a buffer outside `view` (a view of it) is as it was, to the bit."""
    inside = torch.zeros(base_after.numel(), dtype=torch.bool)
    view_of(inside, view).fill_(True)
    assert_bits(base_after[~inside], base_before[~inside], f"{what}: outside the written view", nan_payload=True)


# ================================================================ drawing shapes
D_SMALL = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65)
D_LARGE = (127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049)
TRITON_ELEMS, CPU_ELEMS = 1 << 14, 1 << 16  # per hidden: one interpreter program, and a fast CPU case


def draw_d(rng, small: bool) -> int:
    if rng.random() < 0.02:
        return 0
    return rng.choice(D_SMALL if small or rng.random() < 0.6 else D_LARGE)


def draw_count(rng, budget: int, d: int) -> int:
    """T or N: 0, 1, a few, or a few hundred, with T * d <= budget."""
    most = max(1, budget // max(d, 1))
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.2 or most < 2:
        return 1
    if r < 0.7:
        return rng.randint(2, min(40, most))
    return rng.randint(min(100, most), min(400, most))


def draw_lead(rng, budget: int, d: int) -> tuple:
    """hidden's leading shape: (T,), (a, b), (a, 1, b) or () for one token; (0, 3) and (2, 0) for none."""
    T = draw_count(rng, budget, d)
    r = rng.random()
    if T == 1 and r < 0.2:
        return ()
    if T == 0:
        return rng.choice(((0,), (0,), (0, 3), (2, 0)))
    if r < 0.55:
        return (T,)
    a = rng.choice([k for k in range(1, T + 1) if T % k == 0])
    return (a, T // a) if rng.random() < 0.7 else (a, 1, T // a)


def draw_vocab(rng, row_elems: int, allow_empty: bool) -> int:
    if allow_empty and rng.random() < 0.08:
        return 0
    return max(1, min(rng.choice((1, 2, 3, 7, 37, 64, 257, 1000, 4099)), (1 << 18) // max(row_elems, 1)))


def draw_layers(rng) -> tuple[int | None, object]:
    """(L, layer): a [V, d] table (None, None) or [V, L, d] read at 0, L-1 or between, now and then a numpy int."""
    if rng.random() < 0.4:
        return None, None
    L = rng.randint(1, 4)
    layer = rng.choice((0, L - 1, rng.randrange(L)))
    return L, (np.int64(layer) if rng.random() < 0.15 else layer)


def draw_dtypes(rng) -> tuple[torch.dtype, torch.dtype]:
    h = rng.choice(FLOATS)
    return h, (h if rng.random() < 0.4 else rng.choice(FLOATS))


def kernels_for(small: bool) -> list[str]:
    """The compiled backends of a case: 'cpu', and 'triton' for the small ones (a third of the cases)."""
    return ["cpu"] + (["triton"] if TRITON and small else [])


def fuzz_backends(name: str, n: int, draw, check) -> None:
    """fuzz() of check(draw(rng, gen, case, small), backends): 30% of the cases small, run by Triton too."""
    def body(rng, gen, case):
        small = TRITON and rng.random() < 0.3
        check(draw(rng, gen, case, small), kernels_for(small))

    fuzz(name, n, body)


# ================================================================ tol_gather_add(_)
def draw_gather(rng, gen, case: dict, small: bool, valid_only: bool = False) -> dict:
    hd, td = draw_dtypes(rng)
    d = draw_d(rng, small)
    lead = draw_lead(rng, TRITON_ELEMS if small else CPU_ELEMS, d)
    L, layer = draw_layers(rng)
    T = math.prod(lead)
    check_ids = valid_only or rng.random() < 0.75
    V = draw_vocab(rng, (L or 1) * d, allow_empty=not check_ids or T == 0)
    bad = not check_ids and (V == 0 or rng.random() < 0.6)
    table, _ = make_float((V, d) if L is None else (V, L, d), td, rng, gen, fixed=1, expand=True)
    hidden, hbase = make_float(lead + (d,), hd, rng, gen, fixed=0, col_step=True, expand=rng.random() < 0.15)
    ids = make_ids(lead, V, rng, gen, bad=bad, expand=True)
    case.update(hidden=describe(hidden), ids=describe(ids), table=describe(table), layer=repr(layer),
                check_ids=check_ids)
    return dict(hidden=hidden, hbase=hbase, ids=ids, table=table, layer=layer, check_ids=check_ids)


def check_gather(a: dict, backends: list[str]) -> None:
    hidden, hbase, ids, table, layer, check_ids = (a[k] for k in ("hidden", "hbase", "ids", "table", "layer",
                                                                  "check_ids"))
    rows = reference.tol_rows(table, ids, layer)
    want = reference.tol_gather_add(hidden, ids, table, layer)
    assert_reference_claims(want, hidden, rows)
    snap = Snapshot(hidden=hidden, ids=ids, table=table)
    check_both("tol_gather_add", lambda h, b: mk.tol_gather_add(h, ids, table, layer, backend=b, check_ids=check_ids),
               lambda h, b: mk.tol_gather_add_(h, ids, table, layer, backend=b, check_ids=check_ids),
               hidden, hbase, want, snap, backends)


def check_both(name: str, op, op_, hidden, hbase, want, snap: Snapshot, backends: list[str]) -> None:
    """The functional op(hidden, backend) and the in-place op_(h, backend) (on a copy of hidden's buffer) of every
    backend: want bit for bit, a contiguous output, its inputs unchanged, and op_ writing nothing outside h."""
    for b in ["reference"] + backends:
        out = op(hidden, b)
        assert out.is_contiguous(), f"{b}: a non-contiguous output {describe(out)}"
        assert_bits(out, want, f"{name} {b}")
        snap.unchanged(f"{name} {b}")
    if overlapping(hidden):
        return
    for b in ["reference"] + backends:
        base = hbase.clone()
        h = view_of(base, hidden)
        assert op_(h, b) is h
        assert_bits(h, want, f"{name}_ {b}")
        assert_written_only_in(base, hbase, h, f"{name}_ {b}")
        snap.unchanged(f"{name}_ {b}")


def test_gather_add_matches_reference():
    fuzz_backends("gather_add", 800, draw_gather, check_gather)


# ================================================================ tol_cached_gather_add(_)
def slot_values(n: int, C: int, rng, gen) -> torch.Tensor:
    """A slot map's entries: -1 (miss), a slot in [0, C) (hit), or outside the cache (a miss that must not be read)."""
    miss, bogus = rng.random(), rng.random() * 0.3
    r = torch.rand(n, generator=gen)
    x = torch.where((r >= miss) & (C > 0), torch.randint(0, max(C, 1), (n,), generator=gen), -1)
    wild = torch.tensor([C, C + 3, -2, -(2**31), 2**31 - 1])[torch.randint(0, 5, (n,), generator=gen)]
    return torch.where(torch.rand(n, generator=gen) < bogus, wild, x).to(torch.int32)


def draw_cached(rng, gen, case: dict, small: bool, valid_only: bool = False) -> dict:
    hd, cd = draw_dtypes(rng)
    d = draw_d(rng, small)
    lead = draw_lead(rng, TRITON_ELEMS if small else CPU_ELEMS, d)
    L, layer = draw_layers(rng)
    if d == 0 and L is not None:  # (see draw_row)
        L, layer = 1, 0
    T = math.prod(lead)
    check_ids = valid_only or rng.random() < 0.75
    V = draw_vocab(rng, (L or 1) * d, allow_empty=not check_ids or T == 0)
    row = (d,) if L is None else (L, d)
    C = rng.choice((0, 1, 2, 5, max(1, V // 2), V, V + 3))
    host, _ = make_float((V,) + row, cd, rng, gen, fixed=len(row), expand=True)
    cache, _ = make_float((C,) + row, cd, rng, gen, fixed=1, expand=True)
    strides, offset, numel = layout((V,), rng, fixed=0, expand=True)
    slot_map = slot_values(numel, C, rng, gen).as_strided((V,), strides, offset)
    hidden, hbase = make_float(lead + (d,), hd, rng, gen, fixed=0, col_step=True, expand=rng.random() < 0.15)
    ids = make_ids(lead, V, rng, gen, bad=not check_ids and (V == 0 or rng.random() < 0.6), expand=True)
    case.update(hidden=describe(hidden), ids=describe(ids), slot_map=describe(slot_map), cache=describe(cache),
                host_table=describe(host), layer=repr(layer), check_ids=check_ids)
    return dict(hidden=hidden, hbase=hbase, ids=ids, slot_map=slot_map, cache=cache, host_table=host, layer=layer,
                check_ids=check_ids)


def check_cached(a: dict, backends: list[str]) -> None:
    hidden, hbase, ids, slot_map, cache, host, layer, check_ids = (
        a[k] for k in ("hidden", "hbase", "ids", "slot_map", "cache", "host_table", "layer", "check_ids"))
    want = oref.tol_cached_gather_add(hidden, ids, slot_map, cache, host, layer)
    # The spec of the cached op: tol_gather_add over the table the cache stands for (cache rows on hits).
    table = host.contiguous().clone()
    s = slot_map.long()
    hit = (s >= 0) & (s < cache.shape[0])
    if bool(hit.any()):
        table[hit] = cache[s[hit]]
    assert_bits(want, reference.tol_gather_add(hidden, ids, table, layer), "cached reference vs tol_gather_add over "
                "the cached table")
    snap = Snapshot(hidden=hidden, ids=ids, slot_map=slot_map, cache=cache, host_table=host)
    check_both("tol_cached_gather_add",
               lambda h, b: mk.tol_cached_gather_add(h, ids, slot_map, cache, host, layer, backend=b,
                                                     check_ids=check_ids),
               lambda h, b: mk.tol_cached_gather_add_(h, ids, slot_map, cache, host, layer, backend=b,
                                                      check_ids=check_ids),
               hidden, hbase, want, snap, backends)


def test_cached_gather_add_matches_reference():
    fuzz_backends("cached_gather_add", 700, draw_cached, check_cached)


@pytest.mark.skipif(not INTERPRETED, reason="Triton's interpreter only (TRITON_INTERPRET=1)")
def test_triton_bfloat16_conversions_are_exact():
    """Every bfloat16 read exactly, and float32 sums rounded to nearest even into bfloat16, subnormals included, by the
    Triton kernels under the interpreter: its own conversions read bfloat16 subnormals as 0 or garbage (2.8e-40 as
    5.9e-39), stored float32 subnormal sums as up to 40000 times themselves (5.3e-44 as 2.2e-39) and truncated the
    others. A reduced repro: bfloat16 -2^-126 + float32 2^-129 gave -0.75 * 2^-126 for -0.875 * 2^-126."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)[:, None]
    ids = torch.arange(every.shape[0])
    g = torch.Generator().manual_seed(SEED)
    sums = torch.randn(every.shape[0], 1, generator=g) * torch.exp2(torch.randint(-150, 20, every.shape, generator=g))
    ties = (torch.randint(-(2**15), 2**15, every.shape, generator=g) * 2**16 + 2**15).int().view(torch.float32)
    for hidden, table in ((torch.zeros(every.shape), every), (torch.zeros_like(every), sums),
                          (torch.zeros_like(every), ties), (every, sums), (every.flip(0), every)):
        want = reference.tol_gather_add(hidden, ids, table)
        for op in (lambda: mk.tol_gather_add(hidden, ids, table, backend="triton"),
                   lambda: mk.tol_cached_gather_add(hidden, ids, torch.full(ids.shape, -1, dtype=torch.int32),
                                                    table[:0], table, backend="triton")):
            assert_bits(op(), want, f"{hidden.dtype} + {table.dtype}")
    assert_bits(reference.tol_gather_add(torch.tensor([[-(2**-126)]], dtype=torch.bfloat16), torch.tensor([0]),
                                         torch.tensor([[2**-129]])), torch.tensor([[-0.875 * 2**-126]],
                                                                                  dtype=torch.bfloat16), "repro")


# ================================================================ tol_host_gather
def draw_row(rng, small: bool) -> tuple:
    """A token row of a dense-row table: (d,) or (L, d). Not (L > 1, 0): torch makes [V, L, 0] contiguous with
    stride(1) = 1, and the dense-row check (stride(1) == d) refuses it on every backend alike."""
    d = draw_d(rng, small)
    return (d,) if rng.random() < 0.4 else (rng.randint(1, 4) if d else 1, d)


def draw_host_gather(rng, gen, case: dict, small: bool, valid_only: bool = False) -> dict:
    dtype = rng.choice(FLOATS)
    row = draw_row(rng, small)
    N = draw_count(rng, TRITON_ELEMS if small else CPU_ELEMS, math.prod(row))
    check_ids = valid_only or rng.random() < 0.75
    V = draw_vocab(rng, math.prod(row), allow_empty=not check_ids or N == 0)
    table, _ = make_float((V,) + row, dtype, rng, gen, fixed=len(row), expand=True)
    ids = make_ids((N,), V, rng, gen, bad=not check_ids and (V == 0 or rng.random() < 0.5), expand=True)
    rows = None
    if rng.random() < 0.5:
        M = N + rng.randint(0, 4)
        rdtype = rng.choice((torch.int32, torch.int64))
        if valid_only or rng.random() < 0.75:  # distinct destinations
            rows = torch.randperm(M, generator=gen)[:N].to(rdtype)
        else:  # repeated destinations: see check_host_gather
            rows = torch.randint(0, max(M, 1), (N,), generator=gen).to(rdtype)
        if not check_ids and rng.random() < 0.5:
            poke(rows, rng, [rng.choice(bad_indices(M, rdtype)) for _ in range(rng.randint(1, 3))])
        if rng.random() < 0.3:  # a strided view of the same values
            rows = torch.stack([rows, rows], 1).reshape(-1)[::2]
    else:
        M = N + rng.randint(0, 3)
    out, obase = make_float((M,) + row, dtype, rng, gen, fixed=len(row))
    case.update(table=describe(table), ids=describe(ids), out=describe(out), rows=describe(rows),
                check_ids=check_ids)
    return dict(table=table, ids=ids, out=out, obase=obase, rows=rows, check_ids=check_ids)


def repeated(rows) -> bool:
    return rows is not None and bool((rows.unique(return_counts=True)[1] > 1).any())


def assert_one_of_its_writes(out: torch.Tensor, before: torch.Tensor, table, ids, rows, what: str) -> None:
    """A destination given more than once (the op does not say which write wins: index_copy_'s order is its own,
    and parallel kernels race): each element of each destination row is that element of one of its sources."""
    sources = reference.nan_where_bad(table[reference.valid_ids(ids, table.shape[0])[0]] if table.shape[0] else
                                      table.new_empty(ids.shape[0], *table.shape[1:]),
                                      reference.valid_ids(ids, table.shape[0])[1])
    for r in range(out.shape[0]):
        writers = [k for k in range(rows.shape[0]) if int(rows[k]) == r]
        if not writers:
            assert_bits(out[r], before[r], f"{what}: row {r}, written by no one")
            continue
        ok = torch.zeros(out[r].shape, dtype=torch.bool)
        for k in writers:
            ok |= same_elements(out[r], sources[k])
        assert bool(ok.all()), f"{what}: row {r} holds values none of its {len(writers)} writes ({writers}) wrote"


def check_host_gather(a: dict, backends: list[str]) -> None:
    table, ids, out, obase, rows, check_ids = (a[k] for k in ("table", "ids", "out", "obase", "rows", "check_ids"))
    want = obase.clone()
    oref.tol_host_gather(table, ids, view_of(want, out), rows)
    snap = Snapshot(table=table, ids=ids, rows=rows)
    for b in ["reference"] + backends:
        base = obase.clone()
        o = view_of(base, out)
        assert mk.tol_host_gather(table, ids, o, rows, backend=b, check_ids=check_ids) is o
        if repeated(rows):
            assert_one_of_its_writes(o, view_of(obase, out), table, ids, rows, f"tol_host_gather {b}")
            assert_written_only_in(base, obase, o, f"tol_host_gather {b}")
        else:
            assert_bits(base, want, f"tol_host_gather {b}: out's buffer")
        snap.unchanged(f"tol_host_gather {b}")


def test_host_gather_matches_reference():
    fuzz_backends("host_gather", 400, draw_host_gather, check_host_gather)


# ================================================================ tol_cache_prefetch
def draw_prefetch(rng, gen, case: dict, valid_only: bool = False) -> dict:
    dtype = rng.choice(FLOATS)
    row = draw_row(rng, False)
    N = draw_count(rng, CPU_ELEMS, math.prod(row))
    check_ids = valid_only or rng.random() < 0.75
    V = draw_vocab(rng, math.prod(row), allow_empty=not check_ids or N == 0)
    C = rng.choice((0, 1, 3, max(1, V // 2), V + 2))
    host, _ = make_float((V,) + row, dtype, rng, gen, fixed=len(row), expand=True)
    cache, _ = make_float((C,) + row, dtype, rng, gen, fixed=len(row), expand=True)
    strides, offset, numel = layout((V,), rng, fixed=0, expand=True)
    slot_map = slot_values(numel, C, rng, gen).as_strided((V,), strides, offset)
    ids = make_ids((N,), V, rng, gen, bad=not check_ids and (V == 0 or rng.random() < 0.6), expand=True)
    out, obase = make_float((N + rng.randint(0, 3),) + row, dtype, rng, gen, fixed=len(row))
    junk = torch.randint(-9, 9, (2 * N + 3,), generator=gen, dtype=torch.int32)  # overwritten
    first, slots = junk[1:N + 1], junk[N + 2:2 * N + 2]
    L = row[0] if len(row) == 2 else 1
    begin = rng.randint(0, L)
    end = rng.choice((None, rng.randint(begin, L)))
    case.update(ids=describe(ids), slot_map=describe(slot_map), cache=describe(cache), host_table=describe(host),
                out=describe(out), layers=(begin, end), check_ids=check_ids)
    return dict(ids=ids, slot_map=slot_map, cache=cache, host_table=host, out=out, obase=obase, first=first,
                slots=slots, layer_begin=begin, layer_end=end, check_ids=check_ids)


def check_prefetch(a: dict, backends: list[str]) -> None:
    ids, slot_map, cache, host, out, obase, first, slots, begin, end, check_ids = (
        a[k] for k in ("ids", "slot_map", "cache", "host_table", "out", "obase", "first", "slots", "layer_begin",
                       "layer_end", "check_ids"))
    want, want_first, want_slots = obase.clone(), first.clone(), slots.clone()
    oref.tol_cache_prefetch(ids, slot_map, cache, host, view_of(want, out), want_first, want_slots, begin, end)
    snap = Snapshot(ids=ids, slot_map=slot_map, cache=cache, host_table=host)
    for b in ["reference"] + backends:
        base, f, s = obase.clone(), first.clone(), slots.clone()
        mk.tol_cache_prefetch(ids, slot_map, cache, host, view_of(base, out), f, s, begin, end, backend=b,
                              check_ids=check_ids)
        assert_bits(base, want, f"tol_cache_prefetch {b}: out's buffer")
        assert torch.equal(f, want_first), f"tol_cache_prefetch {b}: first {f.tolist()} != {want_first.tolist()}"
        assert torch.equal(s, want_slots), f"tol_cache_prefetch {b}: slots {s.tolist()} != {want_slots.tolist()}"
        snap.unchanged(f"tol_cache_prefetch {b}")


def test_cache_prefetch_matches_reference():
    fuzz("cache_prefetch", 500, lambda rng, gen, case: check_prefetch(draw_prefetch(rng, gen, case), ["cpu"]))


# ================================================================ tol_cache_admit
HOT = oref.HOT_STAMP


def draw_admit_state(rng, gen, V: int, C: int, row: tuple, dtype) -> list[torch.Tensor]:
    """[slot_map, owner, last_use, admitted_at, cache, counters]: as the engine keeps them (hot slots, LRU tail, free
    slots), or arbitrary (slots and owners out of range or disagreeing, any stamps): the kernel and the reference
    must still decide alike."""
    slot_map = torch.full((V,), -1, dtype=torch.int32)
    owner = torch.full((C,), -1, dtype=torch.int32)
    last_use = torch.full((C,), -1, dtype=torch.int64)
    admitted_at = torch.full((C,), -1, dtype=torch.int64)
    counters = torch.zeros(len(oref.ADMIT_COUNTERS), dtype=torch.int64)
    if rng.random() < 0.7:  # consistent
        tokens = torch.randperm(V, generator=gen)[:rng.randint(0, min(V, C))].tolist()
        for slot, tok in zip(torch.randperm(C, generator=gen).tolist(), tokens):
            slot_map[tok], owner[slot] = slot, tok
            last_use[slot] = HOT if rng.random() < 0.3 else rng.randint(0, 50)
            admitted_at[slot] = rng.randint(0, 3)
        counters[0], counters[1] = 60, rng.randint(0, 3)
    else:  # arbitrary
        slot_map = torch.randint(-2, C + 3, (V,), generator=gen, dtype=torch.int32)
        owner = torch.randint(-2, V + 3, (C,), generator=gen, dtype=torch.int32)
        last_use = torch.tensor([rng.choice((-1, HOT, rng.randint(0, 9), 2**62)) for _ in range(C)], dtype=torch.int64)
        admitted_at = torch.randint(-1, 4, (C,), generator=gen)
        counters = torch.randint(0, 4, (len(oref.ADMIT_COUNTERS),), generator=gen)
    cache = float_values(C * math.prod(row), dtype, rng, gen).view((C,) + row)
    return [slot_map, owner, last_use, admitted_at, cache, counters]


def test_cache_admit_matches_reference():
    names = ("slot_map", "owner", "last_use", "admitted_at", "cache", "counters")

    def body(rng, gen, case):
        dtype = rng.choice(FLOATS)
        row = (rng.choice((1, 3, 8)),) if rng.random() < 0.4 else (rng.randint(1, 3), rng.choice((1, 5, 8)))
        V, C = rng.choice((1, 4, 20, 61)), rng.choice((0, 1, 3, 10))
        mine = draw_admit_state(rng, gen, V, C, row, dtype)
        theirs = [t.clone() for t in mine]
        case.update(dtype=dtype, row=row, V=V, C=C)
        for step in range(rng.randint(1, 4)):
            N = rng.choice((0, 1, 3, 12, 40))
            ids = make_ids((N,), V, rng, gen, bad=rng.random() < 0.2)
            first = oref.first_occurrence(ids)
            s = theirs[0][reference.valid_ids(ids, V)[0]].long()
            slots = torch.where(reference.valid_ids(ids, V)[1] & (s >= 0) & (s < C), s, -1).to(torch.int32)
            rows, _ = make_float((N + rng.randint(0, 2),) + row, dtype, rng, gen, fixed=len(row))
            case[f"step{step}"] = describe(ids)
            snap = Snapshot(ids=ids, first=first, slots=slots, rows=rows)
            mk.tol_cache_admit(ids, first, slots, rows, *mine, backend="cpu")
            oref.tol_cache_admit(ids, first, slots, rows, *theirs)
            snap.unchanged("tol_cache_admit")
            for name, got, want in zip(names, mine, theirs):
                assert_bits(got, want, f"step {step}: {name}", nan_payload=name != "cache")

    fuzz("cache_admit", 400, body)


# ================================================================ decode_attention
@pytest.mark.skipif(not TRITON, reason="no Triton backend here")
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_decode_attention_matches_reference():
    def body(rng, gen, case):
        B, Hkv = rng.choice((0, 1, 1, 2, 3)), rng.choice((1, 1, 2))
        H = Hkv * rng.choice((1, 2, 3))
        hd = rng.choice((2, 4, 6, 8, 10, 16, 32))
        S = rng.randint(1100, 1200) if rng.random() < 0.08 and B * H <= 4 else rng.randint(1, 40)
        pos = rng.choice((0, S - 1, rng.randrange(S)))
        pad = torch.tensor([rng.choice((0, 0, rng.randint(0, S))) for _ in range(B)], dtype=torch.int64)
        P = max(pos - (int(pad.min()) if B else 0), 0) + 1 + rng.randint(0, 3)  # RoPE rows up to the furthest
        dtype = rng.choice(FLOATS)
        cache_dtype = dtype if rng.random() < 0.75 else rng.choice(FLOATS)
        W = (H + 2 * Hkv) * hd
        qkv = torch.randn(B, W + 7, generator=gen, dtype=torch.float64).to(dtype)
        off = rng.choice((0, 0, 3, 7))
        qkv = qkv[:, off:off + W]
        strides, offset, numel = layout((B, Hkv, S, hd), rng, fixed=1)
        k = torch.randn(numel, generator=gen, dtype=torch.float64).to(cache_dtype).as_strided((B, Hkv, S, hd),
                                                                                             strides, offset)
        v = torch.randn(numel, generator=gen, dtype=torch.float64).to(cache_dtype).as_strided((B, Hkv, S, hd),
                                                                                             strides, offset)
        cos, sin = (torch.randn(P, hd // 2, generator=gen) for _ in range(2))
        pdt = rng.choice((torch.int32, torch.int64))
        p, pad = torch.tensor([pos], dtype=pdt), pad.to(rng.choice((torch.int32, torch.int64)))
        case.update(qkv=describe(qkv), k_cache=describe(k), H=H, pos=pos, pad=pad.tolist(), P=P)
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        snap = Snapshot(qkv=qkv, cos=cos, sin=sin, pos=p, pad=pad)
        y = mk.decode_attention(qkv, k1, v1, cos, sin, p, pad, H, backend="triton")
        snap.unchanged("decode_attention")
        want = reference.decode_attention(qkv, k2, v2, cos, sin, p, pad, H)
        narrow = max((dtype, cache_dtype), key=lambda t: ULP[t])
        torch.testing.assert_close(y, want, **ATTN_TOL[narrow])
        others = torch.ones(S, dtype=torch.bool)
        others[pos] = False
        assert_bits(k1[:, :, others], k[:, :, others], "k_cache off the token's slot", nan_payload=True)
        assert_bits(v1[:, :, others], v[:, :, others], "v_cache off the token's slot", nan_payload=True)
        bound = rotation_size(qkv, k.shape, cos, sin, pad, pos) * ULP[narrow] * 2
        assert bool(((k1[:, :, pos].double() - k2[:, :, pos].double()).abs() <= bound).all()), "the appended key"
        assert_bits(v1[:, :, pos], v2[:, :, pos], "the appended value (a copy, rounded once where it narrows)")

    fuzz("decode_attention", 50, body)


@pytest.mark.skipif(not TRITON, reason="no Triton backend here")
def test_decode_attention_appends_values_rounded_once():
    """The appended value is qkv's rounded once to the cache's dtype, as the reference's .to(), for a float16 qkv over
    a bfloat16 cache and the other way round: under the interpreter the kernel's plain cast truncated (float16
    1 + 7 * 2^-10 was stored as bfloat16 1, not 1 + 2^-7; bfloat16 1.5 * 2^-25 as float16 0, not 2^-24)."""
    for qkv_dtype, cache_dtype, value in ((torch.float16, torch.bfloat16, 1 + 7 * 2**-10),
                                          (torch.bfloat16, torch.float16, 1.5 * 2**-25)):
        qkv, k, v, cos, sin, pos, pad = attn_good()  # B=2, n_head=4, 2 key/value heads of 8, pos 5
        qkv, k, v = qkv.to(qkv_dtype), k.to(cache_dtype), v.to(cache_dtype)
        qkv.view(2, 8, 8)[:, 6:] = value  # the values
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        mk.decode_attention(qkv, k1, v1, cos, sin, pos, pad, 4, backend="triton")
        reference.decode_attention(qkv, k2, v2, cos, sin, pos, pad, 4)
        assert_bits(v1, v2, f"{qkv_dtype} values in a {cache_dtype} cache", nan_payload=True)


# ================================================================ invalid input
class Fault(NamedTuple):
    """A change that makes a valid call invalid. raises: what every public backend raises for it alone. kind: 'meta'
    (shapes, dtypes, layer: every raw op and fake kernel checks it), 'data' (an id or row out of range: the C++ ops
    check it, the raw Triton ops write NaN instead), 'address' (memory shared or written: not on meta tensors),
    'python' (an argument type only the public wrappers check)."""
    name: str
    apply: Callable
    raises: type
    kind: str = "meta"
    when: Callable = lambda a: True


def _set(**kw):
    """A fault that replaces arguments: each value a function of (args, rng)."""
    return lambda a, rng: a.update({k: f(a, rng) for k, f in kw.items()})


def _bad_id(key, bound_key):
    def apply(a, rng):
        a[key] = a[key].clone()
        bound = a[bound_key].shape[0]
        poke(a[key], rng, [rng.choice(bad_indices(bound, a[key].dtype))])
    return apply


def _strided_last(t: torch.Tensor) -> torch.Tensor:
    """t's values with a last dim of stride 2."""
    return torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]


def _not_dense_rows(t: torch.Tensor) -> torch.Tensor:
    """t's values with token rows that are not dense: [V, L, d] layers d + 1 apart, else a column step of 2."""
    if t.dim() == 3 and t.shape[1] > 1:
        return torch.zeros(*t.shape[:2], t.shape[2] + 1, dtype=t.dtype)[..., :t.shape[2]].copy_(t)
    return _strided_last(t)


def _sharing(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and typed like t over other's bytes, from other's first element (so over it whatever its
    storage offset), or from its storage's start where the rest of the storage is too short."""
    need = t.numel() * t.element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(other.untyped_storage())
    start = other.storage_offset() * other.element_size()
    start = min(start - start % t.element_size(), raw.numel() - need)
    return raw[start:start + need].view(t.dtype).view(t.shape) if t.numel() else t


def _expanded(t: torch.Tensor) -> torch.Tensor:
    return t[:1].expand(t.shape) if t.dim() and t.shape[0] > 1 else t


def _big_enough(key, other):
    return lambda a: a[key].numel() > 0 and (a[key].numel() * a[key].element_size()
                                             <= a[other].untyped_storage().nbytes())


def _inference(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _with_more(t: torch.Tensor, dim: int, k: int = 1) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] += k
    return torch.zeros(shape, dtype=t.dtype)


def table_faults(key: str, bound: str, hidden_ok: bool = True) -> list[Fault]:
    """Faults of (hidden, ids, `key`, layer): tol_gather_add's arguments, or the cached op's with the cache as table
    (ids are bounded by `bound`'s rows)."""
    three = lambda a: a[key].dim() == 3  # noqa: E731
    return [
        Fault("id-out-of-range", _bad_id("ids", bound), IndexError, "data", lambda a: a["ids"].numel() > 0),
        Fault("ids-float", _set(ids=lambda a, r: a["ids"].float()), TypeError),
        Fault("ids-int16", _set(ids=lambda a, r: a["ids"].to(r.choice((torch.int16, torch.uint8, torch.bool)))),
              TypeError),
        Fault("hidden-int", _set(hidden=lambda a, r: a["hidden"].to(r.choice((torch.int64, torch.int32)))),
              TypeError),
        Fault("hidden-complex", _set(hidden=lambda a, r: a["hidden"].to(torch.complex64)), TypeError),
        Fault(f"{key}-int", _set(**{key: lambda a, r: a[key].to(torch.int32)}), TypeError),
        Fault("ids-shape", _set(ids=lambda a, r: a["ids"][..., :-1] if a["ids"].dim() and a["ids"].shape[-1] and
                                r.random() < 0.5 else a["ids"].unsqueeze(0)), ValueError),
        Fault("d-mismatch", _set(**{key: lambda a, r: _with_more(a[key], -1, r.choice((1, -1)) if a[key].shape[-1]
                                                                 else 1)}), ValueError),
        Fault(f"{key}-1d", _set(**{key: lambda a, r: a[key].reshape(-1)}), ValueError),
        Fault(f"{key}-4d", _set(**{key: lambda a, r: a[key].unsqueeze(1)}), ValueError),
        Fault("layer-out-of-range", _set(layer=lambda a, r: r.choice((a[key].shape[1], a[key].shape[1] + 3, -1,
                                                                      2**31, -(2**63)))), IndexError, when=three),
        Fault("layer-beyond-int64", _set(layer=lambda a, r: r.choice((2**63, -(2**63) - 1, 2**70))), IndexError,
              "python", when=three),
        Fault("layer-missing", _set(layer=lambda a, r: None), ValueError, when=three),
        Fault("layer-for-2d-table", _set(layer=lambda a, r: r.choice((0, 1))), ValueError,
              when=lambda a: a[key].dim() == 2),
        Fault("layer-type", _set(layer=lambda a, r: r.choice((0.0, True, torch.tensor(0), "0", np.float64(0)))),
              TypeError, "python"),
        Fault(f"{key}-column-stride", _set(**{key: lambda a, r: _strided_last(a[key])}), ValueError,
              when=lambda a: a[key].shape[-1] > 1),
        Fault("hidden-0d", _set(hidden=lambda a, r: torch.tensor(1.0, dtype=a["hidden"].dtype)), ValueError),
        Fault("check_ids-type", _set(check_ids=lambda a, r: r.choice(("no", None, 1, np.bool_(True)))), TypeError,
              "python"),
        Fault("hidden-a-list", _set(hidden=lambda a, r: a["hidden"].tolist()), TypeError, "python"),
        Fault("ids-on-meta", _set(ids=lambda a, r: a["ids"].to("meta")), RuntimeError, "address"),
    ]


INPLACE_FAULTS = [  # the ops that write hidden
    Fault("hidden-expanded", _set(hidden=lambda a, r: _expanded(a["hidden"])), RuntimeError, "address",
          lambda a: a["hidden"].dim() > 1 and a["hidden"].shape[0] > 1),
    Fault("hidden-requires-grad", _set(hidden=lambda a, r: _grad(a["hidden"])), RuntimeError, "address",
          lambda a: a["hidden"].dtype in FLOATS),
    Fault("hidden-inference-tensor", _set(hidden=lambda a, r: _inference(a["hidden"])), RuntimeError, "address"),
]


def aliasing(*reads) -> list[Fault]:
    """hidden (written in place) over the bytes of one of `reads`."""
    return [Fault(f"hidden-over-{k}", _set(hidden=lambda a, r, k=k: _sharing(a["hidden"], a[k])), RuntimeError,
                  "address", _big_enough("hidden", k)) for k in reads]


def valid_small_gather(rng, gen, inplace: bool) -> dict:
    hd, td = draw_dtypes(rng)
    d, L = rng.choice((1, 4, 8, 9)), rng.choice((None, 1, 3))
    lead = rng.choice(((0,), (1,), (3,), (6,), (2, 3)))
    V = rng.choice((1, 5, 11))
    table = float_values(V * (L or 1) * d, td, rng, gen).view((V, d) if L is None else (V, L, d))
    hidden = float_values(math.prod(lead) * d, hd, rng, gen).view(lead + (d,))
    return dict(hidden=hidden, ids=make_ids(lead, V, rng, gen, bad=False), table=table,
                layer=None if L is None else rng.randrange(L), check_ids=True)


def valid_small_cached(rng, gen, inplace: bool) -> dict:
    a = valid_small_gather(rng, gen, inplace)
    V, row = a["table"].shape[0], a["table"].shape[1:]
    C = rng.choice((0, 2, 4))
    a["host_table"] = a.pop("table").to(rng.choice(FLOATS))
    a["cache"] = float_values(C * math.prod(row), a["host_table"].dtype, rng, gen).view((C,) + tuple(row))
    a["slot_map"] = slot_values(V, C, rng, gen)
    return a


GATHER_FAULTS = table_faults("table", "table")
CACHED_FAULTS = table_faults("cache", "host_table") + [
    Fault("slot_map-int64", _set(slot_map=lambda a, r: a["slot_map"].long()), TypeError),
    Fault("slot_map-length", _set(slot_map=lambda a, r: a["slot_map"][:-1]), ValueError),
    Fault("slot_map-2d", _set(slot_map=lambda a, r: a["slot_map"][None]), ValueError),
    Fault("host_table-dtype", _set(host_table=lambda a, r: a["host_table"].to(
        r.choice([t for t in FLOATS if t != a["host_table"].dtype]))), TypeError),
    Fault("host_table-row-shape", _set(host_table=lambda a, r: a["host_table"].unsqueeze(1) if a["host_table"].dim()
                                       == 2 else a["host_table"][:, :1].expand(-1, 2, -1)), ValueError,
          when=lambda a: a["host_table"].dim() == 2 or a["host_table"].shape[1] != 2),
    Fault("host_table-not-dense", _set(host_table=lambda a, r: _not_dense_rows(a["host_table"])), ValueError,
          when=lambda a: a["host_table"].shape[-1] > 1),
]


def call_gather(a, backend, inplace):
    f = mk.tol_gather_add_ if inplace else mk.tol_gather_add
    return f(a["hidden"], a["ids"], a["table"], a["layer"], backend=backend, check_ids=a["check_ids"])


def raw_gather(a, which, inplace):
    args = (a["hidden"], a["ids"], a["table"], a["layer"])
    if which == "triton":
        return getattr(ops, "tol_gather_add_triton_" if inplace else "tol_gather_add_triton")(*args)
    return getattr(ops, "tol_gather_add_" if inplace else "tol_gather_add")(*args, a["check_ids"])


def call_cached(a, backend, inplace):
    f = mk.tol_cached_gather_add_ if inplace else mk.tol_cached_gather_add
    return f(a["hidden"], a["ids"], a["slot_map"], a["cache"], a["host_table"], a["layer"], backend=backend,
             check_ids=a["check_ids"])


def raw_cached(a, which, inplace):
    args = (a["hidden"], a["ids"], a["slot_map"], a["cache"], a["host_table"], a["layer"])
    if which == "triton":
        return getattr(ops, "tol_cached_gather_add_triton_" if inplace else "tol_cached_gather_add_triton")(*args)
    return getattr(ops, "tol_cached_gather_add_" if inplace else "tol_cached_gather_add")(*args, a["check_ids"])


def valid_small_host_gather(rng, gen, inplace: bool) -> dict:
    dtype = rng.choice(FLOATS)
    row = rng.choice(((4,), (2, 3), (1, 8)))
    V, N = rng.choice((1, 5, 9)), rng.choice((0, 1, 4))
    rows = torch.randperm(N + 2, generator=gen)[:N] if rng.random() < 0.5 else None
    return dict(table=float_values(V * math.prod(row), dtype, rng, gen).view((V,) + row),
                ids=make_ids((N,), V, rng, gen, bad=False), out=torch.zeros((N + 2,) + row, dtype=dtype), rows=rows,
                check_ids=True)


HOST_GATHER_FAULTS = [
    Fault("id-out-of-range", _bad_id("ids", "table"), IndexError, "data", lambda a: a["ids"].numel() > 0),
    Fault("row-out-of-range", _bad_id("rows", "out"), IndexError, "data",
          lambda a: a["rows"] is not None and a["rows"].numel() > 0),
    Fault("ids-float", _set(ids=lambda a, r: a["ids"].float()), TypeError),
    Fault("rows-float", _set(rows=lambda a, r: a["rows"].float()), TypeError, when=lambda a: a["rows"] is not None),
    Fault("out-dtype", _set(out=lambda a, r: a["out"].to(r.choice([t for t in FLOATS if t != a["out"].dtype]))),
          TypeError),
    Fault("table-int", _set(table=lambda a, r: a["table"].to(torch.int16)), TypeError),
    Fault("ids-2d", _set(ids=lambda a, r: a["ids"][None]), ValueError),
    Fault("rows-length", _set(rows=lambda a, r: torch.cat([a["rows"], a["rows"].new_zeros(1)])), ValueError,
          when=lambda a: a["rows"] is not None),
    Fault("out-too-small", _set(out=lambda a, r: a["out"][:a["ids"].shape[0] - 1]), ValueError,
          when=lambda a: a["rows"] is None and a["ids"].numel() > 0),
    Fault("out-row-shape", _set(out=lambda a, r: _with_more(a["out"], -1)), ValueError),
    Fault("table-not-dense", _set(table=lambda a, r: _not_dense_rows(a["table"])), ValueError,
          when=lambda a: a["table"].shape[-1] > 1),
    Fault("out-not-dense", _set(out=lambda a, r: _not_dense_rows(a["out"])), ValueError,
          when=lambda a: a["out"].shape[-1] > 1),
    Fault("table-1d", _set(table=lambda a, r: a["table"].reshape(-1)), ValueError),
    Fault("out-expanded", _set(out=lambda a, r: _expanded(a["out"])), ValueError, "address"),
    Fault("out-over-table", _set(out=lambda a, r: _sharing(a["out"], a["table"])), ValueError, "address",
          _big_enough("out", "table")),
    Fault("check_ids-type", _set(check_ids=lambda a, r: r.choice(("no", None, 1))), TypeError, "python"),
    Fault("out-requires-grad", _set(out=lambda a, r: _grad(a["out"])), RuntimeError, "address"),
    Fault("out-inference-tensor", _set(out=lambda a, r: _inference(a["out"])), RuntimeError, "address"),
]


def call_host_gather(a, backend, inplace):
    return mk.tol_host_gather(a["table"], a["ids"], a["out"], a["rows"], backend=backend, check_ids=a["check_ids"])


def raw_host_gather(a, which, inplace):
    if which == "triton":
        return ops.tol_host_gather_triton(a["table"], a["ids"], a["out"], a["rows"])
    return ops.tol_host_gather(a["table"], a["ids"], a["out"], a["rows"], a["check_ids"])


def valid_small_prefetch(rng, gen, inplace: bool) -> dict:
    dtype = rng.choice(FLOATS)
    row = rng.choice(((4,), (3, 2)))
    V, C, N = rng.choice((2, 7)), rng.choice((0, 2)), rng.choice((0, 1, 5))
    L = row[0] if len(row) == 2 else 1
    return dict(ids=make_ids((N,), V, rng, gen, bad=False), slot_map=slot_values(V, C, rng, gen),
                cache=float_values(C * math.prod(row), dtype, rng, gen).view((C,) + row),
                host_table=float_values(V * math.prod(row), dtype, rng, gen).view((V,) + row),
                out=torch.zeros((N + 1,) + row, dtype=dtype), first=torch.zeros(N, dtype=torch.int32),
                slots=torch.zeros(N, dtype=torch.int32), layer_begin=0, layer_end=rng.choice((None, L)),
                check_ids=True)


PREFETCH_FAULTS = [
    Fault("id-out-of-range", _bad_id("ids", "host_table"), IndexError, "data", lambda a: a["ids"].numel() > 0),
    Fault("ids-2d", _set(ids=lambda a, r: a["ids"][None]), ValueError),
    Fault("ids-float", _set(ids=lambda a, r: a["ids"].double()), TypeError),
    Fault("first-int64", _set(first=lambda a, r: a["first"].long()), TypeError),
    Fault("slots-strided", _set(slots=lambda a, r: torch.zeros(2 * a["slots"].numel(), dtype=torch.int32)[::2]),
          ValueError, when=lambda a: a["slots"].numel() > 1),
    Fault("first-length", _set(first=lambda a, r: torch.zeros(a["first"].numel() + 1, dtype=torch.int32)),
          ValueError),
    Fault("out-too-small", _set(out=lambda a, r: a["out"][:a["ids"].shape[0] - 1]), ValueError,
          when=lambda a: a["ids"].numel() > 0),
    Fault("layers-outside", _set(layer_begin=lambda a, r: r.choice((-1, 0)), layer_end=lambda a, r: r.choice(
        (a["cache"].shape[1] + 1 if a["cache"].dim() == 3 else 2, -1))), IndexError),
    Fault("layer_begin-type", _set(layer_begin=lambda a, r: r.choice((0.0, True, torch.tensor(0)))), TypeError,
          "python"),
    Fault("out-dtype", _set(out=lambda a, r: a["out"].to(r.choice([t for t in FLOATS if t != a["out"].dtype]))),
          TypeError),
    Fault("host_table-dtype", _set(host_table=lambda a, r: a["host_table"].to(
        r.choice([t for t in FLOATS if t != a["host_table"].dtype]))), TypeError),
    Fault("cache-not-dense", _set(cache=lambda a, r: _not_dense_rows(a["cache"])), ValueError,
          when=lambda a: a["cache"].shape[-1] > 1 and a["cache"].shape[0] > 0),
    Fault("slot_map-length", _set(slot_map=lambda a, r: a["slot_map"][:-1]), ValueError),
    Fault("slot_map-int64", _set(slot_map=lambda a, r: a["slot_map"].long()), TypeError),
    Fault("first-is-slots", _set(first=lambda a, r: a["slots"]), ValueError, "address",
          lambda a: a["slots"].numel() > 0),
    Fault("out-over-host_table", _set(out=lambda a, r: _sharing(a["out"], a["host_table"])), ValueError, "address",
          _big_enough("out", "host_table")),
    Fault("out-expanded", _set(out=lambda a, r: _expanded(a["out"])), ValueError, "address",
          lambda a: a["out"].shape[0] > 1),
    Fault("check_ids-type", _set(check_ids=lambda a, r: r.choice(("no", None))), TypeError, "python"),
]

PREFETCH_ARGS = ("ids", "slot_map", "cache", "host_table", "out", "first", "slots", "layer_begin", "layer_end")


def call_prefetch(a, backend, inplace):
    return mk.tol_cache_prefetch(*(a[k] for k in PREFETCH_ARGS), backend=backend, check_ids=a["check_ids"])


def raw_prefetch(a, which, inplace):
    return ops.tol_cache_prefetch(*(a[k] for k in PREFETCH_ARGS), a["check_ids"])


ADMIT_ARGS = ("ids", "first", "slots", "rows", "slot_map", "owner", "last_use", "admitted_at", "cache", "counters")


def valid_small_admit(rng, gen, inplace: bool) -> dict:
    dtype = rng.choice(FLOATS)
    row = rng.choice(((4,), (2, 3)))
    V, C, N = rng.choice((3, 8)), rng.choice((1, 4)), rng.choice((0, 1, 5))
    ids = make_ids((N,), V, rng, gen, bad=False)
    state = draw_admit_state(rng, gen, V, C, row, dtype)
    return dict(zip(ADMIT_ARGS, [ids, oref.first_occurrence(ids), torch.full((N,), -1, dtype=torch.int32),
                                 float_values((N + 1) * math.prod(row), dtype, rng, gen).view((N + 1,) + row)]
                    + state))


ADMIT_FAULTS = [
    Fault("ids-float", _set(ids=lambda a, r: a["ids"].float()), TypeError),
    Fault("ids-2d", _set(ids=lambda a, r: a["ids"][None]), ValueError),
    Fault("first-int64", _set(first=lambda a, r: a["first"].long()), TypeError),
    Fault("rows-dtype", _set(rows=lambda a, r: a["rows"].to(r.choice([t for t in FLOATS if t != a["rows"].dtype]))),
          TypeError),
    Fault("rows-too-few", _set(rows=lambda a, r: a["rows"][:max(a["ids"].shape[0] - 1, 0)]), ValueError,
          when=lambda a: a["ids"].numel() > 0),
    Fault("owner-length", _set(owner=lambda a, r: torch.full((a["owner"].numel() + 1,), -1, dtype=torch.int32)),
          ValueError),
    Fault("counters-length", _set(counters=lambda a, r: a["counters"][:3].clone()), ValueError),
    Fault("last_use-int32", _set(last_use=lambda a, r: a["last_use"].clamp(-1, 99).int()), TypeError),
    Fault("cache-strided", _set(cache=lambda a, r: _strided_last(a["cache"])), ValueError,
          when=lambda a: a["cache"].shape[-1] > 1),
    Fault("slot_map-strided", _set(slot_map=lambda a, r: torch.stack([a["slot_map"]] * 2, -1).flatten()[::2]),
          ValueError, when=lambda a: a["slot_map"].numel() > 1),
    Fault("owner-over-first", _set(owner=lambda a, r: _sharing(a["owner"], a["first"])), ValueError, "address",
          _big_enough("owner", "first")),
    Fault("cache-over-rows", _set(cache=lambda a, r: _sharing(a["cache"], a["rows"])), ValueError, "address",
          _big_enough("cache", "rows")),
    Fault("cache-requires-grad", _set(cache=lambda a, r: _grad(a["cache"])), RuntimeError, "address"),
]


def call_admit(a, backend, inplace):
    return mk.tol_cache_admit(*(a[k] for k in ADMIT_ARGS), backend=backend)


def raw_admit(a, which, inplace):
    return ops.tol_cache_admit(*(a[k] for k in ADMIT_ARGS))


class InvalidOp(NamedTuple):
    valid: Callable  # (rng, gen, inplace) -> args
    faults: list
    call: Callable  # (args, backend, inplace): the public op
    raw: Callable  # (args, 'cpp' | 'triton', inplace): the raw op
    triton: bool  # has a Triton kernel (public backend and raw op)
    fake: bool  # its fake kernel checks the arguments (meta tensors)
    inplace: tuple = (False,)


INVALID = {
    "tol_gather_add": InvalidOp(valid_small_gather, GATHER_FAULTS, call_gather, raw_gather, True, True, (False, True)),
    "tol_cached_gather_add": InvalidOp(valid_small_cached, CACHED_FAULTS, call_cached, raw_cached, True, True,
                                       (False, True)),
    "tol_host_gather": InvalidOp(valid_small_host_gather, HOST_GATHER_FAULTS, call_host_gather, raw_host_gather,
                                 True, True),
    "tol_cache_prefetch": InvalidOp(valid_small_prefetch, PREFETCH_FAULTS, call_prefetch, raw_prefetch, False, False),
    "tol_cache_admit": InvalidOp(valid_small_admit, ADMIT_FAULTS, call_admit, raw_admit, False, False),
}


def outcome(call) -> tuple[type | None, str]:
    """(the exception type a call raised, or None; its message)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the type is the result
        return type(e), str(e)
    return None, ""


ID_MESSAGE = re.compile(r"id (-?\d+) \(at flat position (\d+) of ids\) is outside \[0, V\) for a table of V=(\d+)")
ROW_MESSAGE = re.compile(r"destination row (-?\d+) \(at position (\d+) of rows\) is outside \[0, (\d+)\)")


def assert_names_a_bad_index(message: str, a: dict, who: str) -> None:
    """An IndexError for an id (a destination row) names one that is outside the bound at the position it names
    (README: "the message names the id, its position and V"). Which one, when several are, differs: the C++ CPU
    kernels name the first in flat order, the Python checks (and the CUDA ones) the first of the most extreme."""
    for pattern, key in ((ID_MESSAGE, "ids"), (ROW_MESSAGE, "rows")):
        found = pattern.search(message)
        if found and isinstance(a.get(key), torch.Tensor) and a[key].device.type != "meta":
            value, pos, bound = map(int, found.groups())
            flat = a[key].reshape(-1)
            assert pos < flat.numel() and int(flat[pos]) == value and not 0 <= value < bound, \
                f"{who}: the message names {key}[{pos}] = {value} outside [0, {bound}), but {key} is {flat.tolist()}"
            return
    assert ": id " not in message and "destination row" not in message, f"{who}: an unexpected message: {message}"


def raw_type(public: type | None, message: str) -> type | None:
    """What the raw op raises where the public op raised `public`: TypeError for a dtype, IndexError for an id or a
    destination row, RuntimeError for everything else (README, csrc/tol_gather_add.h)."""
    if public in (None, TypeError):
        return public
    if public is IndexError and (" id " in message or "destination row" in message):
        return IndexError
    return RuntimeError


def on_meta(v):
    """A meta tensor with v's shape, strides and dtype (to('meta') makes non-dense views contiguous)."""
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")


def applicable(fault: Fault, a: dict) -> bool:
    try:
        return bool(fault.when(a))
    except Exception:  # noqa: BLE001 - an argument an earlier fault made a list or a 0-d tensor
        return False


def test_invalid_inputs_raise_alike():
    def body(rng, gen, case):
        name = rng.choice(list(INVALID))
        spec = INVALID[name]
        inplace = rng.choice(spec.inplace)
        a = spec.valid(rng, gen, inplace)
        pool = spec.faults + (INPLACE_FAULTS + aliasing("ids", *(k for k in ("table", "slot_map", "cache",
                                                                              "host_table") if k in a))
                              if inplace else [])
        faults = []
        for _ in range(1 if rng.random() < 0.6 else 2):
            usable = [f for f in pool if f not in faults and applicable(f, a)]
            if usable:
                fault = rng.choice(usable)
                try:
                    fault.apply(a, rng)
                except Exception:  # noqa: BLE001 - a fault that cannot follow the first one: one fault only
                    continue
                faults.append(fault)
        case.update(op=name + "_" * (inplace and not name.endswith("_")), faults=[f.name for f in faults],
                    **{k: describe(v) for k, v in a.items()})
        snap = Snapshot(**{k: v for k, v in a.items() if isinstance(v, torch.Tensor)})
        backends = ["reference", "cpu"] + (["triton"] if TRITON and spec.triton else [])
        results = {}
        for b in backends:
            results[b] = outcome(lambda: spec.call(a, b, inplace))
            if results[b][0] is not None:
                snap.unchanged(f"{b} (raising {results[b][0].__name__})")
            snap.restore()
        for b, (exc, msg) in results.items():
            if exc is IndexError:
                assert_names_a_bad_index(msg, a, b)
        types = {b: (r[0].__name__ if r[0] else "nothing") for b, r in results.items()}
        assert len(set(types.values())) == 1, f"the backends disagree: {types}; messages: " + \
            "; ".join(f"{b}: {r[1][:150]}" for b, r in results.items())
        public, message = results["reference"]
        if len(faults) == 1:
            assert public is faults[0].raises, f"{faults[0].name}: raised {types['reference']}, the docs say " \
                                               f"{faults[0].raises.__name__} ({message[:200]})"
        kinds = {f.kind for f in faults}
        if "python" in kinds or not faults:
            return
        # One fault: the raw op raises its form of the public op's exception. Two: the raw ops check in their own
        # order (the C++ ops dtypes first, the wrappers some shapes first), so either fault's.
        want = {raw_type(public, message)} | ({raw_type(f.raises, " id " * (f.kind == "data")) for f in faults}
                                              if len(faults) > 1 else set())
        raws = [("cpp", lambda: spec.raw(a, "cpp", inplace))]
        if TRITON and spec.triton and "data" not in kinds:
            raws.append(("triton", lambda: spec.raw(a, "triton", inplace)))
        if spec.fake and kinds == {"meta"}:
            m = {k: on_meta(v) for k, v in a.items()}
            raws.append(("fake", lambda: spec.raw(m, "cpp", inplace)))
        for which, call in raws:
            got, msg = outcome(call)
            snap.restore()
            if got is IndexError and which == "cpp":
                assert_names_a_bad_index(msg, a, f"raw {which} op")
            assert got in want, (f"raw {which} op raised {got.__name__ if got else 'nothing'} ({msg[:200]}) where the "
                                 f"public op raised {types['reference']} ({message[:150]}); expected one of "
                                 f"{sorted(t.__name__ if t else 'nothing' for t in want)}")

    fuzz("invalid", 1500, body)


@pytest.mark.skipif(not TRITON, reason="no Triton backend here")
def test_invalid_decode_attention_raises_alike():
    """One or two of test_decode_attention's bad inputs at once: both backends raise one type, the raw Triton op
    RuntimeError for what the public op raises ValueError (or IndexError: pos and pad are data it does not check)."""
    def body(rng, gen, case):
        chosen = rng.sample(ATTN_BAD, rng.choice((1, 2)))
        args = list(attn_good()) + [4]
        try:
            for _, change, _, _ in chosen:
                change(args)
        except Exception:  # noqa: BLE001 - two changes that do not compose (a 3-d cache then expanded caches)
            chosen = chosen[:1]
            args = list(attn_good()) + [4]
            chosen[0][1](args)
        case.update(faults=[c[0] for c in chosen])
        snap = Snapshot(**{f"a{i}": v for i, v in enumerate(args)})
        results = {}
        for b in ("reference", "triton"):
            results[b] = outcome(lambda: mk.decode_attention(*args, backend=b))
            snap.unchanged(f"decode_attention {b}")
            snap.restore()
        assert results["reference"][0] is results["triton"][0], f"the backends disagree: {results}"
        if len(chosen) == 1:
            assert results["reference"][0] is chosen[0][2], results
        if not any(c[2] is IndexError for c in chosen):
            got, msg = outcome(lambda: ops.decode_attention(*args))
            snap.restore()
            assert got is raw_type(results["reference"][0], ""), f"raw op raised {got} ({msg[:200]})"

    fuzz("invalid_decode_attention", 60, body)


# ================================================================ opcheck
OPCHECK_TRITON_UTILS = ["test_schema", "test_autograd_registration", "test_faketensor"]


def finite_(*tensors) -> None:
    """NaN and infinities out of every float tensor's whole buffer (opcheck compares eager and traced outputs, and a
    NaN differs from itself)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype in FLOATS:
            torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()).nan_to_num_(0.0, 1.0, -1.0)


def test_opcheck_on_random_cases():
    """torch.library.opcheck on a few drawn cases of each op (strided views, mixed dtypes, int32 ids, numpy layers
    as ints), beyond the fixed samples of test_tol_gather_add.py and test_offload.py."""
    def body(rng, gen, case):
        kind = rng.choice(("gather", "cached", "host_gather", "prefetch", "admit"))
        case["op"] = kind
        small = True
        if kind == "gather":
            a = draw_gather(rng, gen, case, small, valid_only=True)
            finite_(*a.values())
            args = (a["hidden"], a["ids"], a["table"], None if a["layer"] is None else int(a["layer"]))
            torch.library.opcheck(ops.tol_gather_add, args)
            if not overlapping(a["hidden"]):
                torch.library.opcheck(ops.tol_gather_add_, (args[0].clone(),) + args[1:])
            if TRITON:
                torch.library.opcheck(ops.tol_gather_add_triton, args, test_utils=OPCHECK_TRITON_UTILS)
        elif kind == "cached":
            a = draw_cached(rng, gen, case, small, valid_only=True)
            finite_(*a.values())
            args = (a["hidden"], a["ids"], a["slot_map"], a["cache"], a["host_table"],
                    None if a["layer"] is None else int(a["layer"]))
            torch.library.opcheck(ops.tol_cached_gather_add, args)
            if not overlapping(a["hidden"]):
                torch.library.opcheck(ops.tol_cached_gather_add_, (args[0].clone(),) + args[1:])
            if TRITON:
                torch.library.opcheck(ops.tol_cached_gather_add_triton, args, test_utils=OPCHECK_TRITON_UTILS)
        elif kind == "host_gather":
            a = draw_host_gather(rng, gen, case, small, valid_only=True)
            finite_(*a.values())
            args = (a["table"], a["ids"], a["out"], a["rows"])
            torch.library.opcheck(ops.tol_host_gather, args)
            if TRITON:
                torch.library.opcheck(ops.tol_host_gather_triton, args, test_utils=OPCHECK_TRITON_UTILS)
        elif kind == "prefetch":
            a = draw_prefetch(rng, gen, case, valid_only=True)
            finite_(*a.values())
            torch.library.opcheck(ops.tol_cache_prefetch, tuple(a[k] for k in PREFETCH_ARGS))
        else:
            a = valid_small_admit(rng, gen, False)
            finite_(*a.values())
            torch.library.opcheck(ops.tol_cache_admit, tuple(a[k] for k in ADMIT_ARGS))

    fuzz("opcheck", 30, body)
