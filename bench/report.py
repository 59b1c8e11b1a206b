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

KEY_FIELDS = ("op", "provider", "dtype", "preset", "T")
# Providers drawn in the plots: the compiled backends (in place and functional) and the torch baselines.
KERNEL_PROVIDERS = ("cpu", "cpu_", "cuda", "cuda_", "triton", "triton_")


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "machine" not in data or "results" not in data:
        raise ValueError(f"{path} is not a memllm benchmark result (no 'machine'/'results')")
    return data


def _key(r: dict) -> tuple:
    return tuple(r.get(k) for k in KEY_FIELDS)


def machine_label(m: dict) -> str:
    hw = m.get("gpu") or f"{m.get('cpu')} ({m.get('cpu_threads')} threads)"
    return f"{hw}, torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('commit')}"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: list[dict]) -> str:
    head = "| provider | dtype | preset | T | ms | GB/s | % add ceiling | % copy BW | x eager | x dense FFN |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in sorted(rows, key=lambda r: (r["dtype"], r["preset"], r["T"], r["provider"])):
        if r["provider"] == "copy":
            continue
        lines.append(f"| {r['provider']} | {r['dtype']} | {r['preset']} | {r['T']} | {r['ms']:.4f} | "
                     f"{_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('pct_ceiling'), '.0f')} | "
                     f"{_fmt(r.get('pct_copy_bw'), '.0f')} | {_fmt(r.get('speedup_vs_eager'), '.2f')} | "
                     f"{_fmt(r.get('speedup_vs_ffn'), '.1f')} |")
    return "\n".join(lines)


def _plots(op: str, rows: list[dict], out_dir: str, label: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kernels = [r for r in rows if r["provider"] in KERNEL_PROVIDERS]
    if not kernels:
        return written
    for metric, ylabel, name, log in (("speedup_vs_ffn", "speed-up over the dense SwiGLU FFN layer", "speedup", True),
                                      ("pct_ceiling", "% of same-bytes torch.add (bandwidth ceiling)", "bandwidth", False)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[tuple, list] = {}
        for r in kernels:
            if r.get(metric) is not None:
                series.setdefault((r["provider"], r["preset"], r["dtype"]), []).append((r["T"], r[metric]))
        for (prov, preset, dtype), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{prov} {preset} {dtype}")
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        else:
            ax.axhline(100, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("tokens per call (T)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{op}: {label}", fontsize=8)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out_dir: str) -> str:
    """report.md (and PNGs) for every <op>.json in out_dir; returns the report's path."""
    parts, pngs = [], []
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".json") or name.startswith("pytest-benchmark"):
            continue
        data = load(os.path.join(out_dir, name))
        op = name[:-5]
        label = machine_label(data["machine"])
        try:
            pngs += _plots(op, data["results"], out_dir, label)
        except ImportError as e:
            print(f"no plots ({e}); pip install matplotlib", file=sys.stderr)
        parts.append(f"## {op}\n\nMachine: {label}\n\n{markdown_table(data['results'])}\n")
        missed = targets_missed(data)
        if missed:
            parts.append("Targets missed:\n\n" + "\n".join(f"- {m}" for m in missed) + "\n")
    body = "# Benchmark report\n\n" + "\n".join(parts)
    body += "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in pngs)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(body)
    return path


def targets_missed(data: dict) -> list[str]:
    """The gather-add targets (issue text) checked on these results; each miss says by how much."""
    rows, device = data["results"], data["machine"]["device"]
    out = []
    for r in rows:
        if r.get("preset") != "1b" or r.get("dtype") != "bfloat16":
            continue
        if device == "cpu" and r["provider"] == "cpu" and r["T"] == 4096:
            if r.get("speedup_vs_eager") is not None and r["speedup_vs_eager"] < 2.0:
                out.append(f"cpu T=4096: {r['speedup_vs_eager']:.2f}x eager (target 2x)")
            if r.get("pct_ceiling") is not None and r["pct_ceiling"] < 70:
                out.append(f"cpu T=4096: {r['pct_ceiling']:.0f}% of torch.add (target 70%)")
        if device == "cpu" and r["provider"] == "cpu" and r["T"] in (1, 512) and r.get("speedup_vs_ffn") is not None:
            goal = 500 if r["T"] == 1 else 100
            if r["speedup_vs_ffn"] < goal:
                out.append(f"cpu T={r['T']}: {r['speedup_vs_ffn']:.0f}x the dense FFN (target {goal}x)")
        if device == "cuda" and r["provider"] == "cuda" and r["T"] == 16384:
            if r.get("pct_copy_bw") is not None and r["pct_copy_bw"] < 90:
                out.append(f"cuda T=16384: {r['pct_copy_bw']:.0f}% of device-copy bandwidth (target 90%)")
        if device == "cuda" and r["provider"] == "cuda" and r.get("speedup_vs_eager") is not None:
            if r["speedup_vs_eager"] < 2.0:
                out.append(f"cuda T={r['T']}: {r['speedup_vs_eager']:.2f}x eager (target 2x)")
    return out


def compare(old_path: str, new_path: str) -> list[tuple]:
    """Rows (key, old ms, new ms, new/old) for benchmarks present in both files."""
    old, new = load(old_path), load(new_path)
    old_by = {_key(r): r for r in old["results"]}
    rows = []
    for r in new["results"]:
        o = old_by.get(_key(r))
        if o is not None and o.get("ms") and r.get("ms"):
            rows.append((_key(r), o["ms"], r["ms"], r["ms"] / o["ms"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="write report.md and PNG plots for a results folder")
    r.add_argument("folder", help="a bench/results/<machine> folder holding <op>.json files")
    c = sub.add_parser("compare", help="time ratio new/old per benchmark present in both files")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args(argv)
    if args.cmd == "report":
        if not os.path.isdir(args.folder):
            p.error(f"{args.folder} is not a folder")
        print(write_report(args.folder))
        return 0
    old, new = load(args.old), load(args.new)
    print(f"old: {machine_label(old['machine'])}\nnew: {machine_label(new['machine'])}")
    rows = compare(args.old, args.new)
    if not rows:
        print("no benchmark in common")
        return 1
    print(f"{'op':<16}{'provider':<14}{'dtype':<10}{'preset':<7}{'T':>6}{'old ms':>11}{'new ms':>11}{'new/old':>9}")
    for key, o, n, ratio in rows:
        op, prov, dtype, preset, T = key
        print(f"{op:<16}{prov:<14}{dtype:<10}{preset:<7}{T:>6}{o:>11.4f}{n:>11.4f}{ratio:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
