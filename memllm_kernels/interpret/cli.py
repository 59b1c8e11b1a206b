"""The `memllm inspect` subcommand: `add_parser(subparsers)` adds it to the `memllm` parser and `main(args)` runs
it (returns an exit code; user errors print one line and return 2, like the other subcommands).

    memllm inspect RUN [--layer L] [--out DIR] [--dense RUN]     # report.md + PNGs + report.json
    memllm inspect RUN --token "king" [--out DIR]                # one token across layers, printed (+ DIR/token.md)

Files of an earlier report (or token.md) in the folder are not overwritten without --force.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..cli import _POS_FLOAT, _POS_INT, _THREADS, _device, _number  # memllm's own parser types
from ._common import refuse_overwrite
from .clusters import MAX_SEED, MIN_TSNE_SAMPLE
from .report import SECTIONS

_SEED = _number(int, 0, high=MAX_SEED)  # scikit-learn's range: -1 or 2**33 failed only in the clusters section

DESCRIPTION = """\
Read a MemoryLLM / Flex run's FFN memory as token-key-value memory (paper sections 2.3.1 and 3): coefficient
decomposition checked against the FFN, access maps (top keys per token, inverted index, dead keys),
K-means + t-SNE clusters of coefficient vectors with a clustering coefficient and outlier keys per layer,
a logit lens on every ToL row, perplexity sweeps (one layer's memory dropped; memory scaled by alpha) and
memory edits (a token's rows suppressed / rewritten, a key suppressed). Writes RUN/inspect/report.md with
PNGs and report.json; files of an earlier report there are kept unless --force. With --token, prints one
token's keys, neighbours and promoted tokens per layer.
Needs scikit-learn and matplotlib: pip install 'memllm-kernels[interpret]'. Definitions: docs/interpret.md."""


def _alphas(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas takes comma-separated numbers, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("--alphas needs at least one value")
    if not all(math.isfinite(v) for v in vals):  # refused here, not after the report's first sections
        raise argparse.ArgumentTypeError(f"--alphas takes finite numbers, got {s!r}")
    return vals


def _skip(s: str) -> list[str]:
    vals = [x.strip() for x in s.split(",") if x.strip()]
    bad = [v for v in vals if v not in SECTIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    return vals


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `inspect` to an argparse subparsers object (the `memllm` command's) and return its parser."""
    p = subparsers.add_parser("inspect", help="interpretability report of a run's FFN memory (keys, clusters, "
                              "logit lens, sweeps, edits)", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run directory written by `memllm train` (memoryllm or flex kind)")
    p.add_argument("--layer", type=int, help="analyse only this layer (default: all layers; sweeps always cover all)")
    p.add_argument("--out", type=Path, help="report folder (default RUN/inspect); with --token, the printed text "
                   "also goes to OUT/token.md. Refused when it holds files the command would write, unless --force")
    p.add_argument("--force", action="store_true", help="overwrite the files of an earlier report (or token.md) in "
                   "the --out folder")
    p.add_argument("--token", help="show one token instead of writing the report: text that is one token of the "
                   "run's vocabulary ('king' picks ' king' when both exist) or a raw id '#123' (quoted: an "
                   "unquoted # starts a shell comment)")
    p.add_argument("--dense", type=Path, help="a dense run for the layer sweep's comparison (paper Fig. 4)")
    p.add_argument("--seed", type=_SEED, default=0, help=f"seeds K-means, t-SNE and the token samples, 0 to "
                   f"{MAX_SEED:,} (default 0)")
    p.add_argument("--clusters", type=_number(int, 2), default=16, help="K-means clusters per layer, from 2 to the "
                   "number of distinct tokens in the training split (default 16)")
    p.add_argument("--tsne-sample", type=_number(int, MIN_TSNE_SAMPLE), default=2000,
                   help=f"seen tokens sampled for t-SNE and the clustering coefficient, at least {MIN_TSNE_SAMPLE} "
                   "(t-SNE's minimum; default 2000)")
    p.add_argument("--knn", type=_POS_INT, default=None,
                   help="neighbours in the clustering coefficient's graph (default 10, lowered to the t-SNE sample - 1)")
    p.add_argument("--outlier-tau", type=_POS_FLOAT, default=6.0,
                   help="outlier key: contribution > tau x the token's RMS contribution (default 6; also with --token)")
    p.add_argument("--top-k", type=_POS_INT, default=8, help="keys per token in access maps; with --token, keys and "
                   "promoted tokens listed (default 8)")
    p.add_argument("--eval-tokens", type=_POS_INT, default=16384,
                   help="validation tokens per sweep point and for the edit measurements, at least the run's "
                   "seq_len when the edits run (default 16384)")
    p.add_argument("--alphas", type=_alphas, default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
                   help="memory scales for the alpha sweep (default 1.0,0.9,0.8,0.7,0.6,0.5)")
    p.add_argument("--edit-token", help="token whose memory the edit demo changes, one that occurs in the validation "
                   "split (default ' king', or ' queen' when ' king' is the --edit-source; when ' king' and ' queen' "
                   "are not both single tokens, the most frequent word token of the training split, or its most "
                   "frequent token when it has no words)")
    p.add_argument("--edit-source", help="token whose rows the rewrite demo copies in (default: the first of "
                   "' king', ' queen' that is not the edit token; when they are not both single tokens, the most "
                   "frequent word token that is not the edit token, or the most frequent token when the text has no "
                   "words)")
    p.add_argument("--skip", type=_skip, default=[],
                   help=f"comma-separated sections to leave out: {', '.join(SECTIONS)} (default: none)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--threads", type=_THREADS, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(args: argparse.Namespace) -> int:
    """Run `memllm inspect` with parsed arguments. Returns 0, or 2 after printing a one-line error."""
    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():  # before minutes of analysis
            raise FileExistsError(f"--out {args.out} exists and is not a folder")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.token is not None:
            from .report import token_report

            if args.out is not None:  # refused before the analysis, not after it
                refuse_overwrite([args.out / "token.md"], args.force)
            text, _ = token_report(args.run, args.token, layer=args.layer, k=args.top_k,
                                   outlier_tau=args.outlier_tau, device=args.device, progress=not args.no_progress)
            print(text)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "token.md").write_text(text + "\n")
            return 0
        from .report import write_report

        write_report(args.run, args.out, layer=args.layer, dense=args.dense, seed=args.seed, n_clusters=args.clusters,
                     tsne_sample=args.tsne_sample, knn=args.knn, outlier_tau=args.outlier_tau, top_k=args.top_k,
                     eval_tokens=args.eval_tokens, alphas=args.alphas, edit_token=args.edit_token,
                     edit_source=args.edit_source, skip=args.skip, device=args.device, progress=not args.no_progress,
                     force=args.force)
        return 0
    except (ValueError, OSError, ImportError) as e:
        print(f"memllm inspect: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone `memllm inspect` parser (tests, `python -m memllm_kernels.interpret.cli`)."""
    p = argparse.ArgumentParser(prog="memllm")
    add_parser(p.add_subparsers(dest="cmd", required=True))
    return p


if __name__ == "__main__":
    try:
        sys.exit(main(build_parser().parse_args()))
    except KeyboardInterrupt:  # as `memllm inspect` ends: one line, no traceback
        print("\nmemllm inspect: interrupted", file=sys.stderr)
        sys.exit(130)
