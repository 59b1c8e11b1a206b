"""tol_gather_add / tol_gather_add_ on every backend against the reference (memllm_kernels/reference.py)."""

import itertools
import os

import pytest
import torch

import memllm_kernels as mk
from memllm_kernels import reference

from conftest import BACKEND_DEVICES, DEVICES

# ---- the test matrix, named once ----
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))  # (hidden, table): all 9
TOKENS = [0, 1, 7, 4097]
DIMS = [1, 8, 769, 2048]
LAYERS = [None, 3]  # None: a [V, d] table; 3: a token-major [V, 3, d] table, read at its last layer
ID_DTYPES = [torch.int32, torch.int64]
VOCAB = 37  # small, so T=4097 repeats every id many times
WITH_REFERENCE = BACKEND_DEVICES + [pytest.param("reference", "cpu", id="reference")]

# ---- tolerances, with reasons ----
# The sum is taken in float32 and rounded once to hidden's dtype, on every backend and in the
# reference, and float32 has more than 2p+2 mantissa bits for bf16/fp16 (p = 8, 11), so the result is
# the correctly rounded sum everywhere: every backend must match the reference bit for bit, Triton's
# CPU interpreter included (it truncates float32 -> bfloat16 itself; the kernels round under it bit by bit).


def _interpreted(backend):
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def assert_matches_reference(out, hidden, ids, table, layer):
    expected = reference.tol_gather_add(hidden, ids, table, layer)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=False)


def make_case(T, d, layer, hidden_dtype, table_dtype, id_dtype, device, vocab=VOCAB):
    table_shape = (vocab, d) if layer is None else (vocab, layer + 1, d)
    table = torch.randn(table_shape, device=device).to(table_dtype)
    hidden = torch.randn(T, d, device=device).to(hidden_dtype)
    ids = torch.randint(0, vocab, (T,), device=device)
    if T >= 2:
        ids[0] = vocab - 1  # the largest id
        ids[1] = ids[0]  # a repeated id
    return hidden, ids.to(id_dtype), table


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS, ids=["VxD", "VxLxD"])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("hidden_dtype,table_dtype", DTYPE_PAIRS, ids=str)
def test_matches_reference(backend, device, hidden_dtype, table_dtype, T, d, layer, id_dtype):
    hidden, ids, table = make_case(T, d, layer, hidden_dtype, table_dtype, id_dtype, device)
    before = hidden.clone()
    out = mk.tol_gather_add(hidden, ids, table, layer, backend=backend)
    assert torch.equal(hidden, before), "the functional op modified its input"
    assert_matches_reference(out, hidden, ids, table, layer)
    ret = mk.tol_gather_add_(hidden, ids, table, layer, backend=backend)
    assert ret is hidden
    assert_matches_reference(hidden, before, ids, table, layer)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("hidden_dtype,table_dtype", [(h, torch.float64) for h in FLOAT_DTYPES + [torch.float64]]
                         + [(torch.float64, t) for t in FLOAT_DTYPES], ids=str)
def test_float64_operands(backend, device, hidden_dtype, table_dtype):
    """A float64 operand makes the sum float64; a 16-bit hidden gets it rounded through float32, as torch
    rounds float64 to bfloat16/float16 (the reference's bits). Row 0 tells the two apart: over a hidden of
    1, 2^-8 + 2^-30 and 2^-11 + 2^-40 round up to 1 + 2^-7 (bf16) and 1 + 2^-10 (fp16) when rounded once,
    to 1 through float32 (and the interpreter's direct float64 -> bfloat16 cast gave NaN and garbage)."""
    hidden, ids, table = make_case(9, 24, 2, hidden_dtype, table_dtype, torch.int64, device)
    ids[2] = 0
    table[0, 2, :2] = torch.tensor([2**-8 + 2**-30, 2**-11 + 2**-40], dtype=torch.float64).to(table_dtype)
    hidden[2] = 1
    assert_matches_reference(mk.tol_gather_add(hidden, ids, table, 2, backend=backend), hidden, ids, table, 2)


def strided(kind, T, d, dtype, device):
    if kind == "padded-rows":  # viewable as [T, d] with row stride d + 3 (also breaks 16-byte alignment)
        return torch.randn(T, d + 3, device=device).to(dtype)[:, 1:d + 1]
    if kind == "column-stride-2":  # last dim not contiguous: kernels work on a copy
        return torch.randn(T, 2 * d, device=device).to(dtype)[:, ::2]
    raise ValueError(kind)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("kind", ["padded-rows", "column-stride-2"])
@pytest.mark.parametrize("T,d", [(7, 8), (4097, 769), (33, 2048)])
@pytest.mark.parametrize("hidden_dtype,table_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                      (torch.float32, torch.bfloat16)], ids=str)
def test_strided_hidden(backend, device, kind, T, d, hidden_dtype, table_dtype):
    _, ids, table = make_case(T, d, 3, hidden_dtype, table_dtype, torch.int64, device)
    hidden = strided(kind, T, d, hidden_dtype, device)
    assert not hidden.is_contiguous()
    before = hidden.clone()
    assert_matches_reference(mk.tol_gather_add(hidden, ids, table, 3, backend=backend), hidden, ids, table, 3)
    mk.tol_gather_add_(hidden, ids, table, 3, backend=backend)
    assert_matches_reference(hidden, before, ids, table, 3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_leading_dims_and_transposed(backend, device):
    """hidden [B, S, d] with any leading shape; a transposed one is not viewable as [T, d]."""
    table = torch.randn(50, 4, 64, device=device, dtype=torch.bfloat16)
    hidden = torch.randn(5, 3, 64, device=device, dtype=torch.bfloat16).transpose(0, 1)  # [3, 5, 64]
    ids = torch.randint(0, 50, (3, 5), device=device)
    assert not hidden.is_contiguous()
    out = mk.tol_gather_add(hidden, ids, table, 2, backend=backend)
    assert out.shape == (3, 5, 64) and out.is_contiguous()
    assert_matches_reference(out, hidden, ids, table, 2)
    before = hidden.clone()
    mk.tol_gather_add_(hidden, ids, table, 2, backend=backend)
    assert_matches_reference(hidden, before, ids, table, 2)
    one_token = torch.randn(64, device=device, dtype=torch.bfloat16)  # hidden [d], ids []
    out = mk.tol_gather_add(one_token, torch.tensor(7, device=device), table, 0, backend=backend)
    assert_matches_reference(out, one_token, torch.tensor(7, device=device), table, 0)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_strided_ids_and_layer_major_table(backend, device):
    """Non-contiguous ids (every other one of a longer tensor) and a token-major view of a layer-major buffer
    ([L, V, d] permuted to [V, L, d]: rows spaced V*d apart, layers d): the same rows as contiguous copies."""
    buf = torch.randn(3, 20, 24, device=device)  # [L, V, d]
    table = buf.permute(1, 0, 2)
    ids = torch.tensor([4, 0, 19, 7, 19, 2, 11, 5], device=device)[::2]
    assert not table.is_contiguous() and not ids.is_contiguous()
    hidden = torch.randn(4, 24, device=device)
    for layer in range(3):
        out = mk.tol_gather_add(hidden, ids, table, layer, backend=backend)
        assert_matches_reference(out, hidden, ids.contiguous(), table.contiguous(), layer)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("bad", [2**31 - 1, -(2**31), 2**63 - 1, -(2**63)], ids=str)
def test_ids_at_the_integer_limits_raise(backend, device, bad):
    hidden, ids, table = make_case(3, 8, None, torch.float32, torch.float32, torch.int64, device)
    ids[1] = bad
    before = hidden.clone()
    with pytest.raises(IndexError, match=rf"id {bad} .*V={VOCAB}"):
        mk.tol_gather_add_(hidden, ids, table, backend=backend)
    assert torch.equal(hidden, before)
    if -(2**31) <= bad < 2**31:  # as int32 too
        with pytest.raises(IndexError, match=rf"id {bad} "):
            mk.tol_gather_add(hidden, ids.int(), table, backend=backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_huge_vocab_ids(backend, device):
    """The 1b preset's vocabulary: ids near 128,255 address rows far into the table."""
    V, L, d = 128_256, 2, 16
    table = torch.randn(V, L, d, device=device, dtype=torch.bfloat16)
    ids = torch.tensor([V - 1, 0, 100_000, V - 1, 65_536], device=device, dtype=torch.int32)
    hidden = torch.randn(5, d, device=device, dtype=torch.bfloat16)
    assert_matches_reference(mk.tol_gather_add(hidden, ids, table, 1, backend=backend), hidden, ids, table, 1)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_offsets_beyond_int32(backend, device):
    """A table of 2^31 + 2^26 elements (the 1b table has 6.3e9): offsets of the last rows overflow int32.

    torch.empty maps the 4.3 GB lazily; only the rows read are ever written, so this stays cheap.
    """
    V, L, d = 33_792, 2, 32_768  # V*L*d = 2.21e9 > 2^31
    table = torch.empty(V, L, d, device=device, dtype=torch.bfloat16)
    ids = torch.tensor([V - 1, 1, V - 2], device=device)
    table[ids] = torch.randn(3, L, d, device=device, dtype=torch.bfloat16)
    hidden = torch.randn(3, d, device=device, dtype=torch.bfloat16)
    assert (V - 1) * L * d + d > 2**31
    assert_matches_reference(mk.tol_gather_add(hidden, ids, table, 1, backend=backend), hidden, ids, table, 1)
    del table


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_unchecked_bad_ids_never_read_out_of_bounds(backend, device, inplace):
    """check_ids=False skips the host check; bad ids then yield NaN rows, good rows stay exact (the reference,
    the spec, says the same)."""
    hidden, ids, table = make_case(6, 32, 3, torch.float32, torch.float32, torch.int64, device)
    ids[2], ids[4] = VOCAB, -(2**40)
    before = hidden.clone()
    if inplace:
        out = mk.tol_gather_add_(hidden, ids, table, 3, backend=backend, check_ids=False)
    else:
        out = mk.tol_gather_add(hidden, ids, table, 3, backend=backend, check_ids=False)
    assert torch.isnan(out[[2, 4]]).all()
    good = torch.tensor([0, 1, 3, 5], device=device)
    assert_matches_reference(out[good], before[good], ids[good], table, 3)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_unchecked_bad_ids_get_no_table_gradient(backend, device):
    """Backward after a check_ids=False forward: a bad id's NaN row came from no table row, so its gradient goes
    nowhere (index_add_ raised on it on the CPU, a device-side assert on a GPU); the good ids' rows get theirs."""
    hidden, ids, table = make_case(6, 16, 3, torch.float32, torch.float32, torch.int64, device)
    ids[2], ids[4] = VOCAB, -1
    table.requires_grad_(True)
    out = mk.tol_gather_add(hidden, ids, table, 3, backend=backend, check_ids=False)
    out.backward(torch.ones_like(out))
    expected = torch.zeros_like(table)
    for t in (0, 1, 3, 5):
        expected[ids[t], 3] += 1
    assert torch.equal(table.grad, expected)


# ---- bad input: a clear Python exception on every backend, before anything is written ----
def _bad_cases(device):
    h = torch.randn(4, 8, device=device)
    ids = torch.tensor([0, 1, 2, 3], device=device)
    t2 = torch.randn(10, 8, device=device)
    t3 = torch.randn(10, 2, 8, device=device)
    return {
        "id-too-large": ((h, torch.tensor([0, 1, 10, 3], device=device), t3, 0), IndexError, r"id 10 .*V=10"),
        "id-negative": ((h, torch.tensor([0, -1, 2, 3], device=device), t3, 0), IndexError, r"id -1 .*V=10"),
        "float-ids": ((h, ids.float(), t3, 0), TypeError, "ids must be int32 or int64"),
        "int16-ids": ((h, ids.short(), t3, 0), TypeError, "ids must be int32 or int64"),
        "ids-shape": ((h, ids[:3], t3, 0), ValueError, "leading shape"),
        "d-mismatch": ((h, ids, torch.randn(10, 2, 9, device=device), 0), ValueError, "d=9"),
        "layer-too-large": ((h, ids, t3, 2), IndexError, r"layer=2 is outside"),
        "layer-negative": ((h, ids, t3, -1), IndexError, r"layer=-1 is outside"),
        "layer-missing": ((h, ids, t3, None), ValueError, "needs layer="),
        "layer-for-2d-table": ((h, ids, t2, 0), ValueError, r"\[V, d\] table"),
        "layer-float": ((h, ids, t3, 1.5), TypeError, "layer must be an int or None, got float"),
        "layer-bool": ((h, ids, t3, True), TypeError, "layer must be an int or None, got bool"),
        "layer-tensor": ((h, ids, t3, torch.tensor(1.9)), TypeError, "layer must be an int or None, got Tensor"),
        "table-1d": ((h, ids, torch.randn(8, device=device), None), ValueError, r"\[V, d\] or"),
        "int-hidden": ((h.long(), ids, t3, 0), TypeError, "hidden must be float"),
        "int-table": ((h, ids, t3.long(), 0), TypeError, "table must be float"),
        "scalar-hidden": ((h[0, 0], ids[0], t3, 0), ValueError, "0-d"),
        "table-not-row-contiguous": ((h, ids, torch.randn(10, 2, 16, device=device)[..., ::2], 0), ValueError,
                                     "last dim must be contiguous"),
    }


BAD_CASE_NAMES = list(_bad_cases("cpu"))


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("case", BAD_CASE_NAMES)
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_bad_input_raises(backend, device, case, inplace):
    (hidden, ids, table, layer), exc, match = _bad_cases(device)[case]
    before = hidden.clone()
    fn = mk.tol_gather_add_ if inplace else mk.tol_gather_add
    with pytest.raises(exc, match=match):
        fn(hidden, ids, table, layer, backend=backend)
    assert torch.equal(hidden, before), "a failed call modified hidden"


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("check_ids", ["no", None, 1], ids=repr)
def test_check_ids_must_be_a_bool(backend, device, check_ids):
    """'no' failed in pybind on the C++ backends and read as True on the others; None read as False."""
    hidden, ids, table = make_case(3, 8, 1, torch.float32, torch.float32, torch.int64, device)
    for fn in (mk.tol_gather_add, mk.tol_gather_add_):
        with pytest.raises(TypeError, match="check_ids must be True or False"):
            fn(hidden, ids, table, 1, backend=backend, check_ids=check_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["id-too-large", "id-negative", "float-ids", "ids-shape", "d-mismatch",
                                  "layer-too-large", "layer-missing", "layer-for-2d-table", "int-hidden",
                                  "table-not-row-contiguous"])
def test_bad_input_raises_in_compiled_op(device, case):
    """torch.ops.memllm.* check their own inputs too (the C++ TORCH_CHECKs), with the same messages:
    TypeError for dtypes, IndexError for ids, RuntimeError for the rest (see csrc/tol_gather_add.h for why)."""
    (hidden, ids, table, layer), exc, match = _bad_cases(device)[case]
    exc = exc if exc is TypeError or case.startswith("id-") else RuntimeError
    with pytest.raises(exc, match=match):
        torch.ops.memllm.tol_gather_add(hidden, ids, table, layer)
    with pytest.raises(exc, match=match):
        torch.ops.memllm.tol_gather_add_(hidden, ids, table, layer)


@pytest.mark.requires_cuda
def test_mixed_devices_raise():
    h = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="one device"):
        mk.tol_gather_add(h, torch.tensor([0, 1]), torch.randn(4, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.memllm.tol_gather_add(h, torch.tensor([0, 1]), torch.randn(4, 8, device="cuda"))


def test_unknown_or_unavailable_backend_raises():
    h, ids, t = torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="unknown backend"):
        mk.tol_gather_add(h, ids, t, backend="cublas")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        mk.tol_gather_add(h, ids, t, backend="cuda")  # CPU tensors (and maybe no GPU at all)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_bad_id_error_names_the_first_position_of_a_repeated_id(backend, device):
    """The IndexError names the bad id's first position (README: "the message names the id, its position and V"):
    with the id repeated, the first one, where the caller's ids went wrong."""
    h, table = torch.zeros(5, 8, device=device), torch.randn(5, 8, device=device)
    ids = torch.tensor([0, 7, 3, 7, 7], device=device)
    for fn in (mk.tol_gather_add, mk.tol_gather_add_):
        with pytest.raises(IndexError, match=r"id 7 \(at flat position 1 of ids\) is outside \[0, V\)"):
            fn(h, ids, table, backend=backend)
    assert not h.any()


def test_auto_picks_the_cpu_kernel_for_cpu_tensors(monkeypatch):
    """README: backend="auto" picks 'cpu' for CPU tensors. Picking the reference there still gives the same sums
    (only many times slower), so this checks which code ran: the reference must not."""
    from memllm_kernels import ops

    monkeypatch.setattr(ops, "_PICKED", {})  # the backend chosen per device is cached: choose afresh

    def no_reference(*args, **kwargs):
        raise AssertionError("backend='auto' ran the reference on CPU tensors")

    monkeypatch.setattr(reference, "tol_gather_add", no_reference)
    h, ids, t = torch.randn(3, 8), torch.tensor([0, 2, 2]), torch.randn(4, 8)
    expected = h + t[ids]
    torch.testing.assert_close(mk.tol_gather_add(h, ids, t), expected, rtol=0, atol=0)
    torch.testing.assert_close(mk.tol_gather_add_(h, ids, t), expected, rtol=0, atol=0)


def test_available_backends_are_usable():
    names = mk.available_backends()
    assert names[:2] == ["reference", "cpu"]
    for b in names:
        device = "cuda" if b == "cuda" or (b == "triton" and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"
        h, ids, t = torch.randn(3, 8, device=device), torch.tensor([0, 2, 2], device=device), torch.randn(4, 8, device=device)
        torch.testing.assert_close(mk.tol_gather_add(h, ids, t, backend=b), h + t[ids], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_inplace_refuses_hidden_that_shares_memory_with_its_inputs(backend, device):
    """hidden written in place as a view of its own table would read rows it already overwrote (the C++ kernel
    gave another answer than the reference): refused on every backend, and by the compiled op itself."""
    table = torch.randn(10, 8, device=device)
    ids = torch.tensor([1, 0, 3, 2], device=device)
    with pytest.raises(RuntimeError, match="memory"):
        mk.tol_gather_add_(table[:4], ids, table, backend=backend)
    lt = torch.randn(10, 2, 8, device=device)
    with pytest.raises(RuntimeError, match="memory"):
        mk.tol_gather_add_(lt[:4, 1], ids, lt, 0, backend=backend)
    if backend != "reference":
        with pytest.raises(RuntimeError, match="memory"):
            torch.ops.memllm.tol_gather_add_(table[:4], ids, table, None)
    before = table.clone()
    h = table[4:8].clone()  # a copy is fine, and the table is left alone
    mk.tol_gather_add_(h, ids, table, backend=backend)
    torch.testing.assert_close(h, before[4:8] + before[ids], rtol=0, atol=0)
    assert torch.equal(table, before)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_inplace_refuses_a_table_over_the_last_bytes_of_hidden(backend, device):
    """Overlap goes by byte span to the last byte of the last element: a bf16 table starting in the upper half of
    hidden's last float32 element shares memory with it (a span that ended at that element's first byte let it
    through). The raw op too, where there is one."""
    buf = torch.zeros(64, dtype=torch.uint8, device=device)
    hidden = buf[:16].view(torch.float32).view(2, 2)  # bytes 0-15
    table = buf[14:30].view(torch.bfloat16).view(4, 2)  # bytes 14-29
    ids = torch.tensor([0, 1], device=device)
    with pytest.raises(RuntimeError, match="shares memory"):
        mk.tol_gather_add_(hidden, ids, table, backend=backend)
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="shares memory"):
            torch.ops.memllm.tol_gather_add_(hidden, ids, table, None)
    assert not buf.any()
    mk.tol_gather_add_(hidden, ids, buf[16:32].view(torch.bfloat16).view(4, 2), backend=backend)  # just after: fine


def test_raw_inplace_op_refuses_hidden_over_its_tables_memory_in_another_storage():
    """Two tensors over one buffer (torch.from_numpy twice) have separate storages: the C++ op compared spans only
    within one storage and wrote hidden over the rows it read; it compares addresses now, as the wrapper does."""
    import numpy as np

    buf = np.random.default_rng(0).standard_normal(80).astype(np.float32)
    table, hidden = torch.from_numpy(buf).view(10, 8), torch.from_numpy(buf[:32]).view(4, 8)
    assert hidden.untyped_storage()._cdata != table.untyped_storage()._cdata  # two storages (StorageImpls)
    ids = torch.tensor([1, 0, 3, 2])
    for call in (lambda: torch.ops.memllm.tol_gather_add_(hidden, ids, table, None),
                 lambda: mk.tol_gather_add_(hidden, ids, table, backend="cpu")):
        with pytest.raises(RuntimeError, match="shares memory"):
            call()
    assert np.array_equal(buf, np.random.default_rng(0).standard_normal(80).astype(np.float32))


def test_inplace_refuses_autograd():
    h = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no autograd"):
        mk.tol_gather_add_(h, torch.tensor([0, 1]), torch.randn(4, 8))


def _raw_inplace(backend):
    return torch.ops.memllm.tol_gather_add_triton_ if backend == "triton" else torch.ops.memllm.tol_gather_add_


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_raw_inplace_op_refuses_grad_and_bumps_the_version(backend, device):
    """The raw in-place ops, without the wrapper: a tensor that requires grad is refused before anything is written
    (the C++ op wrote a leaf that requires grad with no error, its gradient silently wrong), and the written hidden's
    version counter moves, as after torch's own in-place ops (the C++ op left it unchanged, so autograd could not
    see that a tensor it saved had changed)."""
    op = _raw_inplace(backend)
    ids, table = torch.tensor([0, 2], device=device), torch.randn(3, 8, device=device)
    hidden = torch.randn(2, 8, device=device, requires_grad=True)
    before = hidden.detach().clone()
    with pytest.raises(RuntimeError, match="hidden requires grad, but this op writes in place and has no autograd"):
        op(hidden, ids, table, None)
    assert torch.equal(hidden.detach(), before)
    with pytest.raises(RuntimeError, match="table requires grad"):
        op(before.clone(), ids, table.clone().requires_grad_(), None)
    with torch.no_grad():  # allowed: no gradient is recorded
        op(hidden, ids, table, None)
    torch.testing.assert_close(hidden.detach(), reference.tol_gather_add(before, ids, table), rtol=0, atol=1e-6)
    plain = before.clone()
    version = plain._version
    op(plain, ids, table, None)
    assert plain._version > version
    saved = before.clone().requires_grad_()
    x = saved * 1
    y = x * x  # saves x for its backward
    with torch.no_grad():
        op(x, ids, table, None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()  # autograd sees the write (it computed a wrong gradient before)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] in ("cpu", "cuda")])
@pytest.mark.parametrize("op", ["tol_gather_add", "tol_gather_add_", "tol_cached_gather_add",
                                "tol_cached_gather_add_"])
def test_raw_ops_name_themselves_in_bad_id_errors(backend, device, op):
    """The C++ ops' bad-id error names the op called (the in-place ones named their out-of-place twin)."""
    hidden, ids, table = torch.randn(2, 8, device=device), torch.tensor([0, 5], device=device), torch.randn(3, 8)
    args = (table.to(device),) if "cached" not in op else (
        torch.full((3,), -1, dtype=torch.int32, device=device), table[:0].to(device), table.to(device))
    with pytest.raises(IndexError, match=f"^{op}: id 5 \\(at flat position 1 of ids\\) is outside \\[0, V\\)"):
        getattr(torch.ops.memllm, op)(hidden, ids, *args, None)


# ---- torch.library integration: opcheck, gradcheck, meta, torch.compile ----
def _opcheck_samples(device):
    yield torch.randn(5, 8, device=device), torch.tensor([0, 3, 3, 1, 2], device=device), torch.randn(4, 8, device=device), None
    yield (torch.randn(2, 3, 16, device=device, dtype=torch.bfloat16), torch.randint(0, 6, (2, 3), device=device, dtype=torch.int32),
           torch.randn(6, 2, 16, device=device), 1)
    yield torch.randn(0, 8, device=device), torch.zeros(0, dtype=torch.long, device=device), torch.randn(4, 8, device=device), None
    # a hidden no view makes [T, d] ([S, B, d] from [B, S, d]): the Triton op's fake run failed on it (a fake
    # tensor's view raises ValueError where a real one raises RuntimeError), so torch.compile could not trace it
    yield (torch.randn(2, 5, 8, device=device).transpose(0, 1), torch.randint(0, 4, (5, 2), device=device),
           torch.randn(4, 8, device=device), None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["tol_gather_add", "tol_gather_add_"])
def test_opcheck(op, device):
    for hidden, ids, table, layer in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.memllm, op), (hidden, ids, table, layer))
        if op == "tol_gather_add":
            torch.library.opcheck(torch.ops.memllm.tol_gather_add, (hidden.requires_grad_(), ids, table.requires_grad_(), layer))


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] == "triton"])
@pytest.mark.parametrize("op", ["tol_gather_add_triton", "tol_gather_add_triton_"])
def test_opcheck_triton(op, backend, device):
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if _interpreted(backend):
        # torch.compile cannot trace an interpreted kernel (wrap_triton returns it unwrapped, eager
        # only), so AOT dispatch is checked on a GPU (TRITON_INTERPRET=0), not here.
        utils.remove("test_aot_dispatch_dynamic")
    for hidden, ids, table, layer in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.memllm, op), (hidden, ids, table, layer), test_utils=utils)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("layer", [None, 1])
def test_gradcheck(backend, device, layer):
    table = torch.randn((5, 8) if layer is None else (5, 2, 8), dtype=torch.float64, device=device, requires_grad=True)
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.tensor([[4, 0, 4], [1, 4, 2]], device=device)  # id 4 repeats: its gradient accumulates
    assert torch.autograd.gradcheck(lambda h, t: mk.tol_gather_add(h, ids, t, layer, backend=backend), (hidden, table))


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_table_gradient_accumulates_in_float32(backend, device):
    """300 gradients of 1 onto one bf16 row: a bf16 accumulator would stop at 256 (256 + 1 rounds back to 256
    with 8 significant bits); float32 gets 300, which bf16 holds exactly. The reference backend got 256: torch
    differentiated through its casts, rounding each row's gradient to bf16 before the sum."""
    table = torch.randn(4, 2, 8, dtype=torch.bfloat16, device=device, requires_grad=True)
    ids = torch.tensor([2] * 300 + [0], device=device)
    hidden = torch.randn(ids.shape[0], 8, dtype=torch.float32, device=device, requires_grad=True)
    mk.tol_gather_add(hidden, ids, table, 1, backend=backend).sum().backward()
    expected = torch.zeros(4, 2, 8, device=device)
    expected[2, 1], expected[0, 1] = 300.0, 1.0
    assert table.grad.dtype == torch.bfloat16 and torch.equal(table.grad.float(), expected)
    assert torch.equal(hidden.grad, torch.ones_like(hidden))


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_forward_mode_ad(backend, device):
    """torch gives a custom op no forward derivative: under torch.func.jvp (and forward-AD dual tensors) the
    compiled backends returned a zero tangent without a word. They raise now; the reference differentiates."""
    import torch.autograd.forward_ad as fwAD

    table = torch.randn(10, 3, 4, dtype=torch.float64, device=device)
    hidden, ids = torch.randn(2, 4, dtype=torch.float64, device=device), torch.tensor([1, 7], device=device)
    f = lambda h: mk.tol_gather_add(h, ids, table, 1, backend=backend)  # noqa: E731
    if backend == "reference":
        _, tangent = torch.func.jvp(f, (hidden,), (torch.ones_like(hidden),))
        assert torch.equal(tangent, torch.ones_like(hidden))
        return
    with pytest.raises(NotImplementedError, match=f"forward-mode AD .* not supported by backend '{backend}'"):
        torch.func.jvp(f, (hidden,), (torch.ones_like(hidden),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="use backend='reference'"):
        f(fwAD.make_dual(hidden, torch.ones_like(hidden)))
    with torch.no_grad():
        mk.tol_gather_add_(hidden, ids, table, 1, backend=backend)  # no dual tensor: no check, no error


def test_meta_device():
    hidden = torch.empty(2, 5, 2048, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(2, 5, device="meta", dtype=torch.long)
    table = torch.empty(128_256, 24, 2048, device="meta", dtype=torch.bfloat16)  # the 1b table, allocates nothing
    out = torch.ops.memllm.tol_gather_add(hidden, ids, table, 23)
    assert out.device.type == "meta" and out.shape == hidden.shape and out.dtype == hidden.dtype
    assert torch.ops.memllm.tol_gather_add_(hidden, ids, table, 0) is None
    out = torch.ops.memllm.tol_gather_add_triton(hidden, ids, table, 23)
    assert out.shape == hidden.shape
    for backend in ("reference", "triton"):  # check_ids read the ids' values: 'Cannot copy out of meta tensor'
        assert mk.tol_gather_add(hidden, ids, table, 23, backend=backend).shape == hidden.shape


@pytest.mark.parametrize("case", ["float-ids", "int16-ids", "ids-shape", "d-mismatch", "layer-too-large",
                                  "layer-negative", "layer-missing", "layer-for-2d-table", "table-1d", "int-hidden",
                                  "int-table", "scalar-hidden"])
def test_meta_device_checks_like_the_compiled_op(case):
    """On meta tensors only the fake kernel runs: it refuses what the C++ op refuses (shapes, dtypes, layer), with
    the same exception types. It handed back a tensor before. (Not the ids' values, which are data; a layer of
    the wrong type fails in the op's schema before any kernel.)"""
    (hidden, ids, table, layer), exc, match = _bad_cases("cpu")[case]
    exc = TypeError if exc is TypeError else RuntimeError
    meta = [t.to("meta") for t in (hidden, ids, table)]
    for op in (torch.ops.memllm.tol_gather_add, torch.ops.memllm.tol_gather_add_):
        with pytest.raises(exc, match=match):
            op(*meta, layer)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """Traced without graph breaks (fullgraph=True) and without copying the table into the graph."""
    table = torch.randn(100, 4, 64, device=device)
    w = torch.randn(64, 64, device=device)

    def block(h, ids):
        h = h @ w
        h = mk.tol_gather_add(h, ids, table, 2)
        return mk.tol_gather_add_(h, ids, table, 3) * 2

    def spec(h, ids):  # the references; 1e-5: Inductor may order the matmul's sums differently than eager
        h = reference.tol_gather_add(h @ w, ids, table, 2)
        return reference.tol_gather_add(h, ids, table, 3) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    h, ids = torch.randn(2, 7, 64, device=device), torch.randint(0, 100, (2, 7), device=device)
    torch.testing.assert_close(compiled(h, ids), spec(h, ids), rtol=1e-5, atol=1e-5)
    h, ids = torch.randn(1, 3, 64, device=device), torch.randint(0, 100, (1, 3), device=device)  # new shape
    torch.testing.assert_close(compiled(h, ids), spec(h, ids), rtol=1e-5, atol=1e-5)
    table.add_(1.0)  # a graph holding a copy of the table (a constant) would not see this
    torch.testing.assert_close(compiled(h, ids), spec(h, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_torch_compile_fullgraph_checks_ids(backend, device):
    """With check_ids=True (the default) a compiled call checks the ids as an eager one does: IndexError naming
    the id. The Python backends read the ids' values through an op (memllm::check_range); tracing failed on them
    under fullgraph=True before, and the C++ ops' RuntimeError is now IndexError itself."""
    table = torch.randn(10, 2, 8, device=device)

    def f(h, ids):
        return mk.tol_gather_add_(mk.tol_gather_add(h, ids, table, 0, backend=backend), ids, table, 1, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    h, ids = torch.randn(3, 8, device=device), torch.tensor([1, 9, 0], device=device)
    if _interpreted(backend):  # the compiled graph would not run the kernel: its output was uninitialized memory
        with pytest.raises(Exception, match="cannot compile a Triton kernel run by the interpreter"):
            compiled(h, ids)
        return
    assert_matches_reference(compiled(h, ids), reference.tol_gather_add(h, ids, table, 0), ids, table, 1)
    with pytest.raises(IndexError, match=r"id 10 \(at flat position 1 of ids\) is outside \[0, V\)"):
        compiled(h, torch.tensor([1, 10, 0], device=device))


@pytest.mark.requires_triton_gpu
def test_torch_compile_fullgraph_triton():
    table = torch.randn(100, 4, 64, device="cuda", dtype=torch.bfloat16)

    def f(h, ids):
        return mk.tol_gather_add(h * 2, ids, table, 1, backend="triton", check_ids=False)

    h, ids = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16), torch.randint(0, 100, (9,), device="cuda")
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(h, ids), f(h, ids), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_inplace_refuses_a_hidden_whose_elements_share_memory(backend, device):
    """An expand()ed hidden has one memory location per column: written in place, every backend raises
    (a Triton kernel would race over it on a GPU) and nothing is written."""
    base = torch.zeros(1, 8, device=device)
    table = torch.arange(40.0, device=device).view(5, 8)
    with pytest.raises(RuntimeError, match="share memory|single memory location"):
        mk.tol_gather_add_(base.expand(4, 8), torch.tensor([1, 2, 3, 4], device=device), table, backend=backend)
    assert not base.any()


def test_meta_tensors_mixed_with_real_ones_raise():
    """The fake kernels also serve the Meta dispatch key, which a call mixing a meta tensor with CPU tensors
    reaches: it raises, as torch's own ops do, instead of returning an uninitialised tensor."""
    hidden, table = torch.randn(3, 8), torch.randn(10, 8)
    meta_ids = torch.tensor([0, 1, 2], device="meta")
    for op in (torch.ops.memllm.tol_gather_add, torch.ops.memllm.tol_gather_add_):
        with pytest.raises(RuntimeError, match="meta device cannot be mixed"):
            op(hidden, meta_ids, table, None, True)
    with pytest.raises(RuntimeError, match="on one device, got cpu, meta and cpu"):
        mk.tol_gather_add(hidden, meta_ids, table)
    out = torch.ops.memllm.tol_gather_add(hidden.to("meta"), meta_ids, table.to("meta"), None, True)
    assert out.device.type == "meta" and out.shape == (3, 8)


@pytest.mark.parametrize("raw", [False, True], ids=["public", "raw"])
@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_inplace_refuses_an_inference_tensor_outside_inference_mode(backend, device, raw):
    """A hidden made under torch.inference_mode() may be written only inside it, as torch's own in-place ops enforce
    (the C++ op wrote it without a word, the reference raised): refused on every backend, nothing written; inside
    inference mode the op runs."""
    if raw and backend == "reference":
        pytest.skip("the reference has no raw op")
    ids, table = torch.tensor([0, 2], device=device), torch.randn(3, 8, device=device)
    with torch.inference_mode():
        hidden = torch.zeros(2, 8, device=device)

    def call():
        if raw:
            return _raw_inplace(backend)(hidden, ids, table, None)
        return mk.tol_gather_add_(hidden, ids, table, backend=backend)

    with pytest.raises(RuntimeError, match="inference tensor .* outside inference mode"):
        call()
    assert not hidden.any()
    with torch.inference_mode():
        call()
    assert torch.equal(hidden, table[ids])
