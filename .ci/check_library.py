"""Loads a CMake-built memllm library with torch.ops.load_library and checks the op against the reference."""

import sys

import torch

torch.ops.load_library(sys.argv[1])
hidden = torch.randn(7, 33, dtype=torch.bfloat16)
table = torch.randn(11, 3, 33)
ids = torch.tensor([10, 0, 10, 5, 1, 2, 3])
out = torch.ops.memllm.tol_gather_add(hidden, ids, table, 2)
expected = (hidden.float() + table[ids, 2]).to(torch.bfloat16)
assert torch.equal(out, expected), "CMake build computes a wrong result"
try:
    torch.ops.memllm.tol_gather_add(hidden, torch.full((7,), 11), table, 2)
except IndexError as e:  # TORCH_CHECK_INDEX, as the Python build raises
    assert "outside [0, V)" in str(e), e
else:
    raise AssertionError("an out-of-range id was not rejected")
print(f"{sys.argv[1]}: torch.ops.memllm.tol_gather_add OK")
