"""Everything that reads a file a user gives it (ToL files, run folders, texts): bad input is a ValueError or an
OSError whose message names the file (from the CLI: exit 2 and one line), never a crash, a hang, a huge allocation
or a table that differs from the file's without a word.

The ToL readers are fuzzed: a seeded set of mutations of a small valid ToL file (a cut at every offset of the header
and at sampled offsets of the data, replaced bytes, edits of each header field, appended bytes, other kinds of path)
is read by every public reader, the CLI's included, in a child process, so that a crash (SIGBUS, SIGSEGV) fails this
test with the case that caused it instead of killing the test run.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from memllm_kernels.cli import main

needs_train_deps = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("safetensors", "tokenizers", "tqdm")),
    reason="safetensors, tokenizers and tqdm are needed to train (pip install -e . installs them)")
SEED = 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run (memoryllm, V=300, 2 layers, d=32) with its ToL (77 KB): built once for the module."""
    from memllm_kernels.model import ModelConfig
    from memllm_kernels.model.tol import precompute_tol
    from memllm_kernels.model.train import TrainConfig, load_run, train

    root = tmp_path_factory.mktemp("files")
    old = os.environ.get("MEMLLM_CACHE")
    os.environ["MEMLLM_CACHE"] = str(root / "cache")
    try:
        rng = np.random.default_rng(SEED)
        words = "the king queen lord lady sword crown night day love death fair foul speak hear go come".split()
        text = root / "text"
        text.mkdir()
        for i in range(4):
            (text / f"w{i}.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(100)) + "\n")
        cfg = ModelConfig(kind="memoryllm", vocab_size=300, n_layer=2, d_model=32, n_head=2, block_size=32)
        tc = TrainConfig(steps=1, batch_size=2, seq_len=16, warmup=0, eval_every=0, ckpt_every=1, tokenizer="bpe-300",
                         text=str(text), final_eval_tokens=32, device="cpu")
        run = root / "run"
        train(run, cfg, tc, progress=False, log=lambda *a: None)
        precompute_tol(load_run(run)[0], run / "tol.safetensors")
    finally:
        if old is None:
            os.environ.pop("MEMLLM_CACHE")
        else:
            os.environ["MEMLLM_CACHE"] = old
    return run


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ================================================================ the ToL fuzzer
# The child: reads each case's file with every reader and prints BEGIN i before and RESULT i <json> after, so that
# the parent knows which case a crash or a hang happened in.
CHILD = r'''
import base64, contextlib, io, json, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a huge allocation fails (and is reported) at once
import torch
from memllm_kernels.cli import main
from memllm_kernels.model.tol import load_tol, read_tol_header
from memllm_kernels.model.train import load_run
from memllm_kernels.offload import DiskTable, HostTable, OffloadEngine

run, base_path, cases_path, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cases = json.load(open(cases_path))
base = open(base_path, "rb").read()
path = os.path.join(run, "tol.safetensors")
model = load_run(run)[0]
ref = load_tol(base_path, model, mmap=False)
V, L, d = ref.shape


def all_rows(tier):
    out = torch.empty_like(tier.table)
    tier.read_rows(torch.arange(out.shape[0]), out)
    return out


def engine_rows(p):
    engine = OffloadEngine(DiskTable(p, model), cache_rows=4, policy="lru")
    ids = torch.tensor([[0, 7, V - 1, 7]])
    engine.prefetch(ids)
    same = True
    for layer in range(L):
        h = torch.zeros(1, 4, d)
        engine.gather_add_(h, ids, layer)
        same &= torch.equal(h, ref[ids, layer])
    engine.close()
    return same


READERS = {
    "read_tol_header": lambda p: read_tol_header(p)[1]["shape"] == [V, L, d],
    "load_tol": lambda p: torch.equal(load_tol(p), ref),
    "load_tol(model)": lambda p: torch.equal(load_tol(p, model), ref),
    "load_tol(model, mmap=False)": lambda p: torch.equal(load_tol(p, model, mmap=False), ref),
    "DiskTable": lambda p: torch.equal(all_rows(DiskTable(p)), ref),
    "DiskTable(model)": lambda p: torch.equal(all_rows(DiskTable(p, model)), ref),
    "HostTable.from_file(model)": lambda p: torch.equal(HostTable.from_file(p, model).table, ref),
    "OffloadEngine(DiskTable)": engine_rows,
}
COMMANDS = {
    "eval --tol": ["eval", run, "--tol", "--max-tokens", "8", "--no-progress", "--json"],
    "eval --tol-location disk": ["eval", run, "--tol-location", "disk", "--max-tokens", "8", "--no-progress", "--json"],
    "generate --tol-location host": ["generate", run, "--tol-location", "host", "--prompt", "the king", "--temperature",
                                     "0", "--max-new-tokens", "2", "--no-progress"],
}


def place(case):
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)
    kind = case["kind"]
    if kind == "bytes":
        with open(path + ".tmp", "wb") as f:
            f.write(base[:case["cut"]] + base64.b64decode(case["insert"]) + base[case["resume"]:])
        os.replace(path + ".tmp", path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "symlink":
        os.symlink(base_path, path)
    elif kind == "dangling symlink":
        os.symlink(path + ".absent", path)
    elif kind == "symlink loop":
        os.symlink(path, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.symlink("/dev/zero", path)
    elif kind == "unreadable":
        with open(path, "wb") as f:
            f.write(base)
        os.chmod(path, 0)


def attempt(fn):
    try:
        return ["ok", bool(fn())]
    except Exception as e:
        return ["err", type(e).__name__, isinstance(e, (ValueError, OSError)), path in str(e), str(e)[:400]]


def command(argv):
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException as e:  # main lets no ValueError or OSError out: anything here is a traceback
        return ["raised", type(e).__name__, str(e)[:400]]
    res = out.getvalue()
    if rc == 0:  # the loss, the text written (not the timings)
        res = json.loads(res)["loss"] if argv[0] == "eval" else res.splitlines()[0]
    return ["rc", rc, err.getvalue()[-600:], res]


for i in range(start, len(cases)):
    case = cases[i]
    print("BEGIN", i, flush=True)
    place(case)
    result = {name: attempt(lambda: fn(path)) for name, fn in READERS.items()}
    if case["cli"]:
        result.update({name: command(argv) for name, argv in COMMANDS.items()})
    print("RESULT", i, json.dumps(result), flush=True)
'''


def _splice(name, cut, insert=b"", resume=None, *, base_len, harmless=False, data=False, reinterpret=False,
            cli=False):
    """A case: the file's bytes [:cut] + insert + [resume:] (resume: cut, an insertion)."""
    return {"name": name, "kind": "bytes", "cut": cut, "insert": base64.b64encode(insert).decode(),
            "resume": cut if resume is None else resume, "harmless": harmless, "data": data,
            "reinterpret": reinterpret, "cli": cli}


def _header_case(name, base, edit, *, harmless=False, reinterpret=False, data_bytes=None, raw=None, length=None,
                 pad=True):
    """A case whose JSON header is edit(header) (or the bytes `raw`), padded to 8, with its length prefix (or
    `length`), followed by the data (or `data_bytes`)."""
    (n,) = struct.unpack("<Q", base[:8])
    if raw is None:
        header = json.loads(base[8:8 + n])
        edit(header)
        raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw) if length is None else length)
    data = base[8 + n:] if data_bytes is None else data_bytes
    return _splice(name, 0, prefix + raw + data, len(base), base_len=len(base), harmless=harmless,
                   reinterpret=reinterpret, cli=True)


def _tol_cases(base: bytes, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    (n,) = struct.unpack("<Q", base[:8])
    H, size = 8 + n, len(base)
    header = json.loads(base[8:H])
    V, L, d = header["tol"]["shape"]
    nbytes = header["tol"]["data_offsets"][1]
    sp = dict(base_len=size)
    cases = [_splice("pristine", size, **sp, harmless=True, cli=True)]
    # cut at every offset of the length prefix and header, at the data's start and end and at 16 offsets between
    cuts = list(range(H + 1)) + [H + 1, size - 1] + sorted(rng.integers(H + 2, size - 1, 16).tolist())
    cases += [_splice(f"cut at byte {c}", c, b"", size, **sp, cli=c % 29 == 0 or c >= H - 1) for c in cuts]
    # a replaced byte: 160 random positions of the header, random values (the JSON's own characters among them)
    for pos in sorted(rng.choice(H, 160, replace=False).tolist()):
        val = bytes([int(rng.choice(list(b'{}[]":, 0123456789-.eE\\\x00\xff'))) if rng.random() < 0.5 else
                     int(rng.integers(256))])
        cases.append(_splice(f"byte {pos} of the header set to {val!r}", pos, val, pos + 1, **sp, cli=pos % 7 == 0))
    # the data: bytes set to 0xff (NaN / inf in float32) and random ones, which no header check can see
    for pos in sorted(rng.integers(H, size, 8).tolist()):
        val = b"\xff" if pos % 2 else bytes([int(rng.integers(256))])
        cases.append(_splice(f"data byte {pos} set to {val!r}", pos, val, pos + 1, **sp, data=True, cli=True))
    # bytes appended
    cases += [_splice(f"{k} bytes appended", size, b"\0" * k, **sp, cli=k == 8) for k in (1, 7, 8, 4096)]
    # the length prefix
    for value in (0, 1, 7, n - 8, n - 1, n + 1, n + 8, size - 8, size - 7, size, 100 << 20, (100 << 20) + 8, 2**63,
                  2**64 - 1):
        cases.append(_splice(f"header length {value}", 0, struct.pack("<Q", value), 8, **sp, cli=value in (0, n + 8)))
    # edits of each header field
    meta = header["__metadata__"]

    def set_in(*keys, value):
        def edit(h):
            target = h
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
        return edit

    def drop(*keys):
        def edit(h):
            target = h
            for k in keys[:-1]:
                target = target[k]
            del target[keys[-1]]
        return edit

    config = json.loads(meta["config"])
    edits = {
        # harmless: the table reads the same
        "layout changed": (set_in("__metadata__", "layout", value="anything"), dict(harmless=True)),
        "metadata key added": (set_in("__metadata__", "note", value="x" * 1000), dict(harmless=True)),
        "metadata dtype dropped": (drop("__metadata__", "dtype"), dict(harmless=True)),
        "version dropped": (drop("__metadata__", "version"), dict(harmless=True)),
        "data_crc32 dropped": (drop("__metadata__", "data_crc32"), dict(harmless=True)),  # as an older file: unchecked
        "config name changed": (set_in("__metadata__", "config", value=json.dumps({**config, "name": "x"})),
                                dict(harmless=True)),
        "header padded with 64 spaces": (None, dict(harmless=True, raw=base[8:H] + b" " * 64)),
        "header keys reordered": (None, dict(harmless=True, raw=json.dumps(
            {"tol": header["tol"], "__metadata__": meta}, indent=1).encode())),
        # the same bytes read as another table: only the model's checks can tell
        "shape [V, d, L]": (set_in("tol", "shape", value=[V, d, L]), dict(reinterpret=True)),
        "dtype F16, shape [V, L, 2d]": (lambda h: (h["tol"].update(dtype="F16", shape=[V, L, 2 * d]),
                                                   h["__metadata__"].update(dtype="F16")), dict(reinterpret=True)),
        "dtype BF16, shape [V, 2L, d], no metadata dtype": (
            lambda h: (h["tol"].update(dtype="BF16", shape=[V, 2 * L, d]), h["__metadata__"].pop("dtype")),
            dict(reinterpret=True)),
        # refused
        "an empty table": (lambda h: h["tol"].update(shape=[0, L, d], data_offsets=[0, 0]), dict(data_bytes=b"")),
        "no layers": (lambda h: h["tol"].update(shape=[V, 0, d], data_offsets=[0, 0]), dict(data_bytes=b"")),
        "metadata not an object": (set_in("__metadata__", value=[1, 2]), {}),
        "metadata null": (set_in("__metadata__", value=None), {}),
        "format dropped": (drop("__metadata__", "format"), {}),
        "version 2": (set_in("__metadata__", "version", value="2"), {}),
        "version 1 as a number": (set_in("__metadata__", "version", value=1), {}),
        "config dropped": (drop("__metadata__", "config"), {}),
        "config not JSON": (set_in("__metadata__", "config", value="{"), {}),
        "config a number": (set_in("__metadata__", "config", value=5), {}),
        "config nested 100,000 deep": (set_in("__metadata__", "config", value="[" * 100_000), {}),
        "config d_model changed": (set_in("__metadata__", "config", value=json.dumps({**config, "d_model": 64})), {}),
        "weights_sha256 changed": (set_in("__metadata__", "weights_sha256", value="0" * 64), {}),
        "weights_sha256 dropped": (drop("__metadata__", "weights_sha256"), {}),
        # the full readers refuse it (the rows look damaged); the mapped ones read rows unchecked
        "data_crc32 changed": (set_in("__metadata__", "data_crc32", value="0" * 8), {}),
        "data_crc32 not hex": (set_in("__metadata__", "data_crc32", value="data"), {}),
        "tensor entry dropped": (drop("tol"), {}),
        "tensor entry renamed": (lambda h: h.update(other=h.pop("tol")), {}),
        "tensor entry a list": (set_in("tol", value=[1]), {}),
        "dtype F64": (lambda h: (h["tol"].update(dtype="F64"), h["__metadata__"].update(dtype="F64")), {}),
        "dtype I32": (lambda h: (h["tol"].update(dtype="I32"), h["__metadata__"].update(dtype="I32")), {}),
        "dtype a list": (set_in("tol", "dtype", value=["F32"]), {}),
        "dtype null": (set_in("tol", "dtype", value=None), {}),
        "shape [V, L]": (set_in("tol", "shape", value=[V, L]), {}),
        "shape [V, L, d, 1]": (set_in("tol", "shape", value=[V, L, d, 1]), {}),
        "shape of strings": (set_in("tol", "shape", value=[str(V), str(L), str(d)]), {}),
        "shape of booleans": (set_in("tol", "shape", value=[True, True, True]), {}),
        "shape a number": (set_in("tol", "shape", value=V), {}),
        "shape 2**64": (set_in("tol", "shape", value=[2**64, L, d]), {}),
        "shape wrapping int64": (set_in("tol", "shape", value=[2**58 + V, L, d]), {}),
        "data_offsets [4, end + 4]": (set_in("tol", "data_offsets", value=[4, nbytes + 4]), {}),
        "data_offsets [0, end - 4]": (set_in("tol", "data_offsets", value=[0, nbytes - 4]), {}),
        "data_offsets reversed": (set_in("tol", "data_offsets", value=[nbytes, 0]), {}),
        "data_offsets of one": (set_in("tol", "data_offsets", value=[0]), {}),
        "data_offsets of three": (set_in("tol", "data_offsets", value=[0, nbytes, 0]), {}),
        "data_offsets of floats": (set_in("tol", "data_offsets", value=[0.0, float(nbytes)]), {}),
        "a second tensor and its data": (set_in("extra", value={"dtype": "F32", "shape": [1],
                                                                "data_offsets": [nbytes, nbytes + 4]}),
                                         dict(data_bytes=base[H:] + b"\0" * 4)),
        "header a JSON list": (None, dict(raw=b"[1, 2, 3]")),
        "header a JSON string": (None, dict(raw=b'"tol"')),
        "header nested 100,000 deep": (None, dict(raw=b"[" * 100_000)),
        "header with a 5,000-digit number": (None, dict(raw=b'{"tol": {"shape": [' + b"9" * 5000 + b"]}}")),
        "header not UTF-8": (None, dict(raw=b"\xff" * 16)),
        "header of NUL bytes": (None, dict(raw=b"\0" * 64)),
        "header unpadded": (None, dict(raw=base[8:H].rstrip(b" ") + b"   ", pad=False)),
        "header length one past its JSON": (None, dict(raw=base[8:H], length=n + 1)),
    }
    for name, (edit, kw) in edits.items():
        cases.append(_header_case(name, base, edit, **kw))
    # other kinds of path
    cases += [{"name": kind, "kind": kind, "harmless": kind == "symlink", "data": False, "reinterpret": False,
               "cli": True} for kind in ("directory", "symlink", "dangling symlink", "symlink loop", "fifo", "device")
              + (("unreadable",) if os.geteuid() != 0 else ())]  # (root reads a file of mode 000)
    cases.append(_splice("empty file", 0, b"", size, **sp, cli=True))
    return cases


# The readers that take no model: a header that reads the same bytes as another table passes them.
NO_MODEL = ("read_tol_header", "load_tol", "DiskTable")


def _run_children(run: Path, base_path: Path, cases: list[dict], work: Path) -> tuple[dict, list[str]]:
    """Run CHILD over the cases, again from the next case after a crash or a hang: ({case: result}, problems)."""
    cases_path = work / "cases.json"
    cases_path.write_text(json.dumps(cases))
    # (no GPU: a CUDA context reserves more address space than the child's limit)
    env = {**os.environ, "MEMLLM_CACHE": str(work / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    results, problems, start = {}, [], 0
    while start < len(cases):
        try:
            out = subprocess.run([sys.executable, "-c", CHILD, str(run), str(base_path), str(cases_path), str(start)],
                                 capture_output=True, text=True, timeout=300, env=env)
            stdout, stderr, rc = out.stdout, out.stderr, out.returncode
        except subprocess.TimeoutExpired as e:
            decode = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))
            stdout, stderr, rc = decode(e.stdout), decode(e.stderr), None
        begun = None
        for line in stdout.splitlines():
            tag, _, rest = line.partition(" ")
            if tag == "BEGIN":
                begun = int(rest)
            elif tag == "RESULT":
                i, _, res = rest.partition(" ")
                results[int(i)] = json.loads(res)
                begun = None
        if begun is None:
            if rc != 0:
                problems.append(f"the child failed (rc {rc}) between cases: {stderr[-3000:]}")
            break
        what = "hung (300 s in all)" if rc is None else f"killed the process (rc {rc})"
        problems.append(f"{cases[begun]['name']}: {what}: {stderr[-500:]}")
        start = begun + 1
    return results, problems


@needs_train_deps
def test_fuzzed_tol_files_load_or_fail_cleanly(run_dir, tmp_path):
    """Every mutation of a valid ToL file, read by every reader: either the table the file holds (the very same values
    for a harmless change, e.g. metadata a ToL does not use) or one ValueError / OSError naming the file (the CLI:
    exit 2, one line naming it); never a crash, a hang, another exception, or another table (bar changes of the data
    itself, which no header check can see, and a header read by a reader with no model to check it against)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    base_path = tmp_path / "base.safetensors"
    shutil.copy(run / "tol.safetensors", base_path)
    cases = _tol_cases(base_path.read_bytes(), SEED)
    assert len(cases) > 700
    results, problems = _run_children(run, base_path, cases, tmp_path)
    path = str(run / "tol.safetensors")
    baseline = results.get(0, {})
    for i, case in enumerate(cases):
        for reader, res in results.get(i, {}).items():
            where = f"{case['name']} / {reader}"
            kind = res[0]
            if kind == "err":
                _, typ, clear, names, msg = res
                if not (clear and names and "\n" not in msg):
                    problems.append(f"{where}: {typ}: {msg}")
                elif case["harmless"]:
                    problems.append(f"{where}: a harmless change refused: {msg}")
            elif kind == "ok":
                if not res[1] and not case["data"] and not (case["reinterpret"] and reader in NO_MODEL):
                    problems.append(f"{where}: read a table other than the file's, without a word")
            elif kind == "raised":
                problems.append(f"{where}: a traceback: {res[1]}: {res[2]}")
            else:
                rc, err, out = res[1:]
                if rc == 2:  # (non-finite data is named as "its ToL (a corrupted tol.safetensors?": RUN is given)
                    named = "tol.safetensors" if case["data"] else path
                    if case["harmless"] or named not in err or len(err.strip().splitlines()) != 1:
                        problems.append(f"{where}: exit 2 with {err!r}")
                elif rc != 0:
                    problems.append(f"{where}: exit {rc} with {err!r}")
                elif not case["data"] and out != baseline[reader][3]:
                    problems.append(f"{where}: exit 0 with another result: {out!r}, not {baseline[reader][3]!r}")
    assert all(res[0] == "ok" and res[1] for res in baseline.values() if res[0] != "rc"), baseline
    assert all(res[1] == 0 for res in baseline.values() if res[0] == "rc"), baseline
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])


# ================================================================ a mapped file changed under its reader
@needs_train_deps
def test_a_mapped_tol_in_a_model_refuses_its_file_truncated_or_rewritten(run_dir, tmp_path):
    """load_tol maps the file (the CLI's --tol on the CPU): truncated in place under a model that reads it, the next
    forward was SIGBUS, which killed the process; written in place at the same size, it read the new rows mixed with
    the old. Now an OSError naming the file, before any read. A file renamed over it is harmless (the old one stays
    mapped), and so are a table moved off the mapping and a deep copy of the model. In a subprocess, so that a
    regression fails this test instead of killing the test run."""
    script = textwrap.dedent(f"""
        import copy, os, shutil, torch
        from memllm_kernels.model.tol import load_tol, swap_ffn_for_tol
        from memllm_kernels.model.train import load_run
        src, path = {str(run_dir / "tol.safetensors")!r}, {str(tmp_path / "tol.safetensors")!r}
        ids = torch.tensor([[1, 2, 3, 299]])
        for change in ("truncate", "rewrite", "rename over", "copied table", "deepcopy"):
            shutil.copy(src, path)
            os.utime(path, ns=(0, 0))  # so that a rewrite moves the time, however coarse the file system's clock
            model = load_run({str(run_dir)!r})[0]
            swap_ffn_for_tol(model, load_tol(path, model))
            if change == "copied table":
                model.to(torch.float64)  # a copy of the table: no file change reaches it
            elif change == "deepcopy":
                model = copy.deepcopy(model)
            with torch.no_grad():
                before = model(ids)
                if change == "truncate":
                    os.truncate(path, 100)
                elif change == "rewrite":
                    data = open(path, "rb").read()
                    open(path, "wb").write(data)
                else:
                    shutil.copy(src, path + ".new")
                    os.replace(path + ".new", path) if change == "rename over" else os.truncate(path, 100)
                try:
                    print(change, torch.equal(model(ids), before))
                except OSError as e:
                    print(change, "OSError", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    path = tmp_path / "tol.safetensors"
    assert lines["truncate"].startswith(f"OSError ToL file {path} shrank to 100 bytes while mapped"), out.stdout
    assert lines["rewrite"].startswith(f"OSError ToL file {path} was written while mapped"), out.stdout
    assert lines["rename"] == "over True" and lines["copied"] == "table True", out.stdout
    assert lines["deepcopy"] == "True", out.stdout


@needs_train_deps
def test_a_compiled_decode_step_refuses_its_mapped_tol_truncated(run_dir, tmp_path):
    """compile_decode's graph reads a mapped table with no Python of the model's to check the file: the step checks
    it before the graph runs (a file cut under it was SIGBUS at the next step). In a subprocess, as above."""
    script = textwrap.dedent(f"""
        import os, shutil, torch
        from memllm_kernels.model import compile_decode
        from memllm_kernels.model.tol import load_tol, swap_ffn_for_tol
        from memllm_kernels.model.train import load_run
        path = {str(tmp_path / "tol.safetensors")!r}
        shutil.copy({str(run_dir / "tol.safetensors")!r}, path)
        model = load_run({str(run_dir)!r})[0]
        swap_ffn_for_tol(model, load_tol(path, model))
        with torch.no_grad():
            model.setup_caches(1, 8)
            model(torch.tensor([[1, 2]]), input_pos=torch.arange(2))
            step = compile_decode(model)
            print("step", step(torch.tensor([[3]]), input_pos=torch.tensor([2])).shape[-1])
            os.truncate(path, 100)
            try:
                step(torch.tensor([[4]]), input_pos=torch.tensor([3]))
            except OSError as e:
                print("OSError", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
    lines = out.stdout.splitlines()
    assert lines[0] == "step 300" and len(lines) == 2, out.stdout
    assert lines[1].startswith(f"OSError ToL file {tmp_path / 'tol.safetensors'} shrank to 100 bytes"), out.stdout


@needs_train_deps
def test_a_mapped_tol_copies_and_saves_as_before(run_dir, tmp_path):
    """The mapped table's file check travels with neither a copy nor a saved table: copy.deepcopy of a model reading it
    and torch.save of the table (loaded with weights_only) work as with any tensor (an open file in either raised
    TypeError: it cannot be pickled). Reading a copy after the file is cut: the test above."""
    import copy
    import io

    from memllm_kernels.model.tol import load_tol, swap_ffn_for_tol
    from memllm_kernels.model.train import load_run

    path = tmp_path / "tol.safetensors"
    shutil.copy(run_dir / "tol.safetensors", path)
    model = load_run(run_dir)[0]
    table = load_tol(path, model)
    buf = io.BytesIO()
    torch.save(table, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), table)
    swap_ffn_for_tol(model, table)
    twin = copy.deepcopy(model)
    assert model.layers[0].memory.store.watch is not None and twin.layers[0].memory.store.watch is None
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(twin(ids), model(ids))


# ================================================================ run folders
def _copy_run(run_dir, tmp_path, name="r"):
    r = tmp_path / name
    shutil.copytree(run_dir, r)
    return r


def _one_line_error(rc, err):
    return rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@needs_train_deps
def test_fuzzed_run_configs_load_or_fail_cleanly(run_dir, tmp_path, capsys, monkeypatch):
    """Each field of a run's config.json set to a value of another type or range, or deleted (a seeded sample), read
    by eval, info and train --resume: a tokenizer of 5 was an AttributeError, a train section without its text a
    KeyError, a data section that is a list a TypeError, an unknown train field a TypeError on --resume (tracebacks,
    all). Either the command works, or one line (mostly naming config.json)."""
    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    good = json.loads((run_dir / "config.json").read_text())
    values = [None, "x", -1, 0, 1.5, [], {}, True, 1000, "<deleted>"]  # (sizes: the next test)
    fields = [(section, key) for section in ("model", "train", "data") for key in good[section]] + [("tokenizer", None)]
    rng = np.random.default_rng(SEED)
    picks = [(fields[i], values[j])
             for i, j in zip(rng.integers(len(fields), size=90), rng.integers(len(values), size=90))]
    picks += [(("tokenizer", None), 5), (("train", "text"), "<deleted>"), (("data", None), []), (("train", "bogus"), 1)]
    r = _copy_run(run_dir, tmp_path)
    problems = []
    for (section, key), value in picks:
        cfg = json.loads(json.dumps(good))
        target, name = (cfg, section) if key is None else (cfg[section], key)
        if value == "<deleted>":
            del target[name]
        else:
            target[name] = value
        (r / "config.json").write_text(json.dumps(cfg))
        for argv in (["eval", r, "--max-tokens", "8", "--no-progress"], ["info", r],
                     ["train", "--out", r, "--resume", "--steps", "1", "--no-progress"]):  # (refused: at step 1)
            try:
                rc, _, err = cli(capsys, *argv)
            except Exception as e:  # noqa: BLE001 -- a traceback from the CLI
                problems.append(f"{section}.{key} = {value!r}: {argv[0]}: {type(e).__name__}: {e}")
                continue
            if rc != 0 and not _one_line_error(rc, err):
                problems.append(f"{section}.{key} = {value!r}: {argv[0]}: exit {rc}: {err!r}")
    assert not problems, "\n".join(problems[:30])
    # config.json text that is no JSON a config can be
    for raw in (b"[" * 100_000, b'{"model": ' + b"9" * 5000 + b"}", b"\xff\xfe", b""):
        (r / "config.json").write_bytes(raw)
        rc, _, err = cli(capsys, "eval", r, "--no-progress")
        assert _one_line_error(rc, err) and f"{r}/config.json is corrupted (not JSON" in err, err


@needs_train_deps
def test_config_sizes_are_checked_against_the_weights_before_the_model_is_built(run_dir, tmp_path):
    """config.json edited to sizes its weights do not have: the model was built first (ffn_hidden 10,000,000: 46 s
    and 7.7 GB before the mismatch was reported on a 2-core AMD EPYC VM; n_layer 1,000,000 would take hours), and
    vocab_size 100,000,000 was killed by the OOM killer (24 GB). The weights' shapes are read from model.safetensors'
    header first now: one line, at once. In a subprocess limited to 4 GiB of address space and 2 minutes, so that a
    regression fails this test instead of taking the machine's memory."""
    good = json.loads((run_dir / "config.json").read_text())
    r = _copy_run(run_dir, tmp_path)
    cases = {"ffn_hidden": (10**8, "size mismatch for layers.0.memory.ffn.w_gate_up.weight"),
             "vocab_size": (10**8, "size mismatch for tok_embeddings.weight"),
             "d_model": (2**20, "size mismatch for tok_embeddings.weight"),
             "n_layer": (10**6, "its layers: 2 (numbered 0 to 1), the config's: 1000000"),
             "kind": ("dense", "missing ['layers.0.ffn_norm.weight'")}
    script = textwrap.dedent(f"""
        import contextlib, io, json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from memllm_kernels.cli import main
        run, good = {str(r)!r}, json.loads({json.dumps(good)!r})
        for key, value in {[(k, v) for k, (v, _) in cases.items()]!r}:
            open(run + "/config.json", "w").write(json.dumps({{**good, "model": {{**good["model"], key: value}}}}))
            for argv in (["eval", run, "--no-progress"], ["train", "--out", run, "--resume", "--steps", "5",
                                                          "--no-progress"]):
                err = io.StringIO()
                t0 = time.perf_counter()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = main(argv)
                print(json.dumps([key, argv[0], rc, err.getvalue(), time.perf_counter() - t0]), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MEMLLM_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == 2 * len(cases)
    for key, command, rc, err, seconds in results:
        assert _one_line_error(rc, err) and f"{r}/model.safetensors cannot be read into the run's model" in err \
            and cases[key][1] in err and seconds < 10, (key, command, err, seconds)
    assert (r / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()


@needs_train_deps
def test_damaged_checkpoint_state_log_tokenizer_and_token_cache(run_dir, tmp_path, capsys, monkeypatch):
    """state.json without param_groups (KeyError on --resume) or with groups that are no objects (TypeError); optimizer
    keys that are not '<param>.<name>' ('not enough values to unpack'); log lines a resume could not compare (a step
    of "5": TypeError) or decode (no UTF-8): one line each, or a resume that keeps those lines as they are. A
    tokenizer.json without <|endoftext|> failed as a TypeError on None. A damaged token cache (an empty file: EOFError,
    a cut one: 'mmap length is greater than file size', naming no file) is tokenized again."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    state = json.loads((run_dir / "state.json").read_text())
    resume = ["--resume", "--steps", "2", "--no-progress"]
    for i, bad in enumerate(({k: v for k, v in state.items() if k != "param_groups"}, {**state, "param_groups": [1, 2]},
                             {**state, "param_groups": [{}]}, "[" * 100_000)):
        r = _copy_run(run_dir, tmp_path, f"state{i}")
        (r / "state.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        config = (r / "config.json").read_bytes()
        rc, _, err = cli(capsys, "train", "--out", r, *resume)
        assert _one_line_error(rc, err) and f"{r}/state.json" in err, err
        assert (r / "config.json").read_bytes() == config

    # no "<param>." ('not enough values to unpack'), not a number (int()), one byte changed (KeyError in opt.step())
    for i, rename in enumerate((lambda k: "nodot", lambda k: "x." + k.split(".", 1)[1], lambda k: k[:-1] + "#")):
        r = _copy_run(run_dir, tmp_path, f"opt{i}")
        opt = load_file(str(r / "optimizer.safetensors"))
        first = next(iter(opt))
        opt[rename(first)] = opt.pop(first)
        save_file(opt, str(r / "optimizer.safetensors"), metadata={"step": str(state["step"])})
        rc, _, err = cli(capsys, "train", "--out", r, *resume)
        assert _one_line_error(rc, err) and f"{r}/optimizer.safetensors does not match" in err, err

    r = _copy_run(run_dir, tmp_path, "log")
    kept = b'{"step": "5"}\n' + b"[" * 100_000 + b"\n" + b"\xff\xfe not UTF-8\n"
    (r / "log.jsonl").write_bytes(kept + b'{"step": 9, "loss": 1.0}\n')  # step 9: past the checkpoint, dropped
    rc, _, err = cli(capsys, "train", "--out", r, *resume)
    assert rc == 0, err
    log = (r / "log.jsonl").read_bytes()
    assert log.startswith(kept) and b'"step": 9,' not in log and b'"step": 2' in log

    r = _copy_run(run_dir, tmp_path, "tok")
    tok = json.loads((r / "tokenizer.json").read_text())
    tok["added_tokens"] = []
    vocab = tok["model"]["vocab"]
    vocab["zz"] = vocab.pop("<|endoftext|>")
    (r / "tokenizer.json").write_text(json.dumps(tok))
    for argv in (["eval", r, "--no-progress"], ["generate", r, "--prompt", "the", "--max-new-tokens", "1"]):
        rc, _, err = cli(capsys, *argv)
        assert _one_line_error(rc, err) and f"{r}/tokenizer.json: the run's BPE tokenizer has no <|endoftext|>" in err

    evaluate = ("eval", run_dir, "--tol-location", "disk", "--json", "--no-progress")  # (both splits: the hot set)
    rc, out, err = cli(capsys, *evaluate)
    assert rc == 0 and err == "", err
    want = json.loads(out)["loss"]
    caches = sorted((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(caches) == 2
    pristine = [c.read_bytes() for c in caches]
    for damage in (lambda b: b"", lambda b: b[:len(b) // 2], lambda b: b"\x93NUMPY junk", lambda b: b[:128] + b[129:],
                   lambda b: b"PK\x03\x04 junk"):  # (that one a zip archive to numpy: zipfile.BadZipFile)
        for c, raw in zip(caches, pristine):
            c.write_bytes(damage(raw))
        rc, out, err = cli(capsys, *evaluate)
        assert rc == 0 and err == "" and json.loads(out)["loss"] == want, err
        assert [c.read_bytes() for c in caches] == pristine  # tokenized again and rewritten


@needs_train_deps
def test_token_cache_cut_under_its_reader(run_dir, tmp_path):
    """The token-id cache was mapped (np.load mmap_mode='r'): the file cut in place while a run read batches from it
    was SIGBUS at the next read. It is read into memory now. In a subprocess, so that a regression fails this test
    instead of killing the test run."""
    script = textwrap.dedent(f"""
        import glob, os
        from memllm_kernels.model import data as D
        works = D.load_works({str(run_dir.parent / "text")!r})
        tok = D.BPETokenizer.load({str(run_dir / "tokenizer.json")!r})
        D.tokenize_works(works, tok)
        ids = D.tokenize_works(works, tok)  # from the cache
        for f in glob.glob(os.path.join(os.environ["MEMLLM_CACHE"], "tokens", "*.npy")):
            os.truncate(f, 0)
        print(int(ids[-100:].sum()) > 0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MEMLLM_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0 and out.stdout.split() == ["True"], f"rc {out.returncode}: {out.stderr[-2000:]}"


def test_text_inputs_fail_cleanly(tmp_path):
    """Texts given to train and eval: empty, binary, not UTF-8, NUL bytes, one huge line, a folder without texts, a
    FIFO (it was searched as a folder: 'holds no *.txt files'), a dangling symlink, a symlink loop."""
    from memllm_kernels.model import data as D

    t = tmp_path
    (t / "empty.txt").write_bytes(b"")
    (t / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (t / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (t / "nul.txt").write_bytes(b"\0" * 1000)
    (t / "line.txt").write_text("the " * 500_000)  # one 2 MB line
    (t / "folder").mkdir()
    (t / "folder" / "notes.md").write_text("x")
    (t / "loop").mkdir()
    (t / "loop" / "self").symlink_to(t / "loop")
    os.mkfifo(t / "fifo")
    (t / "dangling.txt").symlink_to(t / "absent")
    assert D.load_works(t / "empty.txt")[0].text == ""
    assert D.load_works(t / "nul.txt")[0].text == "\0" * 1000  # (valid UTF-8)
    assert len(D.load_works(t / "line.txt")[0].text) == 2_000_000
    refused = {"binary.txt": "not UTF-8 text", "latin1.txt": "not UTF-8 text", "folder": "holds no *.txt files",
               "loop": "holds no *.txt files", "fifo": "is neither a file nor a folder",
               "dangling.txt": "does not exist"}
    for name, message in refused.items():
        with pytest.raises((ValueError, OSError), match=re.escape(message)) as e:
            D.load_works(t / name)
        assert str(t / name) in str(e.value)


def test_bpe_training_on_a_huge_line_without_spaces(tmp_path):
    """A text with one long run of letters (a base64 blob, a DNA sequence, a minified file): the BPE trainer's time
    grows with the square of a word's length (400,000 characters took 35 s for bpe-4096 on a 2-core AMD EPYC VM; 2 MB
    about 15 minutes). Runs over 1,000 characters are cut for training now; ordinary text is given unchanged."""
    import time

    pytest.importorskip("tokenizers")
    from memllm_kernels.model import data as D

    rng = np.random.default_rng(SEED)
    blob = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 400_000))
    text = "the king speaks.\n" * 50 + blob + "\n" + " " * 5000 + "end\n"
    pieces = list(D._training_pieces([text]))
    assert "".join(pieces) == text and max(map(len, pieces[1:-1])) == D.MAX_TRAINING_WORD
    ordinary = ["the king speaks.\n  the queen hears.\n" * 100, "x" * D.MAX_TRAINING_WORD]
    assert list(D._training_pieces(ordinary)) == ordinary
    t0 = time.perf_counter()
    tok = D.BPETokenizer.train([text], 1024)
    assert time.perf_counter() - t0 < 15 and tok.decode(tok.encode(text)) == text


def test_file_watch_refuses_a_file_of_another_size_than_its_header_describes(tmp_path):
    """FileWatch opens the file after its header was read: a file cut or grown in between (replaced by another) is
    refused at the open, larger as well as smaller (its header no longer describes it)."""
    from memllm_kernels.offload.tiers import FileWatch

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(64))
    FileWatch(path, 64).check()
    for described in (63, 65):
        with pytest.raises(ValueError, match=r"f.bin: changed while it was opened \(64 bytes, its header describes"):
            FileWatch(path, described)
