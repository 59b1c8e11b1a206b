"""Tests of the `memllm` command line: help texts, one end-to-end smoke run, refusals with clear messages."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import memllm_kernels as mk
from memllm_kernels.cli import build_parser, main

SUBCOMMANDS = ["train", "precompute", "eval", "generate", "check", "info"]
# Training needs the model's runtime dependencies; a bare GPU test machine may lack them.
needs_train_deps = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("safetensors", "tokenizers", "tqdm")),
    reason="safetensors, tokenizers and tqdm are needed to train (pip install -e . installs them)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def text(tmp_path, monkeypatch):
    """A folder of six small synthetic works, and a private token cache."""
    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = "the king queen lord lady sword crown night day love death fair foul speak hear go come".split()
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(6):
        lines = [" ".join(rng.choice(words, 8)) + "." for _ in range(150)]
        (folder / f"w{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: memllm {cmd}")
    assert "--" in out


def test_top_level_help_and_entry_point():
    out = subprocess.run([sys.executable, "-m", "memllm_kernels.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and all(c in out.stdout for c in SUBCOMMANDS)
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["memllm"] == "memllm_kernels.cli:main"
    assert callable(main) and build_parser().prog == "memllm"


def test_version(capsys):
    """--version names the package's version (pyproject.toml's), torch's and the backends usable here."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert e.value.code == 0
    assert out == (f"memllm-kernels {version} (torch {torch.__version__}; backends here: "
                   f"{', '.join(mk.available_backends())})\n")


@needs_train_deps
def test_end_to_end_smoke(tmp_path, text, capsys):
    """train (a few steps of the real tiny preset) -> precompute -> eval with FFN and ToL -> generate."""
    runs = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--preset", "tiny-memoryllm", "--out", str(runs), "--text", str(text),
                       "--steps", "3", "--tokenizer", "bpe-320", "--batch-size", "8", "--seq-len", "32",
                       "--eval-every", "0", "--final-eval-tokens", "300", "--no-progress")
    assert rc == 0, err
    assert "non-embedding 4.74M" in out and "validation loss" in out
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokenizer"] == "bpe-320" and summary["val_tokens"] == 300

    rc, out, err = run(capsys, "precompute", str(runs), "--no-progress")
    assert rc == 0, err and (runs / "tol.safetensors").is_file()
    assert "[320, 6, 256]" in out

    res = {}
    for mode in ("--ffn", "--tol"):
        rc, out, err = run(capsys, "eval", str(runs), mode, "--json", "--no-progress", "--max-tokens", "500")
        assert rc == 0, err
        res[mode] = json.loads(out)
    assert res["--ffn"]["tokens"] == res["--tol"]["tokens"] == 500
    assert res["--tol"]["ppl"] == pytest.approx(res["--ffn"]["ppl"], rel=1e-5)
    rc, out, err = run(capsys, "eval", str(runs), "--tol", "--alpha", "0.5", "--drop-layers", "0,5", "--json",
                       "--no-progress", "--max-tokens", "500")
    assert rc == 0, err
    scaled = json.loads(out)
    assert scaled["alpha"] == 0.5 and scaled["drop_layers"] == [0, 5] and scaled["ppl"] != res["--tol"]["ppl"]
    rc, out, err = run(capsys, "eval", str(runs), "--tol", "--drop-layers", "9", "--no-progress")
    assert rc == 2 and "drop_layers [9] outside [0, 6)" in err

    rc, out, err = run(capsys, "generate", str(runs), "--prompt", "the king", "--prompt", "fair", "--tol",
                       "--max-new-tokens", "5", "--temperature", "0")
    assert rc == 0, err
    assert out.splitlines()[0].startswith("the king") and "fair" in out
    texts = {}
    for attention in ("sdpa", "memllm"):  # the decode_attention op (its reference here) writes the same text
        rc, texts[attention], err = run(capsys, "generate", str(runs), "--prompt", "the king", "--tol",
                                        "--max-new-tokens", "5", "--temperature", "0", "--decode-attention", attention)
        assert rc == 0, err
    assert texts["sdpa"] == texts["memllm"] and texts["sdpa"].startswith("the king")

    rc, out, err = run(capsys, "info", str(runs))
    assert rc == 0 and "tiny-memoryllm" in out

    # check: the table read once against its crc32s; a damaged byte names its rows, exit 2
    rc, out, err = run(capsys, "check", str(runs), "--no-progress")
    assert rc == 0 and f"{runs / 'tol.safetensors'}: intact: 0.00 GB in 1 blocks match their crc32s" in out, err
    raw = bytearray((runs / "tol.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (runs / "tol.safetensors").write_bytes(bytes(raw))
    rc, out, err = run(capsys, "check", str(runs), "--no-progress")
    assert rc == 2 and "tol.safetensors: corrupted data: bytes 0 to 1966079 of its table (token rows 0 to 319)" in err
    assert f"memllm precompute {runs} --force" in err and len(err.strip().splitlines()) == 1


def test_info_prints_the_paper_counts(capsys):
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["1b-dense"].endswith("1208M/1208M") and rows["1b-memoryllm"].endswith("1208M/402M")
    assert rows["250m-memoryllm"].endswith("265M/88M") and rows["750m-memoryllm"].endswith("737M/245M")
    rc, out, _ = run(capsys, "info", "1b-flex3", "--json")
    assert json.loads(out)["1b-flex3"]["non_embedding"] == 1_208_352_768


@needs_train_deps
def test_refusals_have_clear_messages(tmp_path, text, capsys):
    rc, _, err = run(capsys, "train", "--preset", "tiny-moe", "--out", str(tmp_path / "x"))
    assert rc == 2 and "unknown preset 'tiny-moe'; valid presets:" in err and "tiny-memoryllm" in err
    assert not (tmp_path / "x").exists()
    rc, _, err = run(capsys, "train", "--out", str(tmp_path / "x"))
    assert rc == 2 and "--preset is required" in err
    rc, _, err = run(capsys, "eval", str(tmp_path / "missing"))
    assert rc == 2 and "run directory" in err and "does not exist" in err
    rc, _, err = run(capsys, "precompute", str(tmp_path / "missing"))
    assert rc == 2 and "does not exist" in err

    runs = tmp_path / "run"
    args = ["train", "--preset", "tiny-dense", "--out", str(runs), "--text", str(text), "--steps", "1",
            "--tokenizer", "bpe-300", "--batch-size", "8", "--seq-len", "32", "--no-progress"]
    assert run(capsys, *args)[0] == 0
    before = (runs / "model.safetensors").read_bytes()
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "already exists" in err and "--force" in err
    assert (runs / "model.safetensors").read_bytes() == before
    rc, _, err = run(capsys, "precompute", str(runs))
    assert rc == 2 and "dense" in err
    tiny_text = tmp_path / "tiny_text"
    tiny_text.mkdir()
    for i in range(6):
        (tiny_text / f"w{i}.txt").write_text("the king speaks. the queen hears.\n")
    rc, _, err = run(capsys, "train", "--preset", "tiny-dense", "--out", str(tmp_path / "short"), "--text",
                     str(tiny_text), "--steps", "1", "--tokenizer", "bpe-300", "--seq-len", "200")
    assert rc == 2 and "yields only 279 ids; fewer than any bpe-N takes (N >= 300): give more text, or use " \
        "--tokenizer gpt2" in err and not (tmp_path / "short").exists()  # bpe-279 would be refused as too small
    rc, _, err = run(capsys, "train", "--preset", "tiny-dense", "--out", str(tmp_path / "short"), "--text",
                     str(tiny_text), "--steps", "1", "--tokenizer", "gpt2", "--seq-len", "200")
    assert rc == 2 and "too few for seq_len=200" in err and not (tmp_path / "short").exists()
    rc, _, err = run(capsys, "train", "--preset", "tiny-dense", "--out", str(tmp_path / "short"), "--text",
                     str(tiny_text), "--steps", "1", "--tokenizer", "gpt2", "--seq-len", "8", "--batch-size",
                     "100000000")  # ran out of memory after minutes of swapping
    assert rc == 2 and "a batch of 100000000 x 8 tokens needs at least 149,777.5 GiB for its float32 logits over " \
        "50,257 ids alone" in err
    assert "lower --batch-size or --seq-len" in err and not (tmp_path / "short").exists()
    for cmd in (["eval", str(runs), "--tol"], ["generate", str(runs), "--prompt", "the", "--tol-location", "host"]):
        rc, _, err = run(capsys, *cmd)
        assert rc == 2 and "dense model: it has no memory FFNs, so no ToL" in err
    for extra in ([], ["--steps", "1"]):  # already there: refused, nothing rewritten
        config = (runs / "config.json").read_bytes()
        rc, out, err = run(capsys, "train", "--out", str(runs), "--resume", "--no-progress", *extra)
        assert rc == 2 and "already at step 1 of 1; pass --steps above 1" in err
        assert (runs / "config.json").read_bytes() == config and (runs / "model.safetensors").read_bytes() == before
    # a run saved with a device this machine lacks: refused before config.json is rewritten; --device replaces it
    cfg = json.loads((runs / "config.json").read_text())
    cfg["train"]["device"] = "cuda:7"
    (runs / "config.json").write_text(json.dumps(cfg))
    config = (runs / "config.json").read_bytes()
    rc, _, err = run(capsys, "train", "--out", str(runs), "--resume", "--no-progress", "--steps", "2")
    assert rc == 2 and "cuda:7" in err and (runs / "config.json").read_bytes() == config
    assert run(capsys, "train", "--out", str(runs), "--resume", "--no-progress", "--steps", "2", "--device", "cpu")[0] == 0
    assert run(capsys, *args, "--force", "--seed", "1")[0] == 0
    assert (runs / "model.safetensors").read_bytes() != before


def test_existing_out_is_refused_before_the_text_is_read(tmp_path, capsys):
    """An existing run (or a file) as --out was refused only after the text was read and tokenized (seconds for
    Shakespeare, minutes for a large --text): now first, so a missing text is not even looked at."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    for out, message in ((tmp_path / "run", "already exists and is not empty; pass --force"),
                         (tmp_path / "run" / "notes.txt", "exists and is not a directory")):
        rc, _, err = run(capsys, "train", "--preset", "tiny-memoryllm", "--out", str(out), "--text",
                         str(tmp_path / "missing.txt"), "--steps", "1")
        assert rc == 2 and message in err and "does not exist" not in err, err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_force_refuses_a_folder_of_another_tool(tmp_path, capsys):
    """--force deletes the run files by name: in a Hugging Face model folder it deleted config.json, tokenizer.json
    and model.safetensors. A config.json that is not a run's is refused now."""
    folder = tmp_path / "hf-model"
    folder.mkdir()
    for name, data in (("config.json", '{"architectures": ["GPT2LMHeadModel"]}'), ("tokenizer.json", "{}")):
        (folder / name).write_text(data)
    rc, _, err = run(capsys, "train", "--preset", "tiny-memoryllm", "--out", str(folder), "--force", "--text",
                     str(tmp_path / "missing.txt"), "--steps", "1")
    assert rc == 2 and "holds a config.json that is not a memllm run's" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]


@needs_train_deps
def test_bad_input_is_refused_before_the_model_loads(tmp_path, text, capsys, monkeypatch):
    """generate's empty or too long prompt, eval's missing text, bad layer or seq_len were refused only after the
    model and its ToL had loaded (minutes for a large table read into host memory with --tol-location host)."""
    runs = tmp_path / "run"
    assert run(capsys, "train", "--preset", "tiny-memoryllm", "--out", str(runs), "--text", str(text), "--steps", "1",
               "--tokenizer", "bpe-300", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
               "--final-eval-tokens", "16", "--no-progress")[0] == 0

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr("memllm_kernels.cli._load_for_inference", no_loading)
    for argv, message in ((["generate", "--prompt", "the", "--prompt", ""], "empty prompt"),
                          (["generate", "--prompt", "the king", "--max-new-tokens", "255"],
                           "tokens) + --max-new-tokens (255) exceeds the model's block_size=256"),
                          (["eval", "--text", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
                          (["eval", "--drop-layers", "0,6"], "drop_layers [6] outside [0, 6)"),
                          (["eval", "--seq-len", "999"], "--seq-len 999 exceeds the model's block_size=256")):
        rc, _, err = run(capsys, argv[0], str(runs), "--tol-location", "host", *argv[1:])
        assert rc == 2 and message in err, err


@pytest.mark.requires_cuda
@needs_train_deps
def test_generate_on_a_gpu_through_each_tier(tmp_path, text, capsys):
    """On a GPU: the ToL in device memory, in pinned host memory through the engine (with the embedding there too,
    replayed from CUDA graphs) write the same text, and the memory FFNs never reach the device."""
    from memllm_kernels.cli import _load_for_inference
    from memllm_kernels.model.model import MemoryFFN
    from memllm_kernels.model.train import load_run

    runs = tmp_path / "run"
    assert run(capsys, "train", "--preset", "tiny-memoryllm", "--out", str(runs), "--text", str(text), "--steps", "2",
               "--tokenizer", "bpe-320", "--batch-size", "8", "--seq-len", "32", "--eval-every", "0",
               "--final-eval-tokens", "300", "--no-progress", "--device", "cpu")[0] == 0
    assert run(capsys, "precompute", str(runs), "--no-progress")[0] == 0
    texts = []
    for tier in (["--tol"], ["--tol-location", "host"],
                 ["--tol-location", "host", "--embedding-location", "host", "--cuda-graph"]):
        rc, out, err = run(capsys, "generate", str(runs), "--prompt", "the king", "--max-new-tokens", "6",
                           "--temperature", "0", "--device", "cuda", *tier)
        assert rc == 0, err
        texts.append(out.splitlines()[0])
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("the king")
    full, _ = load_run(runs, "cpu")
    ffn_bytes = sum(p.numel() * p.element_size() for m in full.modules() if isinstance(m, MemoryFFN)
                    for p in m.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _, engine = _load_for_inference(runs, "cuda", False, "host", None, "lru", progress=False)
    assert not any(isinstance(m, MemoryFFN) for m in model.modules()) and all(p.is_cuda for p in model.parameters())
    assert torch.cuda.max_memory_allocated() - base < full_bytes - ffn_bytes / 2  # the FFNs never came over
    engine.close()


@needs_train_deps
def test_precompute_refuses_overwrite_and_dry_run(tmp_path, text, capsys):
    runs = tmp_path / "run"
    assert run(capsys, "train", "--preset", "tiny-flex1", "--out", str(runs), "--text", str(text), "--steps", "1",
               "--tokenizer", "bpe-300", "--batch-size", "8", "--seq-len", "32", "--no-progress")[0] == 0
    assert run(capsys, "precompute", str(runs), "--no-progress")[0] == 0
    stamp = (runs / "tol.safetensors").stat().st_mtime_ns
    rc, _, err = run(capsys, "precompute", str(runs))
    assert rc == 2 and "exists; pass --force" in err
    assert (runs / "tol.safetensors").stat().st_mtime_ns == stamp
    rc, _, err = run(capsys, "precompute", str(runs), "--out", str(tmp_path), "--force")
    assert rc == 2 and "is a directory; give the table's file name" in err
    rc, _, err = run(capsys, "precompute", str(runs), "--out", str(tmp_path / "nodir" / "t.safetensors"))
    assert rc == 2 and "the folder of --out" in err and "does not exist" in err
    assert not (tmp_path / "nodir").exists()
    for name in ("config.json", "model.safetensors"):  # --force replaced the run's own files with a table
        rc, _, err = run(capsys, "precompute", str(runs), "--out", str(runs / name), "--force")
        assert rc == 2 and f"{runs / name} is a file of the run" in err
    json.loads((runs / "config.json").read_text())
    # --dry-run of a vocabulary under 2 x 512 tokens timed an empty second chunk (an estimate of ~0 s): now the
    # first chunk again, after a warm-up one
    from memllm_kernels.model import tol as tol_mod

    made, real = [], tol_mod.iter_tol_chunks

    def counted(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            made.append(chunk.shape[0])
            yield chunk
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tol_mod, "iter_tol_chunks", counted)
        rc, out, err = run(capsys, "precompute", str(runs), "--dry-run")
    assert rc == 0, err
    assert made == [300, 300] and "timed on 300 tokens" in out
    rc, out, err = run(capsys, "precompute", "--preset", "250m-memoryllm", "--dry-run", "--dtype", "bf16")
    assert rc == 0, err
    est = json.loads(out.splitlines()[-1])
    assert est["shape"] == [128256, 24, 960] and est["table_bytes"] == 128256 * 24 * 960 * 2
    assert est["chunks"] > 1 and est["work_bytes"] < est["table_bytes"] / 10 and est["estimated_seconds"] > 0


BAD_NUMBERS = [
    (["train", "--preset", "tiny-memoryllm", "--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["train", "--preset", "tiny-memoryllm", "--steps", "-3"], "--steps: expected a positive integer, got -3"),
    (["train", "--preset", "tiny-memoryllm", "--minutes", "-1"], "--minutes: expected a positive number"),
    (["train", "--preset", "tiny-memoryllm", "--ckpt-every", "0"], "--ckpt-every: expected a positive integer"),
    (["train", "--preset", "tiny-memoryllm", "--seq-len", "0"], "--seq-len: expected a positive integer"),
    (["train", "--preset", "tiny-memoryllm", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["train", "--preset", "tiny-memoryllm", "--threads", "-1"], "--threads: expected a positive integer"),
    (["train", "--preset", "tiny-memoryllm", "--device", "bogus"], "unknown device 'bogus'"),
    (["eval", "RUN", "--seq-len", "-4"], "--seq-len: expected a positive integer"),
    (["eval", "RUN", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["eval", "RUN", "--max-tokens", "0"], "--max-tokens: expected a positive integer"),
    (["generate", "RUN", "--prompt", "a", "--max-new-tokens", "-3"], "--max-new-tokens: expected a positive integer"),
    (["generate", "RUN", "--prompt", "a", "--top-k", "0"], "--top-k: expected a positive integer"),
    (["generate", "RUN", "--prompt", "a", "--temperature", "-1"], "--temperature: expected a non-negative number"),
    (["generate", "RUN", "--prompt", "a", "--cache-rows", "-5"], "--cache-rows: expected a non-negative integer"),
    (["precompute", "RUN", "--chunk-mb", "0"], "--chunk-mb: expected a positive number"),
    (["precompute", "RUN", "--chunk-mb", "inf"], "--chunk-mb: expected a positive number, got inf"),
    (["train", "--preset", "tiny-memoryllm", "--minutes", "inf"], "--minutes: expected a positive number, got inf"),
    (["train", "--preset", "tiny-memoryllm", "--lr", "inf"], "--lr: expected a positive number, got inf"),
    (["train", "--preset", "tiny-memoryllm", "--lr", "nan"], "--lr: expected a positive number, got nan"),
    (["train", "--preset", "tiny-memoryllm", "--threads", "100000"], "--threads: expected a positive integer up to 1,024"),
    (["train", "--preset", "tiny-memoryllm", "--seed", str(2**64)], "--seed: expected a non-negative integer up to"),
    (["train", "--preset", "tiny-memoryllm", "--device", "cpu:1"], "use cpu (the CPU has no device index)"),
    (["eval", "RUN", "--alpha", "nan"], "--alpha: expected a finite number, got nan"),
    (["eval", "RUN", "--threads", "20000"], "--threads: expected a positive integer up to 1,024"),
    (["generate", "RUN", "--prompt", "a", "--seed", "-1"], "--seed: expected a non-negative integer"),
]


@pytest.mark.parametrize("argv,message", BAD_NUMBERS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_numbers_and_devices_are_refused_before_any_work(argv, message, tmp_path, capsys):
    """A count of 0 or below (which trained on nothing, trained 500 steps for --steps 0, or failed after minutes)
    and an unusable device are refused by the parser: exit 2, one line, nothing written."""
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cuda_device_without_a_gpu_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    with pytest.raises(SystemExit) as e:
        main(["eval", "RUN", "--device", "cuda"])
    assert e.value.code == 2 and "device 'cuda': " in capsys.readouterr().err


def test_info_of_a_path_that_is_no_run(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    rc, _, err = run(capsys, "info", str(f))
    assert rc == 2 and "is neither a preset nor a run directory" in err


def test_the_python_api_refuses_the_same_numbers():
    """TrainConfig and generate check what the parser checks, for callers of the library."""
    import torch

    from memllm_kernels.model import Transformer, generate, get_preset
    from memllm_kernels.model.train import TrainConfig, evaluate, pick_device

    for bad in (dict(steps=0), dict(ckpt_every=0), dict(seq_len=-1), dict(minutes=0.0), dict(val_fraction=1.0),
                dict(final_eval_tokens=0), dict(lr=float("inf")), dict(minutes=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda'"):
            pick_device("cuda")
    model = Transformer(get_preset("tiny-memoryllm", n_layer=1, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="must be positive"):
        evaluate(model, np.arange(64), seq_len=0)
    for kw in (dict(max_new_tokens=-3), dict(max_new_tokens=2, top_k=0), dict(max_new_tokens=2, temperature=-1.0)):
        with pytest.raises(ValueError, match="must be >= 0 and top_k positive"):
            generate(model, [[1, 2]], **kw)
    assert len(generate(model, [[1, 2]], 2)[0]) == 2 and torch.is_grad_enabled()


@needs_train_deps
def test_damaged_run_files_are_one_line_errors(tmp_path, text, capsys):
    """A run folder whose files were damaged (edited, truncated, overwritten) gives exit 2 and one line naming the
    file, never a traceback; a resume that cannot load its checkpoint leaves config.json as it was; a ToL whose
    data turned into NaN is refused by eval instead of printing 'perplexity nan'."""
    import shutil
    import struct

    good = tmp_path / "run"
    assert run(capsys, "train", "--preset", "tiny-memoryllm", "--out", str(good), "--text", str(text), "--steps", "2",
               "--tokenizer", "bpe-300", "--batch-size", "8", "--seq-len", "32", "--eval-every", "0",
               "--final-eval-tokens", "64", "--no-progress")[0] == 0
    assert run(capsys, "precompute", str(good), "--no-progress")[0] == 0

    def damaged(name, file, data):
        r = tmp_path / name
        shutil.copytree(good, r)
        (r / file).write_bytes(data(((r / file).read_bytes())))
        return r

    config = json.loads((good / "config.json").read_text())
    cases = [
        (damaged("list", "config.json", lambda b: b"[1, 2]"), "is not a run's config"),
        (damaged("empty", "config.json", lambda b: b""), "config.json is corrupted (not JSON"),
        (damaged("nokey", "config.json", lambda b: b"{}"), "missing ['model', 'train', 'tokenizer', 'data']"),
        (damaged("vocab", "config.json",
                 lambda b: json.dumps({**config, "model": {**config["model"], "vocab_size": 9000}}).encode()),
         "model.safetensors cannot be read into the run's model"),
        (damaged("negvocab", "config.json",
                 lambda b: json.dumps({**config, "model": {**config["model"], "vocab_size": -5}}).encode()),
         "invalid model config"),
        # hand edits of other fields: 'not all arguments converted during string formatting', or a list of
        # unexpected weights, before ModelConfig checked types and ranges
        (damaged("strd", "config.json",
                 lambda b: json.dumps({**config, "model": {**config["model"], "d_model": "abc"}}).encode()),
         "invalid model config: d_model must be an integer >= 1, got 'abc'"),
        (damaged("neglayers", "config.json",
                 lambda b: json.dumps({**config, "model": {**config["model"], "n_layer": -1}}).encode()),
         "invalid model config: n_layer must be an integer >= 1, got -1"),
        (damaged("eps", "config.json",
                 lambda b: json.dumps({**config, "model": {**config["model"], "norm_eps": 0}}).encode()),
         "invalid model config: norm_eps must be a positive finite number, got 0"),
        (damaged("model", "model.safetensors", lambda b: b[:len(b) // 2]), "model.safetensors cannot be read"),
        (damaged("tok", "tokenizer.json", lambda b: b"garbage"), "tokenizer file is corrupted"),
    ]
    for r, message in cases:
        rc, _, err = run(capsys, "eval", str(r), "--max-tokens", "64", "--no-progress")
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (r.name, err)

    # resume: a truncated optimizer state is refused before config.json is rewritten for the new step count
    r = damaged("resume", "optimizer.safetensors", lambda b: b[:len(b) // 2])
    before = (r / "config.json").read_bytes()
    rc, _, err = run(capsys, "train", "--out", str(r), "--resume", "--steps", "4", "--no-progress")
    assert rc == 2 and "optimizer.safetensors cannot be read" in err
    assert (r / "config.json").read_bytes() == before

    # a ToL whose data bytes became 0xFF (NaN in float32); its header and weights checksum still fit the model, and
    # its data checksums are made to fit too (else the host tier refuses it as it loads: below)
    def nan_rows(b, crcs=True):
        (n,) = struct.unpack("<Q", b[:8])
        data = b"\xff" * (len(b) - 8 - n)
        header = json.loads(b[8:8 + n])
        if crcs:
            header["__metadata__"]["data_crc32"] = f"{zlib.crc32(data):08x}"  # one 64 MiB block
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        return struct.pack("<Q", len(hb)) + hb + data
    r = damaged("nancrc", "tol.safetensors", partial(nan_rows, crcs=False))
    rc, _, err = run(capsys, "eval", str(r), "--tol-location", "host", "--max-tokens", "64", "--no-progress")
    assert rc == 2 and "tol.safetensors: corrupted data: bytes 0 to" in err, err
    r = damaged("nan", "tol.safetensors", nan_rows)
    for flags in (["--tol"], ["--tol-location", "host"], ["--tol-location", "disk"]):
        rc, out, err = run(capsys, "eval", str(r), *flags, "--max-tokens", "64", "--no-progress", "--json")
        assert rc == 2 and "non-finite values; check its ToL" in err and out == "", (flags, err)
        # generate sampled token 0 (argmax of NaN logits, the end of text here) and printed the bare prompt
        rc, out, err = run(capsys, "generate", str(r), *flags, "--prompt", "the king", "--max-new-tokens", "3",
                           "--no-progress")
        assert rc == 2 and "logits became non-finite" in err and "corrupted tol.safetensors" in err, (flags, err)
    assert run(capsys, "eval", str(good), "--tol", "--max-tokens", "64", "--no-progress")[0] == 0

    # precompute refuses to rename over something that is not a regular file (a FIFO here; /dev/full as root)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    rc, _, err = run(capsys, "precompute", str(good), "--out", str(fifo), "--force", "--no-progress")
    assert rc == 2 and "exists and is not a regular file" in err and fifo.is_fifo()


@needs_train_deps
def test_precompute_and_training_refuse_non_finite_values(tmp_path, text):
    """A model whose memory FFNs give NaN writes no ToL (the file stays absent); a run whose loss turns NaN
    stops with a ValueError and keeps its last finite checkpoint."""
    from memllm_kernels.model import Transformer, get_preset
    from memllm_kernels.model.tol import precompute_tol
    from memllm_kernels.model.train import TrainConfig, train

    model = Transformer(get_preset("tiny-memoryllm", n_layer=2, vocab_size=300)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[123, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite outputs for tokens 0\.\.299"):
        precompute_tol(model, tmp_path / "tol.safetensors", progress=False)
    assert not (tmp_path / "tol.safetensors").exists() and not (tmp_path / "tol.safetensors.partial").exists()

    tc = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=1e30, warmup=0, eval_every=0, ckpt_every=1,
                     tokenizer="bpe-300", text=str(text), final_eval_tokens=64)
    with pytest.raises(ValueError, match="training diverged; the last checkpoint is kept"):
        train(tmp_path / "run", get_preset("tiny-memoryllm", n_layer=1), tc, progress=False, log=lambda *a: None)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert 1 <= state["step"] < 6


@needs_train_deps
def test_checkpoints_fail_cleanly_and_follow_the_umask(tmp_path, text, capsys, monkeypatch):
    """A checkpoint that cannot be written (a full disk: safetensors raises its own error, no OSError) gave a
    traceback and left a partial model.safetensors.tmp: one line now, no .tmp, the previous checkpoint kept. A
    state.json that is JSON but no checkpoint's was a KeyError on --resume. safetensors wrote the checkpoints
    0600 whatever the umask. --minutes with a warm-up under its 3 timed steps could not be repeated by --steps."""
    import safetensors.torch

    from memllm_kernels.model import train as T

    run_dir = tmp_path / "r"
    args = ["train", "--preset", "tiny-memoryllm", "--out", str(run_dir), "--text", str(text), "--tokenizer",
            "bpe-300", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--eval-every", "0",
            "--final-eval-tokens", "16", "--ckpt-every", "2"]
    old_mask = os.umask(0o022)
    try:
        assert run(capsys, *args, "--steps", "2")[0] == 0
    finally:
        os.umask(old_mask)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name
    weights = (run_dir / "model.safetensors").read_bytes()

    real = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):
        real(tensors, path, metadata)  # a partial file is left behind, as a full disk leaves one
        raise safetensors.SafetensorError("Error while serializing: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    rc, out, err = run(capsys, "train", "--out", str(run_dir), "--resume", "--steps", "4", "--no-progress")
    assert rc == 2 and "the checkpoint of step 4 could not be written (" in err and "No space left" in err
    assert "Traceback" not in err and not list(run_dir.glob("*.tmp"))
    assert (run_dir / "model.safetensors").read_bytes() == weights and T._read_state(run_dir)["step"] == 2
    monkeypatch.undo()

    for bad in ("{}", "[1]", '{"step": "2", "tokens": 0, "elapsed_s": 1.0}'):
        (run_dir / "state.json").write_text(bad)
        rc, _, err = run(capsys, "train", "--out", str(run_dir), "--resume", "--steps", "4", "--no-progress")
        assert rc == 2 and "state.json is not a checkpoint's state" in err, (bad, err)

    rc, _, err = run(capsys, *[a if a != str(run_dir) else str(tmp_path / "m") for a in args], "--minutes", "0.01",
                     "--warmup", "2")
    assert rc == 2 and "--warmup 2 is shorter: give --warmup 3 or more" in err and not (tmp_path / "m").exists()


@needs_train_deps
def test_resume_interrupts_and_misdirected_paths(tmp_path, text, capsys, monkeypatch):
    """--resume refuses the settings it would ignore and honours --final-eval-tokens; Ctrl-C in training finishes the
    step, checkpoints it and exits 130 with one line; a resumed run drops the log lines past its checkpoint; paths
    that are the wrong kind of thing are named as such; a closed pipe and Ctrl-C elsewhere are no tracebacks."""
    import signal

    from memllm_kernels.model import train as T

    run_dir = tmp_path / "r"
    args = ["train", "--preset", "tiny-memoryllm", "--out", str(run_dir), "--text", str(text), "--tokenizer",
            "bpe-300", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--ckpt-every", "1000"]
    calls = {"n": 0}
    orig_get_batch = T.get_batch

    def get_batch(ids, step, tc):
        calls["n"] += 1
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of step 3
        return orig_get_batch(ids, step, tc)

    monkeypatch.setattr(T, "get_batch", get_batch)
    # training takes over only Python's default handler: set it, as an interactive shell does (nohup ignores SIGINT)
    handler_before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert T._StopOnInterrupt()._old is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # left alone
        signal.signal(signal.SIGINT, ignored)
        rc, out, err = run(capsys, *args, "--steps", "50")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, handler_before)
    assert rc == 130 and "interrupted: stopped at step 3 of 50 with a checkpoint" in out
    assert json.loads((run_dir / "state.json").read_text())["step"] == 3 and calls["n"] == 3
    monkeypatch.setattr(T, "get_batch", orig_get_batch)

    with (run_dir / "log.jsonl").open("a") as f:  # lines a run logged past its last checkpoint, then lost
        f.write(json.dumps({"step": 40, "loss": 1.0}) + "\n")
    rc, _, err = run(capsys, "train", "--out", str(run_dir), "--resume", "--steps", "20", "--lr", "0.5",
                     "--batch-size", "7", "--text", "/nonexistent")
    assert rc == 2 and "saved settings; drop --text, --batch-size, --lr" in err
    rc, out, _ = run(capsys, "train", "--out", str(run_dir), "--resume", "--steps", "20", "--no-progress",
                     "--final-eval-tokens", "16")
    assert rc == 0 and "over 16 tokens" in out
    steps = [json.loads(ln)["step"] for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and 40 not in steps and steps[-1] == 20

    rc, _, err = run(capsys, "eval", str(run_dir / "config.json"))
    assert rc == 2 and "is not a run directory (a run is a folder" in err
    rc, _, err = run(capsys, "eval", str(run_dir), "--seq-len", "100000", "--no-progress")
    assert rc == 2 and "--seq-len 100000 exceeds the model's block_size=" in err
    (run_dir / "tol.safetensors").mkdir()
    rc, _, err = run(capsys, "eval", str(run_dir), "--tol")
    assert rc == 2 and "tol.safetensors exists but is not a file; move it away" in err
    rc, _, err = run(capsys, "precompute", str(run_dir), "--force")
    assert rc == 2 and "exists and is not a regular file" in err and "--out" not in err

    def raising(exc):
        def handler(a):
            raise exc
        return handler

    for exc, code in ((KeyboardInterrupt(), 130), (BrokenPipeError(32, "Broken pipe"), 141)):
        monkeypatch.setattr("memllm_kernels.cli._cmd_info", raising(exc))
        rc, _, err = run(capsys, "info")
        assert rc == code and ("interrupted" in err if code == 130 else err == "")


def test_runs_interrupted_before_the_step_count_is_fixed_or_in_the_final_evaluation(tmp_path, text, capsys,
                                                                                       monkeypatch):
    """A --minutes run stopped by Ctrl-C before its 3rd step kept the placeholder 500 steps in config.json, which
    --resume then trained: the count comes from the steps there were. Ctrl-C in the final evaluation left a run at
    its last step without summary.json, which --resume refused ('already at step 2'): it now evaluates."""
    import signal

    from memllm_kernels.model import train as T

    args = ["--preset", "tiny-memoryllm", "--text", str(text), "--tokenizer", "bpe-300", "--batch-size", "2",
            "--seq-len", "16", "--no-progress", "--warmup", "3"]
    orig_get_batch = T.get_batch

    def get_batch(ids, step, tc):
        if step == 0:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the first step
        return orig_get_batch(ids, step, tc)

    monkeypatch.setattr(T, "get_batch", get_batch)
    handler_before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc, out, _ = run(capsys, "train", "--out", str(tmp_path / "m"), "--minutes", "0.05", *args)
    finally:
        signal.signal(signal.SIGINT, handler_before)
    monkeypatch.setattr(T, "get_batch", orig_get_batch)
    steps = json.loads((tmp_path / "m" / "config.json").read_text())["train"]["steps"]
    assert rc == 130 and steps != 500 and f"stopped at step 1 of {steps} with a checkpoint" in out, out
    (tmp_path / "m" / "tol.safetensors").write_bytes(b"a ToL of the step-1 weights")
    rc, out, _ = run(capsys, "train", "--out", str(tmp_path / "m"), "--resume", "--steps", "2", "--no-progress",
                     "--final-eval-tokens", "32")
    assert rc == 0 and f"{tmp_path / 'm' / 'tol.safetensors'} holds the ToL of the weights before this resume" in out

    orig_evaluate, calls = T.evaluate, []

    def evaluate(*a, **kw):
        calls.append(kw.get("max_tokens"))
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C in the final evaluation
        return orig_evaluate(*a, **kw)

    monkeypatch.setattr(T, "evaluate", evaluate)
    rc, _, err = run(capsys, "train", "--out", str(tmp_path / "e"), "--steps", "2", "--eval-every", "0",
                     "--final-eval-tokens", "32", *args)
    assert rc == 130 and "interrupted" in err and not (tmp_path / "e" / "summary.json").exists()
    rc, out, _ = run(capsys, "train", "--out", str(tmp_path / "e"), "--resume", "--no-progress")
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert rc == 0 and calls == [32, 32] and summary["steps"] == 2 and summary["final_train_loss"] is None, out
    rc, _, err = run(capsys, "train", "--out", str(tmp_path / "e"), "--resume", "--no-progress")
    assert rc == 2 and "already at step 2 of 2" in err  # now that it has its summary


def test_unknown_options_are_reported_by_the_subcommand(capsys):
    """`memllm generate RUN --ffn` printed the top-level usage and 'memllm: error'; the subcommand's own now."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "run", "--prompt", "hi", "--ffn"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: memllm generate")
    assert "memllm generate: error: unrecognized arguments: --ffn" in err


@pytest.mark.filterwarnings("ignore:'memllm_kernels.interpret.cli' found in sys.modules")  # runpy's, as under -m
def test_standalone_inspect_is_interrupted_without_a_traceback(tmp_path, capsys, monkeypatch):
    """`python -m memllm_kernels.interpret.cli inspect RUN` ended Ctrl-C with a traceback; now one line, as memllm."""
    import runpy

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("memllm_kernels.interpret.report.write_report", interrupted)
    monkeypatch.setattr(sys, "argv", ["cli.py", "inspect", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        try:
            runpy.run_module("memllm_kernels.interpret.cli", run_name="__main__")
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped (a traceback)")
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "memllm inspect: interrupted"
