"""Reports and comparisons from benchmark JSON (bench/results/<machine>/<op>.json).

    python bench/report.py report bench/results/nvidia-h200      # report.md + PNG plots in that folder
    python bench/report.py compare OLD.json NEW.json             # time ratio per benchmark

The benchmark session (bench/conftest.py) writes the JSON and calls `write_report` itself.
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
    return data


# Parameters beside KEY_FIELDS that tell an op's rows apart: without them compare paired the hit fraction 0.9
# engine step of one file with the 1.0 one of the other, and decode_profile's eager step with its compiled one.
VARIANT_FIELDS = {"decode_profile": ("mode", "attention"), "offload_engine_step": ("hit_fraction",)}


def _key(r: dict) -> tuple:
    return tuple(r.get(k) for k in KEY_FIELDS + VARIANT_FIELDS.get(r.get("op"), ()))


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
    return lambda r: r["by_kind"].get(kind, {}).get(field)


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
                                  ("x sdpa", "speedup_vs_sdpa", ".2f"), ("ms launch", "ms_launch", ".4f")],
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
        ("batch", "batch", "d"), ("attention", "attention", "s"), ("ms", "ms", ".3f"), ("ms synced", "ms_synced", ".3f"),
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
    """(headers, cells) of op's table, sorted, formatted ("-" where a value does not apply)."""
    cols = columns(op)
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


def markdown_table(op: str, rows: list[dict]) -> str:
    head, cells = table(op, rows)
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def text_table(op: str, rows: list[dict]) -> list[str]:
    """Aligned lines for a terminal."""
    head, cells = table(op, rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(x.rjust(w) if i > 0 else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(c) for c in cells]


def ceilings(rows: list[dict]) -> str:
    """A line naming the ceilings measured in the run (device copy, matmul), if any."""
    parts = [f"device copy {r['gbps_copy']:.0f} GB/s" for r in rows if r.get("provider") == "copy"]
    parts += [f"{r['dtype']} matmul {r['tflops_matmul']:.2f} TFLOP/s" for r in rows if r.get("provider") == "matmul"]
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
        kernels = [r for r in rows if r["provider"] in KERNEL_PROVIDERS and r.get("dtype") == "bfloat16"]
        for metric, ylabel, name, log in (
                ("speedup_vs_ffn", "speed-up over the dense SwiGLU FFN layer", "speedup", True),
                ("pct_ceiling", "% of same-bytes torch.add (bandwidth ceiling)", "bandwidth", False)):
            series: dict[str, list] = {}
            for r in kernels:
                if r.get(metric) is not None:
                    series.setdefault(f"{r['provider']} {r['preset']} {r['dtype']}", []).append((r["T"], r[metric]))
            if series:
                written.append(_line_plot(series, os.path.join(out_dir, f"{op}_{name}.png"), "tokens per call (T)",
                                          ylabel, f"{op}, bfloat16\n{label}", ylog=log, hline=None if log else 100))
    elif op == "offload_hit_rate":
        series = {}
        for r in rows:
            series.setdefault(r["provider"], []).append((float(r["preset"].rstrip("%")), 100 * r["hit_rate"]))
        if series:
            written.append(_line_plot(series, os.path.join(out_dir, f"{op}.png"), "device cache, % of the vocabulary",
                                      "hits %", f"{op} on {rows[0].get('text')}\n{label}", xlog2=False, hline=90))
    return written


def write_report(out_dir: str) -> str:
    """report.md (and PNGs) for every <op>.json in out_dir; returns the report's path."""
    parts, pngs = [], []
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".json") or name.startswith("pytest-benchmark"):
            continue
        try:
            data = load(os.path.join(out_dir, name))
        except (OSError, ValueError) as e:
            # Another tool's JSON (or a file cut short) beside the results: the benchmark session that calls this
            # at its end, and the other ops' tables, must not die on it.
            print(f"report: skipped {e}", file=sys.stderr)
            continue
        op = name[:-5]
        label = machine_label(data["machine"])
        try:
            pngs += _plots(op, data["results"], out_dir, label)
        except ImportError as e:
            print(f"no plots ({e}); pip install matplotlib", file=sys.stderr)
        parts.append(f"## {op}\n\nMachine: {label}\n\n{ceilings(data['results'])}\n"
                     f"{markdown_table(op, data['results'])}\n")
        missed = targets_missed(data)
        if missed:
            parts.append("Targets missed:\n\n" + "\n".join(f"- {m}" for m in missed) + "\n")
    if not parts:  # not a results folder (bench/results/model, say): say so rather than write an empty report
        raise ValueError(f"no benchmark results (<op>.json with 'machine' and 'results') in {out_dir}")
    body = "# Benchmark report\n\n" + "\n".join(parts)
    body += "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in pngs)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(body)
    return path


def targets_missed(data: dict) -> list[str]:
    """The targets checked on these results (at the 1b shape, bf16 where a dtype applies); each miss says by
    how much and, where the memory-bandwidth bound of this machine caps it, what the bound allows. Targets
    that only apply on a GPU are checked only on GPU results."""
    rows, device = data["results"], data["machine"].get("device")
    out = []
    by = {(r["op"], r["provider"], r.get("dtype"), r.get("preset"), r.get("T"), r.get("batch")): r for r in rows}
    for r in rows:
        op, prov, T = r["op"], r["provider"], r.get("T")
        if op == "tol_gather_add" and r.get("preset") == "1b" and r.get("dtype") == "bfloat16":
            same = lambda p: by.get((op, p, r.get("dtype"), "1b", T, r.get("batch")))  # noqa: E731
            add, eager = same("add"), min((e for e in (same("eager"), same("eager_select")) if e is not None),
                                          key=lambda e: e["ms"], default=None)
            # Against eager, the functional op (both allocate their output); x eager at the add ceiling = what
            # an op moving its 3 x T x d bytes at torch.add's bandwidth would reach.
            if device == "cpu" and prov == "cpu" and T == 4096:
                if r.get("speedup_vs_eager") is not None and r["speedup_vs_eager"] < 2.0:
                    at_ceiling = f"; at the torch.add ceiling it would be {eager['ms'] / add['ms']:.2f}x" \
                        if add and eager else ""
                    out.append(f"cpu T=4096: {r['speedup_vs_eager']:.2f}x eager (target 2x{at_ceiling})")
                if r.get("pct_ceiling") is not None and r["pct_ceiling"] < 70:
                    out.append(f"cpu T=4096: {r['pct_ceiling']:.0f}% of torch.add (target 70%)")
            # Against the dense FFN layer, the ToL layer the model runs at inference: the in-place op.
            if device == "cpu" and prov == "cpu_" and T in (1, 512) and r.get("speedup_vs_ffn") is not None:
                goal = 500 if T == 1 else 100
                ffn = same("ffn")
                if r["speedup_vs_ffn"] < goal:
                    at_ceiling = f"; at the torch.add ceiling it would be {ffn['ms'] / add['ms']:.0f}x" \
                        if add and ffn else ""
                    out.append(f"cpu_ T={T}: {r['speedup_vs_ffn']:.0f}x the dense FFN (target {goal}x{at_ceiling})")
            if device == "cuda" and prov == "cuda" and T == 16384:
                if r.get("pct_copy_bw") is not None and r["pct_copy_bw"] < 90:
                    out.append(f"cuda T=16384: {r['pct_copy_bw']:.0f}% of device-copy bandwidth (target 90%)")
            if device == "cuda" and prov == "cuda" and r.get("speedup_vs_eager") is not None:
                if r["speedup_vs_eager"] < 2.0:
                    out.append(f"cuda T={T}: {r['speedup_vs_eager']:.2f}x eager (target 2x)")
        if op == "offload_gather" and device == "cuda" and prov in ("cuda", "triton") and r.get("pct_memcpy") is not None:
            if r["pct_memcpy"] < 85:
                out.append(f"{prov} host-row gather, {T} rows: {r['pct_memcpy']:.0f}% of pinned memcpy (target 85%)")
        if op == "offload_hit_rate" and prov == "hot+lru/shk" and r.get("preset") == "5%":
            if r["hit_rate"] < 0.90:
                out.append(f"hot+lru/shk at 5% of the vocabulary: {100 * r['hit_rate']:.1f}% hits (target 90%)")
            for base in ("lru", "static/kjv"):
                b = by.get((op, base, r.get("dtype"), "5%", T, r.get("batch")))
                if b is not None and b["hit_rate"] >= r["hit_rate"]:
                    out.append(f"hot+lru/shk at 5% ({100 * r['hit_rate']:.1f}%) does not beat {base} "
                               f"({100 * b['hit_rate']:.1f}%)")
        if op.startswith("e2e") and "decode" in op and device == "cuda" and r.get("preset") == "1b" \
                and r.get("batch") == 1 and prov.startswith("memoryllm"):
            if prov.startswith("memoryllm-host") and r.get("speedup_vs_dense") is not None \
                    and r["speedup_vs_dense"] < 2.0:
                out.append(f"{op} {prov}: {r['speedup_vs_dense']:.2f}x the dense model's tokens/s (target 2x)")
            vram = by.get((op, "memoryllm", r.get("dtype"), "1b", T, 1))
            if prov != "memoryllm" and vram is not None and r["ms"] > 1.03 * vram["ms"]:
                out.append(f"{op} {prov}: {100 * (r['ms'] / vram['ms'] - 1):.1f}% slower than all-in-VRAM (target 3%)")
            if prov != "memoryllm" and r.get("peak_memory_bytes", 0) > 2.5e9:
                out.append(f"{op} {prov}: peak VRAM {r['peak_memory_bytes'] / 1e9:.2f} GB (target 2.5 GB)")
    return out


def compare(old_path: str, new_path: str) -> list[tuple]:
    """Rows (key, old ms, new ms, new/old) for benchmarks present in both files."""
    old, new = load(old_path), load(new_path)
    old_by = {_key(r): r for r in old["results"]}
    rows = []
    for r in new["results"]:
        o = old_by.get(_key(r))
        if o is not None and _ms(o) and _ms(r):
            rows.append((_key(r), _ms(o), _ms(r), _ms(r) / _ms(o)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="write report.md and PNG plots for a results folder")
    r.add_argument("folder", help="a bench/results/<machine> folder holding <op>.json files")
    c = sub.add_parser("compare", help="time ratio new/old per benchmark present in both files")
    c.add_argument("old", help="a results file, bench/results/<machine>/<op>.json (previous/<op>.json: the run before)")
    c.add_argument("new", help="a results file of the same op")
    args = p.parse_args(argv)
    if args.cmd == "report":
        if not os.path.isdir(args.folder):
            p.error(f"{args.folder} is not a folder")
        try:
            print(write_report(args.folder))
        except ValueError as e:
            print(f"report.py report: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:  # a missing, unreadable or foreign file: one line naming it, not a traceback
        old, new = load(args.old), load(args.new)
        rows = compare(args.old, args.new)
    except (OSError, ValueError) as e:
        print(f"report.py compare: error: {e}", file=sys.stderr)
        return 2
    print(f"old: {machine_label(old['machine'])}\nnew: {machine_label(new['machine'])}")
    if not rows:
        print("no benchmark in common", file=sys.stderr)
        return 1
    # The provider column names a row's variant too: decode_profile's "dense eager sdpa", an engine step's "mapped 0.9".
    provs = [" ".join(str(k if k is not None else "-") for k in (key[1],) + key[len(KEY_FIELDS):]) for key, *_ in rows]
    w = max(16, *(len(x) + 1 for x in provs))
    print(f"{'op':<20}{'provider':<{w}}{'dtype':<10}{'preset':<7}{'T':>6}{'batch':>6}{'old ms':>11}{'new ms':>11}"
          f"{'new/old':>9}")
    for (key, o, n, ratio), prov in zip(rows, provs):
        op, _, dtype, preset, T, batch = (str(k if k is not None else "-") for k in key[:len(KEY_FIELDS)])
        print(f"{op:<20}{prov:<{w}}{dtype:<10}{preset:<7}{T:>6}{batch:>6}{o:>11.4f}{n:>11.4f}{ratio:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
