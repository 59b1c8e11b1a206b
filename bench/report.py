"""Reports and comparisons from benchmark JSON (bench/results/<machine>/<op>.json).

    python bench/report.py report bench/results/nvidia-h200      # report.md + PNG plots in that folder
    python bench/report.py targets bench/results/nvidia-h200     # each target: met, missed or not measured
    python bench/report.py compare OLD.json NEW.json             # time ratio per benchmark (stderr: those only in
                                                                 # one file or without a time, another machine)

The benchmark session (bench/conftest.py) writes the JSON and calls `write_report` itself. A target whose rows are
absent (its benchmark skipped, deselected, or cut by bench/gpu_check.sh's time limit for its step) is reported as
not measured, never as met. A results file with a malformed row (no 'op' or 'provider', a value that is not a number
where one belongs) is refused in one line naming the file and the row: `report` leaves that file out, `compare` stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

KEY_FIELDS = ("op", "provider", "dtype", "preset", "T", "batch")
# Providers drawn in the gather-add plots: the compiled backends, functional and in place.
KERNEL_PROVIDERS = ("cpu", "cpu_", "cuda", "cuda_", "triton", "triton_")


def load(path: str) -> dict:
    """A results file; ValueError (one line, naming the file) for one that is not JSON or not a result."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not JSON ({e})") from None
    # A JSON list or string would pass an `in` test: check the shape the report and compare index into.
    if not (isinstance(data, dict) and isinstance(data.get("machine"), dict) and isinstance(data.get("results"), list)
            and all(isinstance(r, dict) for r in data["results"])):
        raise ValueError(f"{path} is not a memllm benchmark result (no 'machine'/'results')")
    for i, r in enumerate(data["results"]):
        problem = row_problem(r)
        if problem:
            raise ValueError(f"{path}: results[{i}] {problem}: {_short(r)}")
    return data


def _short(r, n: int = 100) -> str:
    text = json.dumps(r, default=str)
    return text if len(text) <= n else text[:n - 3] + "..."


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(r, key):
    """r[key] where r is a row and that is a number, else None (an absent row or value)."""
    v = r.get(key) if isinstance(r, dict) else None
    return v if _is_num(v) else None


def row_problem(r) -> str | None:
    """What makes a results row unusable (None: nothing): no 'op' or 'provider', no time, or a value its table
    cannot show (a string where a number belongs, say). Such a row crashed `report` with a KeyError."""
    if not isinstance(r, dict):
        return "is not an object"
    for k in ("op", "provider"):
        if not isinstance(r.get(k), str):
            return f"has no '{k}'" if k not in r else f"has '{k}' {r[k]!r}, not a name"
    if not _is_num(_ms(r)):
        return "has no time ('ms', or decode_profile's 'wall_ms') as a number"
    for head, key, spec in columns(r["op"]):
        try:
            v = _get(key)(r)
            if v is not None:
                format(v, spec)
        except Exception:  # noqa: BLE001  (KeyError, TypeError, ValueError: whatever the column's code hits)
            name = key if isinstance(key, str) else head
            return f"has no usable '{name}'" + (f" ({r[name]!r})" if isinstance(key, str) and key in r else "")
        if v is not None and spec[-1] in "fd%" and not _is_num(v):
            return f"has '{key if isinstance(key, str) else head}' {v!r}, not a number"
    return None


def usable(rows: list[dict], where: str = "") -> list[dict]:
    """rows without the malformed ones, each left out named on stderr (load refuses a file that has one; rows
    built in memory, by a benchmark session that merges an earlier file, pass through here)."""
    good = []
    for i, r in enumerate(rows):
        problem = row_problem(r)
        if problem:
            print(f"report: left out row {i}{' of ' + where if where else ''}: {problem}: {_short(r)}", file=sys.stderr)
        else:
            good.append(r)
    return good


# Parameters beside KEY_FIELDS that tell an op's rows apart: without them compare paired the hit fraction 0.9
# engine step of one file with the 1.0 one of the other, and decode_profile's eager step with its compiled one.
VARIANT_FIELDS = {"decode_profile": ("mode", "attention"), "offload_engine_step": ("hit_fraction",)}


def _key(r: dict) -> tuple:
    return tuple(r.get(k) for k in KEY_FIELDS + VARIANT_FIELDS.get(r.get("op"), ()))


# Recorded settings of a row (beside its key) that make two runs' times incomparable: the text a decode step reads
# (real or synthetic ids), its attention, cache and table sizes, a projection's shape. compare names those that
# differ between the two rows it pairs (a field one file lacks counts as differing: that run did not record it).
PARAM_FIELDS = ("text", "attention", "mode", "hit_fraction", "hot_fraction", "cache_rows", "vocab", "table_bytes",
                "weight_bytes", "weight_bytes_read", "embedding", "miss_path", "pinned", "scenario", "d", "K", "N",
                "per_step", "copies", "input_sets")


def text_kind(r: dict):
    """The ids an e2e row decoded, in a word: 'zipf' where real text was missing and the benchmark fell back to
    synthetic ids, else the text's first word ('shakespeare'); None for rows that record no text (random ids)."""
    text = r.get("text")
    if not isinstance(text, str):
        return None
    return "zipf" if text.startswith("zipf") else (text.split() or ["?"])[0]


def param_differences(old: dict, new: dict) -> list[str]:
    """'field old->new' for each recorded setting (PARAM_FIELDS) that differs between two paired rows."""
    out = []
    for k in PARAM_FIELDS:
        if k not in old and k not in new:
            continue
        a, b = (text_kind(x) if k == "text" else x.get(k) for x in (old, new))
        if a != b:
            out.append(f"{k} {'?' if a is None else a}->{'?' if b is None else b}")
    return out


def _ms(r: dict):
    """A row's time: ms per call, or decode_profile's ms per step (wall_ms; it has no ms)."""
    return r.get("ms", r.get("wall_ms"))


def machine_label(m: dict) -> str:
    hw = m.get("gpu") or f"{m.get('cpu')} ({m.get('cpu_threads')} threads)"
    dirty = " with uncommitted changes" if m.get("dirty") else ""
    return f"{hw}, torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('commit')}{dirty}"


def _get(key):
    return key if callable(key) else (lambda r: r.get(key))


def _gb(key):
    return lambda r: r[key] / 1e9 if r.get(key) is not None else None


def _pct(key):
    return lambda r: 100 * r[key] if r.get(key) is not None else None


def _kind(kind, field):  # decode_profile: a field of one kind of kernel
    return lambda r: (r.get("by_kind") or {}).get(kind, {}).get(field)


# The table of each op: (header, row key or function of the row, format). One definition for the
# markdown report and the terminal summary.
_FIRST = [("provider", "provider", "s"), ("dtype", "dtype", "s"), ("preset", "preset", "s"), ("T", "T", "d")]
COLUMNS = {
    "tol_gather_add": _FIRST + [
        ("ms", "ms", ".4f"), ("GB/s", "gbps", ".1f"), ("% add", "pct_ceiling", ".0f"), ("% copy", "pct_copy_bw", ".0f"),
        ("x eager", "speedup_vs_eager", ".2f"), ("x FFN", "speedup_vs_ffn", ".1f"),
        ("TFLOP/s", lambda r: r.get("tflops") or r.get("tflops_matmul"), ".2f"), ("% matmul", "pct_matmul", ".0f"),
        ("ms launch", "ms_launch", ".4f")],
    "offload_gather": [("provider", "provider", "s"), ("preset", "preset", "s"), ("rows", "T", "d"), ("ms", "ms", ".4f"),
                       ("GB/s", "gbps", ".1f"), ("% memcpy", "pct_memcpy", ".0f"), ("ms launch", "ms_launch", ".4f")],
    "offload_cached_gather_add": _FIRST + [("ms", "ms", ".4f"), ("GB/s", "gbps", ".1f"),
                                           ("% resident", "pct_resident", ".0f"), ("ms launch", "ms_launch", ".4f")],
    "offload_prefetch": _FIRST + [("ms", "ms", ".4f"), ("GB/s", "gbps", ".1f"), ("% memcpy", "pct_memcpy", ".0f"),
                                  ("ms launch", "ms_launch", ".4f")],
    "offload_engine_step": [("miss path", "provider", "s"), ("preset", "preset", "s"),
                            ("hit fraction", "hit_fraction", ".1f"), ("us per step", lambda r: r["ms"] * 1e3, ".1f")],
    "disk_read_rows": [("provider", "provider", "s"), ("preset", "preset", "s"), ("rows", "T", "d"), ("ms", "ms", ".3f"),
                       ("GB/s", "gbps", ".2f"), ("x fault", "speedup_vs_fault", ".1f")],
    "offload_hit_rate": [("policy/hot set", "provider", "s"), ("cache", "preset", "s"), ("rows", "T", "d"),
                         ("hits %", _pct("hit_rate"), ".1f"), ("lookups", "lookups", "d"), ("ms", "ms", ".0f")],
    "decode_attention": _FIRST + [("batch", "batch", "d"), ("ms", "ms", ".4f"), ("GB/s", "gbps", ".1f"),
                                  ("% copy", "pct_copy_bw", ".0f"), ("x sdpa", "speedup_vs_sdpa", ".2f"),
                                  ("ms launch", "ms_launch", ".4f")],
    "decode_linear": [("projection", "provider", "s"), ("dtype", "dtype", "s"), ("preset", "preset", "s"),
                      ("N", "N", "d"), ("K", "K", "d"), ("ms", "ms", ".4f"), ("GB/s", "gbps", ".1f"),
                      ("% copy", "pct_copy_bw", ".0f"), ("per step", "per_step", "d"),
                      ("ms/step", "ms_per_step", ".3f"), ("ms launch", "ms_launch", ".4f")],
    "decode_profile": [("provider", "provider", "s"), ("mode", "mode", "s"), ("attention", "attention", "s"),
                       ("preset", "preset", "s"),
                       ("dtype", "dtype", "s"), ("ms/step", "wall_ms", ".3f"), ("host ms", "host_ms", ".3f"),
                       ("ops/step", "ops_per_step", ".0f"),
                       ("busy us", "busy_us", ".0f"), ("idle us", "idle_us", ".0f")]
    + [(f"{kind} {head}", _kind(kind, field), ".0f") for kind in ("matmul", "attention", "tol", "fused", "copy", "other")
       for head, field in (("n", "count"), ("us", "us"))]
    + [("matmul GB/s", "matmul_gbps", ".0f")],
    "e2e": _FIRST + [
        ("batch", "batch", "d"), ("attention", "attention", "s"), ("text", text_kind, "s"), ("ms", "ms", ".3f"),
        ("ms synced", "ms_synced", ".3f"),
        ("ms host", "ms_host", ".3f"),
        ("tokens/s", "tokens_per_s", ".1f"), ("x dense", "speedup_vs_dense", ".2f"),
        ("% bound", "pct_bound", ".0f"), ("weights GB", _gb("weight_bytes"), ".3f"), ("table GB", _gb("table_bytes"), ".3f"),
        ("peak GB", _gb("peak_memory_bytes"), ".2f"), ("hits %", _pct("hit_rate"), ".1f")],
}


def columns(op: str) -> list[tuple]:
    return COLUMNS["e2e"] if op.startswith("e2e") else COLUMNS.get(op, _FIRST + [("ms", "ms", ".4f")])


def _sort_key(r: dict) -> tuple:
    def key(v):  # numbers (and "5%" cache sizes) numerically, before names
        if isinstance(v, str) and v.endswith("%") and v[:-1].replace(".", "", 1).isdigit():
            v = float(v[:-1])
        return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
    return tuple(key(r.get(k)) for k in ("dtype", "preset", "T", "batch", "provider"))


def table(op: str, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of op's table, sorted, formatted ("-" where a value does not apply); malformed rows are
    left out (usable)."""
    cols = columns(op)
    rows = usable(rows, op)
    out = []
    for r in sorted(rows, key=_sort_key):
        if r["provider"] == "copy" and op == "tol_gather_add" and len(rows) > 1:
            continue  # the copy ceiling is stated in the report's header line
        cells = []
        for _, key, spec in cols:
            v = _get(key)(r)
            cells.append("-" if v is None else format(v, spec))
        out.append(cells)
    # Columns that apply to no row here (GPU-only ones on a CPU, say) are left out.
    keep = [i for i in range(len(cols)) if i < 4 or any(c[i] != "-" for c in out)]
    return [cols[i][0] for i in keep], [[c[i] for i in keep] for c in out]


def text_notes(rows: list[dict]) -> list[str]:
    """What the `text` column's words stand for, and a warning where rows ran on synthetic ids because the real
    text was missing (bench_offload.py falls back to zipf ids rather than skip): such rows are not real-text rows."""
    texts: dict[str, str] = {}
    for r in rows:
        kind = text_kind(r) if isinstance(r, dict) else None
        if kind is not None:
            texts.setdefault(kind, r["text"])
    notes = [f"text {kind}: {full}" for kind, full in sorted(texts.items())]
    n = sum(1 for r in rows if isinstance(r, dict) and text_kind(r) == "zipf")
    if n:
        notes.insert(0, f"WARNING: {n} row(s) ran on synthetic zipf ids, not real text (the text packages were "
                        "missing; bash bench/gpu_wheels.sh): do not read them as real-text results")
    return notes


def markdown_table(op: str, rows: list[dict]) -> str:
    head, cells = table(op, rows)
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    notes = text_notes(rows)
    warnings = [f"**{n}**" for n in notes if n.startswith("WARNING")]
    texts = [f"- {n}" for n in notes if not n.startswith("WARNING")]
    for block in (warnings, texts):  # each its own paragraph
        if block:
            lines += [""] + block
    return "\n".join(lines)


def text_table(op: str, rows: list[dict]) -> list[str]:
    """Aligned lines for a terminal (and the text notes, text_notes, under them)."""
    head, cells = table(op, rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(x.rjust(w) if i > 0 else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(c) for c in cells] + text_notes(rows)


def ceilings(rows: list[dict]) -> str:
    """A line naming the ceilings measured in the run (device copy, matmul), if any."""
    parts = [f"device copy {r['gbps_copy']:.0f} GB/s" for r in rows
             if isinstance(r, dict) and r.get("provider") == "copy" and _num(r, "gbps_copy") is not None]
    parts += [f"{r.get('dtype')} matmul {r['tflops_matmul']:.2f} TFLOP/s" for r in rows
              if isinstance(r, dict) and r.get("provider") == "matmul" and _num(r, "tflops_matmul") is not None]
    return ("Ceilings measured in this run: " + ", ".join(parts) + ".\n") if parts else ""


def _line_plot(series: dict, path: str, xlabel: str, ylabel: str, title: str, *, xlog2=True, ylog=False,
               hline=None) -> str:
    """One PNG: a line per series {label: [(x, y), ...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if xlog2:
        ax.set_xscale("log", base=2)
    if ylog:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(op: str, rows: list[dict], out_dir: str, label: str) -> list[str]:
    """tol_gather_add: speed-up over the dense FFN and % of the torch.add ceiling vs T, per compiled
    provider and preset (bfloat16). offload_hit_rate: hit rate vs cache size per policy."""
    written = []
    if op == "tol_gather_add":
        # bfloat16 only (the models' dtype; the other dtypes are in the table): 6 lines per plot on a CPU.
        kernels = [r for r in rows if r["provider"] in KERNEL_PROVIDERS and r.get("dtype") == "bfloat16"
                   and _num(r, "T") is not None]
        for metric, ylabel, name, log in (
                ("speedup_vs_ffn", "speed-up over the dense SwiGLU FFN layer", "speedup", True),
                ("pct_ceiling", "% of same-bytes torch.add (bandwidth ceiling)", "bandwidth", False)):
            series: dict[str, list] = {}
            for r in kernels:
                if _num(r, metric) is not None:
                    series.setdefault(f"{r['provider']} {r.get('preset')} {r['dtype']}", []).append((r["T"], r[metric]))
            if series:
                written.append(_line_plot(series, os.path.join(out_dir, f"{op}_{name}.png"), "tokens per call (T)",
                                          ylabel, f"{op}, bfloat16\n{label}", ylog=log, hline=None if log else 100))
    elif op == "offload_hit_rate":
        series = {}
        for r in rows:
            preset = r.get("preset")
            if _num(r, "hit_rate") is None or not (isinstance(preset, str) and preset.endswith("%")):
                continue
            try:
                series.setdefault(r["provider"], []).append((float(preset[:-1]), 100 * r["hit_rate"]))
            except ValueError:
                continue
        if series:
            written.append(_line_plot(series, os.path.join(out_dir, f"{op}.png"), "device cache, % of the vocabulary",
                                      "hits %", f"{op} on {rows[0].get('text')}\n{label}", xlog2=False, hline=90))
    return written


def load_folder(out_dir: str) -> list[tuple[str, dict]]:
    """(op, results) of each <op>.json in out_dir, sorted; a file that is not a results file, or has a malformed
    row, is named on stderr in one line and left out (another tool's JSON beside the results, a file cut short).
    ValueError if none is left (not a results folder: bench/results/model, say)."""
    found = []
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".json") or name.startswith("pytest-benchmark"):
            continue
        try:
            found.append((name[:-5], load(os.path.join(out_dir, name))))
        except (OSError, ValueError) as e:
            # The benchmark session that calls write_report at its end, and the other ops' tables, must not die on it.
            print(f"report: skipped {e}", file=sys.stderr)
    if not found:
        raise ValueError(f"no benchmark results (<op>.json with 'machine' and 'results') in {out_dir}")
    return found


def folder_targets(found: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    """targets() of a whole results folder (one machine): every target of its device, over the rows of all its files,
    so that an op with no file at all (a step skipped or cut before its first row) is not measured either."""
    machine = next((d["machine"] for _, d in found), {})
    return targets({"machine": machine, "results": [r for _, d in found for r in d["results"]]}, every=True)


STATUS_TITLES = (("missed", "Missed"),
                 ("not measured", "Not measured (no rows, or rows without what the target is computed from: the "
                                  "benchmark was skipped, deselected or cut by its step's time limit)"),
                 ("met", "Met"))


def _counts(checked: list[tuple[str, str]]) -> str:
    """'2 missed, 0 not measured, 5 met'."""
    return ", ".join(f"{sum(1 for s, _ in checked if s == status)} {status}" for status, _ in STATUS_TITLES)


def targets_markdown(checked: list[tuple[str, str]], device) -> str:
    parts = [f"## Targets\n\nEvery target checked on {device or 'this device'} results: {_counts(checked)}.\n"]
    for status, title in STATUS_TITLES:
        items = [t for s, t in checked if s == status]
        if items:
            parts.append(f"{title}:\n\n" + "\n".join(f"- {t}" for t in items) + "\n")
    return "\n".join(parts)


def write_report(out_dir: str) -> str:
    """report.md (and PNGs) for every <op>.json in out_dir; returns the report's path."""
    found = load_folder(out_dir)
    parts, pngs = [], []
    for op, data in found:
        label = machine_label(data["machine"])
        try:
            pngs += _plots(op, data["results"], out_dir, label)
        except ImportError as e:
            print(f"no plots ({e}); pip install matplotlib", file=sys.stderr)
        parts.append(f"## {op}\n\nMachine: {label}\n\n{ceilings(data['results'])}\n"
                     f"{markdown_table(op, data['results'])}\n")
    body = "# Benchmark report\n\n" + targets_markdown(folder_targets(found), found[0][1]["machine"].get("device"))
    body += "\n" + "\n".join(parts)
    body += "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in pngs)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(body)
    return path


def targets(data: dict, every: bool = False) -> list[tuple[str, str]]:
    """Each target checked on these results, as (status, text), status "met", "missed" or "not measured"; at the 1b
    shape, bf16 where a dtype applies; targets that only apply on a GPU only on GPU results. A miss says by how much
    and, where the memory-bandwidth bound of this machine caps it, what the bound allows. A target whose rows are
    absent (the benchmark skipped, deselected, or cut by its step's time limit), or lack the value it is computed from,
    is "not measured": it used to look met. every=False: the targets of the ops these rows have (one op's results);
    True: every target of the device (a whole results folder: an op without any row is not measured)."""
    rows = [r for r in data.get("results", []) if row_problem(r) is None]
    device = (data.get("machine") or {}).get("device")
    present = {r["op"] for r in rows}
    out: list[tuple[str, str]] = []

    def want(op):
        return every or op in present

    def check(value, ok, text, absent):
        """One target: `absent` (not measured) when value is None, else met if ok(value), text(value) either way."""
        if value is None:
            out.append(("not measured", absent))
        else:
            out.append(("met" if ok(value) else "missed", text(value)))

    if want("tol_gather_add"):
        tol = {(r["provider"], r.get("T")): r for r in rows
               if r["op"] == "tol_gather_add" and r.get("preset") == "1b" and r.get("dtype") == "bfloat16"}

        def ms(provider, T):
            return _num(tol.get((provider, T)), "ms")

        def eager_ms(T):
            return min((m for m in (ms("eager", T), ms("eager_select", T)) if m is not None), default=None)

        if device == "cpu":
            # Against eager, the functional op (both allocate their output); x eager at the add ceiling = what an op
            # moving its 3 x T x d bytes at torch.add's bandwidth would reach.
            add, eager = ms("add", 4096), eager_ms(4096)
            at = f"; at the torch.add ceiling it would be {eager / add:.2f}x" if add and eager else ""
            check(_num(tol.get(("cpu", 4096)), "speedup_vs_eager"), lambda x: x >= 2.0,
                  lambda x: f"cpu T=4096: {x:.2f}x eager (target 2x{at if x < 2.0 else ''})",
                  "cpu T=4096: x eager (target 2x)")
            check(_num(tol.get(("cpu", 4096)), "pct_ceiling"), lambda x: x >= 70,
                  lambda x: f"cpu T=4096: {x:.0f}% of torch.add (target 70%)", "cpu T=4096: % of torch.add (target 70%)")
            # Against the dense FFN layer, the ToL layer the model runs at inference: the in-place op.
            for T, goal in ((1, 500), (512, 100)):
                add, ffn = ms("add", T), ms("ffn", T)
                at = f"; at the torch.add ceiling it would be {ffn / add:.0f}x" if add and ffn else ""
                check(_num(tol.get(("cpu_", T)), "speedup_vs_ffn"), lambda x, goal=goal: x >= goal,
                      lambda x, T=T, goal=goal, at=at: f"cpu_ T={T}: {x:.0f}x the dense FFN (target {goal}x"
                                                       f"{at if x < goal else ''})",
                      f"cpu_ T={T}: x the dense FFN (target {goal}x)")
        if device == "cuda":
            check(_num(tol.get(("cuda", 16384)), "pct_copy_bw"), lambda x: x >= 90,
                  lambda x: f"cuda T=16384: {x:.0f}% of device-copy bandwidth (target 90%)",
                  "cuda T=16384: % of device-copy bandwidth (target 90%)")
            measured = sorted(T for (p, T), r in tol.items() if p == "cuda" and _num(r, "speedup_vs_eager") is not None
                              and _is_num(T))
            for T in measured:
                x = tol[("cuda", T)]["speedup_vs_eager"]
                out.append(("met" if x >= 2.0 else "missed", f"cuda T={T}: {x:.2f}x eager (target 2x)"))
            if not measured:
                out.append(("not measured", "cuda: x eager (target 2x)"))
    if want("offload_gather") and device == "cuda":
        for prov in ("cuda", "triton"):
            measured = sorted((r for r in rows if r["op"] == "offload_gather" and r["provider"] == prov
                               and _num(r, "pct_memcpy") is not None), key=_sort_key)
            for r in measured:
                pct = r["pct_memcpy"]
                out.append(("met" if pct >= 85 else "missed",
                            f"{prov} host-row gather, {r.get('T')} rows: {pct:.0f}% of pinned memcpy (target 85%)"))
            if not measured:
                out.append(("not measured", f"{prov} host-row gather: % of pinned memcpy (target 85%)"))
    if want("offload_hit_rate"):
        hits = {(r["provider"], r.get("preset")): _num(r, "hit_rate") for r in rows if r["op"] == "offload_hit_rate"}
        rate = hits.get(("hot+lru/shk", "5%"))
        check(rate, lambda x: x >= 0.90,
              lambda x: f"hot+lru/shk at 5% of the vocabulary: {100 * x:.1f}% hits (target 90%)",
              "hot+lru/shk at 5% of the vocabulary: hits (target 90%; needs the real text)")
        for base in ("lru", "static/kjv"):
            b = hits.get((base, "5%"))
            check(None if rate is None or b is None else (rate, b), lambda x: x[0] > x[1],
                  lambda x, base=base: f"hot+lru/shk at 5% ({100 * x[0]:.1f}%) "
                                       f"{'beats' if x[0] > x[1] else 'does not beat'} {base} ({100 * x[1]:.1f}%)",
                  f"hot+lru/shk at 5% beats {base} (needs the real text{' and the KJV' if 'kjv' in base else ''})")
    if device == "cuda":
        decode_ops = {op for op in present if op.startswith("e2e") and "decode" in op}
        if every:
            decode_ops.add("e2e_offload_decode_compiled")  # the decode targets' own benchmark (real text, compiled)
        for op in sorted(decode_ops):
            by = {r["provider"]: r for r in rows if r["op"] == op and r.get("preset") == "1b" and r.get("batch") == 1}
            vram = _num(by.get("memoryllm"), "ms")
            # the host tier's two providers are expected in every decode benchmark; the other memoryllm-* are
            # checked where they ran
            for prov in sorted(set(by) | {"memoryllm-host", "memoryllm-host-devlru"}):
                if not prov.startswith("memoryllm-"):
                    continue
                r = by.get(prov)
                if r is None:
                    out.append(("not measured", f"{op} {prov}: no row (targets: 2x the dense model's tokens/s, within 3% "
                                                f"of all-in-VRAM, peak VRAM 2.5 GB)"))
                    continue
                if prov.startswith("memoryllm-host"):
                    check(_num(r, "speedup_vs_dense"), lambda x: x >= 2.0,
                          lambda x: f"{op} {prov}: {x:.2f}x the dense model's tokens/s (target 2x)",
                          f"{op} {prov}: x the dense model's tokens/s (target 2x)")
                m = _num(r, "ms")
                check(None if m is None or vram is None else 100 * (m / vram - 1), lambda x: x <= 3.0,
                      lambda x: f"{op} {prov}: {x:.1f}% slower than all-in-VRAM (target 3%)",
                      f"{op} {prov}: % slower than all-in-VRAM (target 3%)")
                check(_num(r, "peak_memory_bytes"), lambda x: x <= 2.5e9,
                      lambda x: f"{op} {prov}: peak VRAM {x / 1e9:.2f} GB (target 2.5 GB)",
                      f"{op} {prov}: peak VRAM (target 2.5 GB)")
    return out


def targets_missed(data: dict) -> list[str]:
    """The targets missed on these results (targets): each says by how much and, where the memory-bandwidth bound
    of this machine caps it, what the bound allows."""
    return [text for status, text in targets(data) if status == "missed"]


def targets_not_measured(data: dict) -> list[str]:
    """The targets of these results' ops whose rows are absent (targets): neither met nor missed."""
    return [text for status, text in targets(data) if status == "not measured"]


def compare(old_path: str, new_path: str) -> list[tuple]:
    """Rows (key, old ms, new ms, new/old, differing settings) for benchmarks present in both files; the last is
    param_differences of the pair (empty where the two rows recorded the same settings)."""
    return compare_all(old_path, new_path)[0]


def _positive(v) -> bool:
    return _is_num(v) and v > 0 and v != float("inf")


def compare_all(old_path: str, new_path: str) -> tuple[list[tuple], dict[str, list[tuple]]]:
    """(compare's rows, the benchmarks left out of them by kind): "only in old" and "only in new" (a benchmark one
    run skipped, deselected or did not have), "with no time" (a pair where a time is zero, negative or not finite: no
    ratio). Each left out key once, in its file's order. These were dropped without a word: a comparison of a
    whole run against a -k run looked complete."""
    old, new = load(old_path), load(new_path)
    old_by = {_key(r): r for r in old["results"]}
    new_keys = {_key(r) for r in new["results"]}
    rows, no_time = [], []
    for r in new["results"]:
        o = old_by.get(_key(r))
        if o is None:
            continue
        if _positive(_ms(o)) and _positive(_ms(r)):
            rows.append((_key(r), _ms(o), _ms(r), _ms(r) / _ms(o), param_differences(o, r)))
        else:
            no_time.append(_key(r))
    left = {"only in old": [k for k in old_by if k not in new_keys],
            "only in new": [k for k in dict.fromkeys(_key(r) for r in new["results"]) if k not in old_by],
            "with no time": no_time}
    return rows, left


def _key_text(key: tuple) -> str:
    """A compare key in one line: 'tol_gather_add cpu_ bfloat16 1b T=512' (its variant fields after the provider)."""
    parts = [str(key[0]), " ".join(str(k) for k in (key[1],) + key[len(KEY_FIELDS):])]
    parts += [f"{name}={v}" if name in ("T", "batch") else str(v)
              for name, v in zip(KEY_FIELDS[2:], key[2:len(KEY_FIELDS)]) if v is not None]
    return " ".join(parts)


def _machine_differences(old: dict, new: dict) -> list[str]:
    """'field old->new' for what tells two machines apart (device, GPU, CPU, threads)."""
    return [f"{k} {old.get(k)}->{new.get(k)}" for k in ("device", "gpu", "cpu", "cpu_threads")
            if old.get(k) != new.get(k)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="write report.md and PNG plots for a results folder")
    r.add_argument("folder", help="a bench/results/<machine> folder holding <op>.json files")
    t = sub.add_parser("targets", help="print each target of a results folder: met, missed or not measured")
    t.add_argument("folder", help="a bench/results/<machine> folder holding <op>.json files")
    c = sub.add_parser("compare", help="time ratio new/old per benchmark present in both files, with the settings "
                                       "that differ between the two rows of a pair")
    c.add_argument("old", help="a results file, bench/results/<machine>/<op>.json (previous/<op>.json: the run before)")
    c.add_argument("new", help="a results file of the same op")
    args = p.parse_args(argv)
    if args.cmd in ("report", "targets"):
        if not os.path.isdir(args.folder):
            p.error(f"{args.folder} is not a folder")
        try:
            if args.cmd == "report":
                print(write_report(args.folder))
                return 0
            found = load_folder(args.folder)
        except ValueError as e:
            print(f"report.py {args.cmd}: error: {e}", file=sys.stderr)
            return 2
        checked = folder_targets(found)
        print(f"targets in {args.folder}: {_counts(checked)}")
        for status, _ in STATUS_TITLES:
            for _, text in (x for x in checked if x[0] == status):
                print(f"TARGET {status.upper()}: {text}")
        return 0
    try:  # a missing, unreadable or foreign file: one line naming it, not a traceback
        old, new = load(args.old), load(args.new)
        rows, left = compare_all(args.old, args.new)
    except (OSError, ValueError) as e:
        print(f"report.py compare: error: {e}", file=sys.stderr)
        return 2
    print(f"old: {machine_label(old['machine'])}\nnew: {machine_label(new['machine'])}")
    machines = _machine_differences(old["machine"], new["machine"])
    if machines:  # the old: and new: lines say it too; a ratio then compares machines, not only code
        print(f"warning: the two files come from different machines ({', '.join(machines)}): each ratio is the "
              "machines' as much as the code's" + ("; a CPU and a GPU run their benchmarks at other sizes"
                                                     if old["machine"].get("device") != new["machine"].get("device")
                                                     else ""), file=sys.stderr)
    for what, keys in left.items():  # benchmarks without a ratio: named, not dropped without a word
        if keys:
            shown = "; ".join(_key_text(k) for k in keys[:10]) + (f"; and {len(keys) - 10} more" if len(keys) > 10
                                                                    else "")
            print(f"{len(keys)} benchmark(s) {what}" + (" (zero, negative or not finite: no ratio)"
                                                         if what == "with no time" else "") + f": {shown}",
                  file=sys.stderr)
    if not rows:
        print("no benchmark in common", file=sys.stderr)
        return 1
    # The provider column names a row's variant too: decode_profile's "dense eager sdpa", an engine step's "mapped 0.9".
    # Each column as wide as its widest cell: e2e_offload_decode_compiled ran into the provider at a fixed 20.
    cell = lambda v: "-" if v is None else str(v)  # noqa: E731
    lines = [("op", "provider", "dtype", "preset", "T", "batch", "old ms", "new ms", "new/old")]
    for key, o, n, ratio, _ in rows:
        prov = " ".join(cell(k) for k in (key[1],) + key[len(KEY_FIELDS):])
        lines.append((cell(key[0]), prov, *(cell(k) for k in key[2:len(KEY_FIELDS)]), f"{o:.4f}", f"{n:.4f}",
                      f"{ratio:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    left = 4  # op, provider, dtype, preset: left-aligned; the numbers right-aligned
    for line, row in zip(lines, [None] + rows):
        text = "  ".join(x.ljust(w) if i < left else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
        if row is not None and row[4]:
            text += "  settings differ: " + ", ".join(row[4])
        print(text.rstrip())
    differ = sum(1 for row in rows if row[4])
    if differ:
        print(f"warning: {differ} of {len(rows)} pairs ran with different settings (named after their ratio): "
              "their times are not comparable", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
