"""Tests of the `memllm` command line: help texts, one end-to-end smoke run, refusals with clear messages."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memllm_kernels.cli import build_parser, main

SUBCOMMANDS = ["train", "precompute", "eval", "generate", "info"]
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


@needs_train_deps
def test_end_to_end_smoke(tmp_path, text, capsys):
    """train (a few steps of the real tiny preset) -> precompute -> eval with FFN and ToL -> generate."""
    runs = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--preset", "tiny-memoryllm", "--out", str(runs), "--text", str(text),
                       "--steps", "3", "--tokenizer", "bpe-320", "--batch-size", "8", "--seq-len", "32",
                       "--eval-every", "0", "--no-progress")
    assert rc == 0, err
    assert "non-embedding 4.74M" in out and "validation loss" in out
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokenizer"] == "bpe-320"

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
    rc, _, err = run(capsys, "eval", str(runs), "--tol")
    assert rc == 2 and "tol.safetensors does not exist" in err
    assert run(capsys, *args, "--force", "--seed", "1")[0] == 0
    assert (runs / "model.safetensors").read_bytes() != before


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
    rc, out, err = run(capsys, "precompute", "--preset", "250m-memoryllm", "--dry-run", "--dtype", "bf16")
    assert rc == 0, err
    est = json.loads(out.splitlines()[-1])
    assert est["shape"] == [128256, 24, 960] and est["table_bytes"] == 128256 * 24 * 960 * 2
    assert est["chunks"] > 1 and est["work_bytes"] < est["table_bytes"] / 10 and est["estimated_seconds"] > 0
