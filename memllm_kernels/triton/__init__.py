"""Triton kernels, registered as torch custom ops with torch.library.triton_op.

Importing this package needs triton; memllm_kernels imports it only when triton is installed.
On CPU tensors the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before import).
"""

import torch

from .. import _checks
from . import decode_attention as _decode_attention
from . import tol_cached_gather_add as _tol_cached_gather_add
from . import tol_gather_add as _tol_gather_add
from . import tol_host_gather as _tol_host_gather
from .decode_attention import decode_attention, decode_attention_kernel  # noqa: F401
from .tol_cached_gather_add import (  # noqa: F401
    tol_cached_gather_add_kernel,
    tol_cached_gather_add_triton,
    tol_cached_gather_add_triton_,
)
from .tol_gather_add import tol_gather_add_kernel, tol_gather_add_triton, tol_gather_add_triton_  # noqa: F401
from .tol_host_gather import tol_host_gather_kernel, tol_host_gather_triton  # noqa: F401


# The ops that write a ToL row in place have no derivative. triton_op gives them an Autograd kernel that runs the
# op with grad mode off (so a check in the op's body never sees it on) and lets a leaf that requires grad be
# written: kernels on the backends' Autograd keys, which take precedence over that one, refuse it first, as the
# C++ ops do (csrc/ops.cpp). torch.library.register_autograd refuses mutating ops.
_LIB = torch.library.Library("memllm", "IMPL")


def _refuse_grad(name: str, hint: str = _checks.NO_GRAD_HINT, forward_ad: bool = False) -> None:
    """forward_ad: refuse forward-AD dual tensors too (memllm_kernels.ops._no_forward_ad), for an op whose public
    wrapper does not (its tangents were dropped without a word: y came back without one)."""
    op = getattr(torch.ops.memllm, name).default

    def autograd(keyset, *args):
        _checks.no_grad(name, hint, **{a.name: v for a, v in zip(op._schema.arguments, args)})
        if forward_ad:
            from ..ops import _no_forward_ad  # (memllm_kernels.ops imports this package)

            _no_forward_ad(name, "triton", *args)
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    for key in ("AutogradCPU", "AutogradCUDA"):
        _LIB.impl(name, autograd, key, with_keyset=True)


for _name in ("tol_gather_add_triton_", "tol_cached_gather_add_triton_", "tol_host_gather_triton"):
    _refuse_grad(_name)
# decode_attention writes the KV caches in place and has no derivative for its output either: triton_op's own
# Autograd kernel let a cache that requires grad be written, and gave y a grad_fn that failed only in backward.
# Nor a forward derivative: under forward-AD dual tensors y came back with no tangent (the reference has one).
_refuse_grad("decode_attention", _checks.DECODE_NO_GRAD_HINT, forward_ad=True)


def aot_specs():
    """Every Triton kernel of the package with the specializations CI compiles for a GPU target."""
    yield from _tol_gather_add.aot_specs()
    yield from _tol_host_gather.aot_specs()  # the offload kernels (memllm_kernels/offload)
    yield from _tol_cached_gather_add.aot_specs()
    yield from _decode_attention.aot_specs()  # the model's decode step (memllm_kernels.model)
