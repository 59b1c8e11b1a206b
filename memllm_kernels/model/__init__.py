"""The thin reference model: dense, MemoryLLM and Flex-MemoryLLM, their ToLs and the FFN -> ToL swap.

    from memllm_kernels.model import get_preset, Transformer, precompute_tol, load_tol, swap_ffn_for_tol
    model = Transformer(get_preset("tiny-memoryllm"))
    precompute_tol(model, "tol.safetensors")                      # [V, L, d], streamed in chunks
    swap_ffn_for_tol(model, load_tol("tol.safetensors", model))   # memory FFNs -> tol_gather_add_

Files: config.py (presets, parameter counts), model.py (blocks, KV cache, generate), graphs.py (a decode
step replayed from a CUDA graph, or compiled), tol.py (precompute, file format and checks, swap; the token
embedding in host memory), data.py (text, tokenizers, token cache), train.py (training, eval, runs).
"""

from .config import KINDS, PRESETS, ModelConfig, describe_params, get_preset, param_counts, paper_millions  # noqa: F401
from .graphs import DecodeGraph, compile_decode  # noqa: F401
from .model import MemoryFFN, Transformer, generate, lm_loss  # noqa: F401
from .tol import (  # noqa: F401
    HostEmbedding,
    ToLMemory,
    estimate_tol,
    load_tol,
    offload_embedding,
    precompute_tol,
    read_tol_header,
    swap_ffn_for_tol,
    verify_tol,
    weights_checksum,
)
