"""One decode step of the reference model captured in a CUDA graph and replayed (DecodeGraph), or compiled
with torch.compile (compile_decode), or both.

Eager decode at batch 1 is bound by launch overhead, not by memory traffic: a step of the 1b preset launches
about 30 kernels per layer (700 in all) at several microseconds of Python and driver time each, while reading
its weights takes about 0.7 ms (dense, 2.9 GB) or 0.3 ms (MemoryLLM, 1.3 GB) at an H200's 4.3 TB/s. Replayed
from a graph, the step costs one launch, and what is left is the weight traffic that MemoryLLM saves.

    model.setup_caches(B, max_len)
    step = DecodeGraph(model, B)                 # warm-up and capture (uses KV slot max_len - 1 as scratch)
    logits = step(tokens, pos, pad)              # tokens [B, 1] at cache slot pos -> logits [B, 1, V]

The logits tensor belongs to the graph: the next call overwrites it. With the offload engine
(swap_ffn_for_engine), each call runs engine.prefetch(inline=True) eagerly, on the stream the graph is replayed
on (hits and misses are decided on the host, without a host sync on the pinned tier), and the graph reads the
engine's step buffer, so rows still come from the device cache or the host tier; a step buffer that moved (a
longer prompt grew it) is recaptured. An engine with bookkeeping='device' (OffloadEngine.graph_step) has its
whole step captured instead: transfer and bookkeeping run inside the graph, and a call costs the host one
replay, as with the table in device memory.
The memory scales (set_memory_scale) are captured as they are: change them, then make a new DecodeGraph.
CUDA only: on other devices it raises ValueError rather than quietly running eagerly.

A graph removes launch overhead but not the kernels' own latency: on an H200 the replayed 1b dense step took
3.68 ms against 0.68 ms of weight traffic, because each layer still ran ~30 small kernels (norms, RoPE, the
mask, KV writes) of a few microseconds each. Since then the model runs fewer (q, k, v from one matmul; RoPE
once for q and k together; each norm one fused kernel on a GPU; the attention mask made once per step, not
converted by SDPA in every layer), and compile_decode(model) (DecodeGraph(..., compile=True),
generate(..., compile=True)) fuses the rest with torch.compile (inductor), for both the dense and the ToL
models. bench/decode_profile.py counts a step's kernels by kind.
"""

from __future__ import annotations

import torch

from .model import Transformer


def compile_decode(model: Transformer, mode: str | None = None):
    """A callable like `model` for decode steps, `(ids [B, 1], input_pos=[pos], pad=pad) -> logits`, with the
    forward compiled by torch.compile (inductor; static shapes, so a new batch size or KV-cache length compiles
    again, tens of seconds). It gives the eager model's logits up to float rounding of fused kernels.
    mode: torch.compile's mode (default None: its default), e.g. "max-autotune-no-cudagraphs" (Inductor also
    tries its own Triton matmuls, and keeps them where they beat cuBLAS: minutes of tuning on the first call).

    With the offload engine (swap_ffn_for_engine) the compiled graph reads every layer's rows through one
    opaque op per step (memllm::engine_step_rows, whose body is the engine's Python, run at call time), and the
    engine's prefetch runs before the compiled forward, as the model's forward pre-hook would (skipped while a
    CUDA graph is being captured, like the hook).
    """
    engine = getattr(model, "tol_engine", None)
    if engine is not None and mode in ("reduce-overhead", "max-autotune"):
        # Inductor's own CUDA graphs would replay the engine's op without its Python (waits, bookkeeping).
        raise ValueError(f"mode={mode!r} makes torch.compile capture CUDA graphs, which cannot hold the offload "
                         f"engine's step; use 'max-autotune-no-cudagraphs', or DecodeGraph for a graph")
    from .tol import TokenLookupTable, prefetch_for_forward

    fwd = torch.compile(model.forward, dynamic=False, fullgraph=True, mode=mode)
    # A table load_tol mapped from its file: the compiled graph reads it with no Python to check the file first (a
    # file cut under the mapping was SIGBUS at the next step), so each step checks it here, an fstat.
    store = next((m for m in model.modules() if isinstance(m, TokenLookupTable)), None)
    if engine is None and store is None:
        return fwd

    def step(ids, input_pos=None, pad=None, check=True):
        if engine is not None:
            prefetch_for_forward(engine, ids, model)
        if store is not None:
            store.checked()
        return fwd(ids, input_pos=input_pos, pad=pad, check=check)
    return step


class DecodeGraph:
    """A CUDA graph of `model(tokens [B, 1], input_pos=[pos], pad=pad)` over the model's current KV cache.

    model: a Transformer on a CUDA device with setup_caches(batch, max_len) done, max_len >= 2. The warm-up
    forwards write the last KV slot, max_len - 1; calls decode at slots below it, whose causal masks never
    read it (generate() never reaches the last slot either).
    warmup: eager forwards before the capture (lazy initialisation of cuBLAS and the like must not be captured).
    compile: capture the compile_decode(model) step (its compilation runs in the first warm-up forward); True,
    or torch.compile's mode for it, one that makes no CUDA graphs of its own (this class makes the graph).
    """

    def __init__(self, model: Transformer, batch: int, *, warmup: int = 2, compile: bool | str = False):
        if isinstance(compile, str) and compile in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile={compile!r} makes torch.compile capture CUDA graphs of its own, which cannot "
                             f"be captured inside DecodeGraph's; use 'max-autotune-no-cudagraphs' or 'default'")
        device = model.output.weight.device
        if device.type != "cuda":
            raise ValueError(f"DecodeGraph captures CUDA graphs; the model is on {device} (decode eagerly there)")
        kv = model.layers[0].attn.kv_cache
        if kv is None:
            raise RuntimeError("DecodeGraph needs a KV cache: call model.setup_caches(batch, max_len) first")
        if kv.k.shape[0] != batch:
            raise ValueError(f"the KV cache was set up for batch {kv.k.shape[0]}, not {batch}")
        if model._cache_len < 2:
            raise ValueError("DecodeGraph needs a KV cache of at least 2 slots (the last one is its scratch slot)")
        self.model, self.batch, self.device, self.warmup = model, batch, device, warmup
        self.max_len = model._cache_len
        self._kv = kv
        # The memory scales are plain floats, captured as they are (set_memory_scale afterwards needs a new
        # DecodeGraph): a graph of a model with every layer dropped reads no row, so it has no engine step.
        self.engine = getattr(model, "tol_engine", None) if model.reads_memory() else None
        self._step = compile_decode(model, compile if isinstance(compile, str) else None) if compile else model
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), self.max_len - 1, dtype=torch.long, device=device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.captures = 0
        self._capture()

    def _forward(self) -> torch.Tensor:
        return self._step(self.tokens, input_pos=self.pos, pad=self.pad, check=False)  # replays cannot check

    @torch.inference_mode()
    def _capture(self) -> None:
        # On the model's device throughout: torch.cuda.graph captures the current device's stream, and a model
        # on another GPU would run eagerly beside an empty graph (replays doing nothing).
        with torch.cuda.device(self.device):
            self.tokens.zero_()
            self.pad.zero_()
            self._pad_zero = True
            self.pos.fill_(self.max_len - 1)  # scratch slot: see the class docstring
            main = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._forward()
            main.wait_stream(side)
            whole = self.engine is not None and self.engine.graph_step
            if self.engine is not None:
                # The graph reads the engine's own step buffers (capture_step allocates nothing): a batch whose rows
                # exceed keep_buffer_bytes would get buffers of its own, freed after the step, and each replay would
                # read the capture's freed ones.
                self.engine.reserve(self.tokens.numel())
            if whole:
                self.engine.captured_layers = []
            elif self.engine is not None:
                # The capture's reads of the step buffer are recorded, not run: prefetch once so that the buffer
                # exists at its final address and the reads match this step (the model's hook is off while
                # capturing).
                self.engine.prefetch(self.tokens, check_ids=False, inline=True)
                self.engine.wait_step([])
                self.engine.captured_layers = []
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
                try:
                    if whole:  # the engine's transfer and bookkeeping are part of the graph
                        self.engine.capture_step(self.tokens)
                    self.logits = self._forward()
                finally:  # joined even if the forward raised, or the capture's end would hide its error
                    if whole:
                        self.engine.end_capture()
            if self.engine is not None:
                self._layers = list(self.engine.captured_layers)
                self._buffers = self.engine.step_buffers()
            self.captures += 1

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, pos: int, pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, 1] int (on the model's device), pos: the cache slot they go to (0 <= pos < max_len - 1),
        pad [B] (optional) left-padding counts as in Transformer.forward. Returns logits [B, 1, V] (graph-owned)."""
        if self.model.layers[0].attn.kv_cache is not self._kv:
            raise RuntimeError("the model's KV cache was set up again after this graph was captured; "
                               "make a new DecodeGraph")
        if tuple(tokens.shape) != (self.batch, 1) or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be [{self.batch}, 1] int32 or int64, got {list(tokens.shape)} "
                             f"{tokens.dtype}")
        # The copies into the graph's inputs would broadcast a pad of one row to every row, and truncate float ids.
        if pad is not None and (tuple(pad.shape) != (self.batch,) or pad.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"pad must be [{self.batch}] int32 or int64, got {list(pad.shape)} {pad.dtype}")
        if not 0 <= int(pos) < self.max_len - 1:
            raise ValueError(f"pos={pos} is outside [0, {self.max_len - 1}) (slot {self.max_len - 1} is the "
                             f"graph's scratch slot: set up the cache one slot longer)")
        with torch.cuda.device(self.device):
            return self._replay(tokens, pos, pad)

    def _replay(self, tokens, pos, pad) -> torch.Tensor:
        engine = self.engine
        if engine is not None and not engine.graph_step:
            # The engine's host copies of the last step's ids read self.tokens on its side stream: they go
            # before the tokens are rewritten (by _set_inputs, or a capture's scratch step).
            engine.wait_side()
        if engine is not None and any(a is not b for a, b in zip(engine.step_buffers(), self._buffers)):
            # A longer step (a prompt) grew the engine's buffers since the capture: the graph reads stale ones.
            self._capture()
        self._set_inputs(tokens, pos, pad)
        if engine is not None and engine.graph_step:
            # The graph runs the engine's step too (bookkeeping on the device): no engine work on the host.
            engine.before_replay()
            self.graph.replay()
            return self.logits
        if engine is not None:
            # Inline (one group, on this stream): the replay waits for every layer's rows anyway. The engine's
            # host work (bookkeeping, admissions) after the replay's launch: the replay reads only the step buffer.
            engine.prefetch(self.tokens, check_ids=False, inline=True, finish_later=True)
            engine.wait_step(self._layers)
        self.graph.replay()
        if engine is not None:
            engine.finish_step()
        return self.logits

    def _set_inputs(self, tokens, pos, pad) -> None:
        self.tokens.copy_(tokens)
        self.pos.fill_(int(pos))
        if pad is not None:
            self.pad.copy_(pad)
        elif not self._pad_zero:  # a launch saved per step: the host's time can set a replayed step's pace
            self.pad.zero_()
        self._pad_zero = pad is None
