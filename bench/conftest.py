"""Benchmark harness shared by bench/bench_*.py (pytest-benchmark).

Timing: every benchmark calls `timed(benchmark, fn, device)`. On CPU each round is one call timed
with perf_counter; on a GPU each round replays a CUDA graph of a batch of calls between CUDA events
(GPU time, no launch overhead), and eager back-to-back launches are timed too. After warm-up;
the number reported is the median per call.
Results are collected in RESULTS and written, with the machine description, to a JSON file and a
summary table at the end of the session.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import time

import pytest
import torch

RESULTS: list[dict] = []
# Decode steps timed back to back per round on a GPU (timed's min_inner), as generate() runs them: it reads the
# sampled ids only at the end, so the host prepares step k+1 while the device runs step k.
DECODE_RUN = 16


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu or cuda (default: cuda if a GPU is visible, else cpu)")
    parser.addoption("--full", action="store_true", help="also run the large prefill sizes")
    parser.addoption("--results-root", default=os.path.join(os.path.dirname(__file__), "results"),
                     help="results go to <root>/<machine>/<op>.json (default bench/results)")


def bench_device(config) -> str:
    dev = config.getoption("--device")
    return dev or ("cuda" if torch.cuda.is_available() else "cpu")


def machine_info(device: str) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
        # MEMLLM_COMMIT names the commit where the tree travels without its .git (or with an older one, as to a
        # GPU machine): whether that tree has changes is then unknown (None), not git's answer about another HEAD.
        commit = os.environ.get("MEMLLM_COMMIT") or head
        if commit == "unknown":
            commit = None
        dirty = tree = None
        if head and commit and (head.startswith(commit) or commit.startswith(head)):
            # Code changes only: results being rewritten by this very run do not make the tree dirty. A changed
            # tree is named by a hash of its diff, so that two runs of the same changes add to one results file.
            diff = subprocess.run(["git", "diff", "HEAD", "--", ".", ":(exclude)bench/results"], capture_output=True,
                                  cwd=os.path.dirname(os.path.dirname(__file__)), timeout=10).stdout
            dirty = bool(diff)
            tree = hashlib.sha1(diff).hexdigest()[:10] if diff else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty, tree = None, None, None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "device": device,
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "commit": commit,
        "dirty": dirty,
        "tree": tree,  # a hash of a changed tree's diff (None: clean, or unknown)
        # MEMLLM_RUN names one run of several sessions (bench/gpu_check.sh's steps, on a tree whose changes git
        # cannot see there): its sessions add to each other's results whatever the tree.
        "run": os.environ.get("MEMLLM_RUN") or None,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    return info


def machine_tag(info: dict) -> str:
    """The results folder's name: the GPU's name, or cpu-<threads>t-<CPU model> (cpu-2t-amd-epyc,
    cpu-2t-intel-xeon), so that runs on two machines never write into one folder."""
    if info["device"] == "cuda":
        name = info["gpu"]
    else:
        model = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b|@.*", " ", (info.get("cpu") or "").lower())
        name = f"cpu-{info['cpu_threads']}t {model}"
    return re.sub(r"-+", "-", "".join(c if c.isalnum() else "-" for c in name.lower())).strip("-")


def pytest_benchmark_update_machine_info(config, machine_info):  # pytest-benchmark hook
    machine_info["memllm"] = globals()["machine_info"](bench_device(config))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(benchmark, fn, device: str, target_s: float = 0.25, graph: bool = True, min_inner: int = 1) -> dict:
    """Benchmark `fn` (no arguments); returns median seconds per call as {"s": ..., "s_launch": ...}.

    CPU: rounds of one call each, timed with perf_counter ("s_launch" is None).
    CUDA: "s" is the GPU time per call: `inner` calls captured once in a CUDA graph, each round one
    replay between two CUDA events (no host launch overhead, as in a model decoding under CUDA
    graphs). "s_launch" is the per-call time of `inner` eager back-to-back launches between events,
    which includes the Python and launch overhead a caller without graphs pays. graph=False (code that
    is not written for capture, like a whole model step) makes the eager time the primary one; min_inner:
    at least this many calls back to back per round (a decode loop that does not wait for each token, as
    generate() runs), "s_synced" is then the time of one call followed by a host sync (a caller that
    reads every token as it comes), and "s_host" the host's time per call in those runs (perf_counter until
    the last call returns): where it reaches "s", the host, not the device, sets the pace.
    Warm-up calls (compilation, caches, allocator) are never counted.
    """
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-7)
    samples: list[float] = []
    if device != "cuda":
        def run():
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)

        _pedantic(benchmark, run, int(min(200, max(5, target_s / est))), 2, samples)
        return {"s": statistics.median(samples), "s_launch": None, "s_synced": None, "s_host": None}

    inner = max(min_inner, int(min(100, max(1, 1e-3 / est))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    launch: list[float] = []
    for _ in range(5):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        launch.append(start.elapsed_time(end) / 1e3 / inner)
    if not graph:
        synced = []
        # as many synced steps as a round has (at least 5): 5 decode steps of real text are 5 particular tokens,
        # hits or misses by chance
        for _ in range(max(5, inner)):
            start.record()
            fn()
            end.record()
            end.synchronize()
            synced.append(start.elapsed_time(end) / 1e3)

        host: list[float] = []

        def run():
            start.record()
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            host.append((time.perf_counter() - t) / inner)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)

        _pedantic(benchmark, run, int(min(100, max(5, target_s / (statistics.median(launch) * inner)))), 1,
                  samples, host)
        return {"s": statistics.median(samples), "s_launch": statistics.median(samples),
                "s_synced": statistics.median(synced), "s_host": statistics.median(host)}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # graph capture wants its warm-up on a side stream
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        for _ in range(inner):
            fn()

    def run():
        start.record()
        cuda_graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)

    rounds = int(min(100, max(5, target_s / (statistics.median(launch) * inner))))
    _pedantic(benchmark, run, rounds, 2, samples)
    return {"s": statistics.median(samples), "s_launch": statistics.median(launch), "s_synced": None, "s_host": None}


def _pedantic(benchmark, run, rounds: int, warmup: int, *collected: list) -> None:
    """benchmark.pedantic of `run` (one call per round), then keep only what `run` appended to the `collected`
    lists in the last `rounds` calls: pedantic's `warmup` rounds call it too, and are never counted (with
    pytest-benchmark disabled, pedantic calls it once, and that one call is kept)."""
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    for values in collected:
        del values[:max(0, len(values) - rounds)]


def reset_peak_memory(device: str) -> None:
    """Starts a fresh peak-memory window: the CUDA allocator's peak, or on CPU the process's peak RSS
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM; elsewhere the peak covers the whole run)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what was measured) since reset_peak_memory."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated(), "device max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb * 1024, "process peak RSS (VmHWM) since the benchmark's start"
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS over the whole run"


_TEST: list[str] = [""]  # the benchmark running now (its pytest node id): a row's identity when files merge


@pytest.fixture(autouse=True)
def _name_rows(request):
    _TEST[0] = request.node.nodeid
    yield


def record(**row) -> dict:
    row["test"] = _TEST[0]
    RESULTS.append(row)
    return row


def _continues(old, info: dict) -> bool:
    """Whether results `old` (a loaded file) come from a session of the same tree on this machine: the same run
    (MEMLLM_RUN), or the same commit, clean or with the same changes (their diff's hash). A tree whose state is
    unknown (no commit; a commit named without git to tell its changes) continues only a session of its run."""
    if not (isinstance(old, dict) and isinstance(old.get("machine"), dict)):
        return False
    m = old["machine"]
    if not all(m.get(k) == info.get(k) for k in ("device", "gpu", "cpu", "torch")):
        return False
    if info.get("run"):
        return m.get("run") == info["run"]
    return (bool(info.get("commit")) and info.get("dirty") is not None and m.get("commit") == info["commit"]
            and m.get("dirty") == info["dirty"] and m.get("tree") == info.get("tree"))


def _merged(path: str, info: dict, rows: list[dict]) -> list[dict]:
    """rows, after the rows of an earlier session in `path` that this one did not rerun, if that session ran the
    same commit (clean trees) on this machine: runs of some benchmarks (bench/gpu_check.sh's steps, a -k
    selection) add to a commit's results instead of replacing them. Any other file is replaced (set_aside)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return rows
    if not _continues(old, info):
        return rows
    rerun = {r["test"] for r in rows}
    return [r for r in old.get("results", []) if r.get("test") not in rerun] + rows


def set_aside(path: str, info: dict) -> str | None:
    """Moves `path` to previous/ beside it if this session replaces it rather than adds to it (_merged), and returns
    where it went: a -k run on a changed tree, or a run of the next commit, overwrote a machine's whole results
    without a word. previous/<op>.json is then the OLD of `python bench/report.py compare OLD NEW`."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            if _continues(json.load(f), info):
                return None
    except (OSError, ValueError):
        pass  # unreadable or cut short: kept aside too, not overwritten
    prev = os.path.join(os.path.dirname(path), "previous", os.path.basename(path))
    os.makedirs(os.path.dirname(prev), exist_ok=True)
    os.replace(path, prev)
    return prev


# The ops whose bytes all move within the device's memory, where the device copy is their ceiling (rows read from
# host memory or disk have pinned memcpy or the disk as theirs).
DEVICE_MEMORY_OPS = ("tol_gather_add", "decode_attention", "decode_linear")


def _derive(rows: list[dict]) -> None:
    """Adds GB/s, % of the same-bytes torch.add ceiling and speed-ups, from rows of one session."""
    key = lambda r: (r["op"], r["dtype"], r["preset"], r["T"], r.get("batch"))  # noqa: E731
    by = {(key(r), r["provider"]): r for r in rows}
    copy = next((r for r in rows if r["provider"] == "copy"), None)
    matmul = {r["dtype"]: r for r in rows if r["provider"] == "matmul"}
    for r in rows:
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
            if copy is not None and r["provider"] != "copy" and r["op"] in DEVICE_MEMORY_OPS:
                r["pct_copy_bw"] = 100 * r["gbps"] / copy["gbps_copy"]
        add, ffn = by.get((key(r), "add")), by.get((key(r), "ffn"))
        eagers = [e for e in (by.get((key(r), "eager")), by.get((key(r), "eager_select"))) if e is not None]
        eager = min(eagers, key=lambda e: e["ms"]) if eagers else None
        if add is not None and r["provider"] not in ("add", "ffn"):
            r["pct_ceiling"] = 100 * add["ms"] / r["ms"]
        if eager is not None and r["provider"] not in ("eager", "eager_select", "add", "ffn"):
            r["speedup_vs_eager"] = eager["ms"] / r["ms"]
        if ffn is not None and r["provider"] not in ("ffn", "add"):
            r["speedup_vs_ffn"] = ffn["ms"] / r["ms"]
        sdpa = by.get((key(r), "sdpa"))
        if sdpa is not None and r["provider"] != "sdpa":
            r["speedup_vs_sdpa"] = sdpa["ms"] / r["ms"]
        fault = by.get((key(r), "fault"))
        if fault is not None and r["provider"] != "fault":
            r["speedup_vs_fault"] = fault["ms"] / r["ms"]
        for base, field in (("memcpy", "pct_memcpy"), ("resident", "pct_resident")):  # same bytes: a time ratio
            b = by.get((key(r), base))
            if b is not None and r["provider"] != base:
                r[field] = 100 * b["ms"] / r["ms"]
        mm = matmul.get(r["dtype"])
        if mm is not None and r.get("tflops") is not None:
            r["pct_matmul"] = 100 * r["tflops"] / mm["tflops_matmul"]
        dense = by.get((key(r), "dense"))
        if dense is not None and r["op"].startswith("e2e") and r["provider"] != "dense":
            r["speedup_vs_dense"] = dense["ms"] / r["ms"]
            if "decode" in r["op"] and r.get("weight_bytes_read") and r["preset"] in ("250m", "750m", "1b"):
                # Decode at the paper's shapes reads every weight once per step (weight-bandwidth bound): the
                # speed-up bound is the ratio of weight bytes read (1b: 665M vs 1471M parameters, ~2.2x).
                r["bound_vs_dense"] = dense["weight_bytes_read"] / r["weight_bytes_read"]
                r["pct_bound"] = 100 * r["speedup_vs_dense"] / r["bound_vs_dense"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    device = bench_device(config)
    info = machine_info(device)
    out_dir = os.path.join(config.getoption("--results-root"), machine_tag(info))
    os.makedirs(out_dir, exist_ok=True)
    by_op: dict[str, list[dict]] = {}
    for r in RESULTS:
        by_op.setdefault(r["op"], []).append(r)
    by_op = {op: _merged(os.path.join(out_dir, f"{op}.json"), info, rows) for op, rows in by_op.items()}
    _derive([r for rows in by_op.values() for r in rows])
    for op, rows in by_op.items():
        path = os.path.join(out_dir, f"{op}.json")
        prev = set_aside(path, info)
        if prev:
            terminalreporter.write_line(f"moved the earlier {path} (another commit, a changed tree or another "
                                        f"machine) to {prev}")
        with open(path, "w") as f:
            json.dump({"machine": info, "results": rows}, f, indent=1)
        terminalreporter.write_line(f"wrote {path}")
    from report import ceilings, targets_missed, text_table, write_report

    terminalreporter.write_line(f"wrote {write_report(out_dir)}")
    tr = terminalreporter
    tr.section(f"summary on {info.get('gpu') or info['cpu']} ({device})")
    line = ceilings(RESULTS)
    if line:
        tr.write_line(line.rstrip())
    for op, rows in by_op.items():
        tr.write_line(f"\n{op}")
        for text in text_table(op, rows):
            tr.write_line(text)
    for op, rows in by_op.items():
        for miss in targets_missed({"machine": info, "results": rows}):
            tr.write_line(f"TARGET MISSED ({op}): {miss}")
