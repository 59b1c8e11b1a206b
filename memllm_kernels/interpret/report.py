"""`memllm inspect`: every analysis of the toolkit on one run, written as markdown + PNGs + JSON, and the
one-token view (`--token`).

    write_report(run, out)            -> out/report.md, out/report.json, out/*.png
    token_report(run, "king")         -> markdown text: the token's keys, neighbours, promoted tokens per layer

Token sets. The identity check and the access maps cover the whole vocabulary. Clusters, outlier keys and
nearest neighbours cover the tokens that occur at least once in the run's training split ("seen" tokens):
a token the model never saw keeps (weight-decayed) initial noise, and on a GPT-2 vocabulary over Shakespeare
such tokens would be most of the vocabulary and most of every cluster. t-SNE and the clustering coefficient
use a seeded sample of the seen tokens (2,000 by default). Everything is deterministic for a given --seed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ._common import (RunHandle, check_layers, int_in, open_run, progress_bar, refuse_overwrite, require_memory,
                      resolve_token, token_counts)
from .access import access_map
from .clusters import (DEFAULT_CLUSTERS, DEFAULT_KNN, DEFAULT_OUTLIER_TAU, DEFAULT_TSNE_SAMPLE, MAX_SEED,
                       MIN_TSNE_SAMPLE, check_tau, cluster_layer, nearest_tokens, outlier_key_counts,
                       plot_layer_summary)
from .coefficients import check_decomposition, coefficients, iter_coefficients, key_value_weights
from .edits import copy_token_rows, edit_effect, edited_rows, suppress_token_rows, suppressed_keys
from .lens import SUM, bigram_agreement, memory_lens
from .sweeps import DEFAULT_ALPHAS, DEFAULT_EVAL_TOKENS, alpha_sweep, layer_drop_sweep, plot_layer_sweeps

SECTIONS = ("identity", "access", "clusters", "lens", "sweeps", "edits")
DEFAULT_EDIT_TOKENS = (" king", " queen")  # Shakespeare's most frequent noun pair that BPEs keep whole


def _f(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.2e}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def _is_word(name: str, min_letters: int = 1) -> bool:
    """Whether a token's printable name (TokenNames: quoted, spaces kept) is a word: letters only."""
    w = name.strip("'\" ")
    return w.isalpha() and len(w) >= min_letters


def _by_frequency(counts: np.ndarray) -> np.ndarray:
    """The tokens seen in the training split, most frequent first."""
    order = np.argsort(-counts, kind="stable")
    return order[counts[order] > 0]


def _pick_edit_tokens(h: RunHandle, counts: np.ndarray, edit_token, edit_source) -> tuple[int, int, list[str]]:
    """The token whose memory the edit demo changes and the token whose rows it copies in: the user's, else
    ' king' / ' queen' when both are single tokens, else the two most frequent word tokens (3 or more letters)
    seen in training, then the most frequent seen tokens of any kind. A token the user gives is paired with
    the first of those that differs from it."""
    V = h.model.config.vocab_size
    notes = []
    if edit_token is not None:
        t, note = resolve_token(h.tokenizer, edit_token, V, "--edit-token")
        notes.append(f"edit token: {note}")
    if edit_source is not None:
        s, note = resolve_token(h.tokenizer, edit_source, V, "--edit-source")
        notes.append(f"edit source: {note}")
    if edit_token is not None and edit_source is not None and s == t:
        # its rows copied onto themselves: the demo would report +0.000 everywhere
        raise ValueError(f"--edit-source names the edit token itself (id {t}); give another token to copy from")
    pair = []
    for w in DEFAULT_EDIT_TOKENS:  # the space-prefixed words exactly: not the word pieces 'king' / 'queen'
        try:
            pair.append(resolve_token(h.tokenizer, w, V)[0])
        except ValueError:
            pass
    frequent = _by_frequency(counts)
    words = [int(i) for i in frequent[:2000] if _is_word(h.names(i), 3)]
    # a text without words (numbers, code) still gets an edit pair: its most frequent tokens
    cands = (pair if len(pair) == 2 else []) + words + frequent.tolist()
    if edit_token is None:
        t = next((c for c in cands if edit_source is None or c != s), None)
    if edit_source is None:
        s = next((c for c in cands if c != t), None)
    if t is None or s is None:
        raise ValueError("found no two tokens for the edit demo (the training split has fewer than two distinct "
                         "tokens); pass --edit-token and --edit-source, or --skip edits")
    return int(t), int(s), notes


def report_files(layers, skip=()) -> list[str]:
    """The names of the files write_report writes into its folder for these layers and skipped sections."""
    per_section = {"access": [f"access_l{l}.png" for l in layers],
                   "clusters": [f"tsne_l{l}.png" for l in layers] + ["layers_clusters_outliers.png"],
                   "lens": ["lens_bigram.png"], "sweeps": ["sweep_layers.png", "sweep_alpha.png"],
                   "edits": ["edit_suppress_token.png", "edit_suppress_key.png"]}
    return ["report.md", "report.json"] + [f for sec, fs in per_section.items() if sec not in skip for f in fs]


def write_report(run, out=None, *, layer: int | None = None, dense=None, seed: int = 0,
                 n_clusters: int = DEFAULT_CLUSTERS, tsne_sample: int = DEFAULT_TSNE_SAMPLE, knn: int | None = None,
                 outlier_tau: float = DEFAULT_OUTLIER_TAU, top_k: int = 8, eval_tokens: int = DEFAULT_EVAL_TOKENS,
                 alphas=DEFAULT_ALPHAS, edit_token: str | None = None, edit_source: str | None = None,
                 skip=(), device: str = "cpu", progress: bool = True, force: bool = False, log=print) -> dict:
    """Run every analysis on `run` (a `memllm train` directory, or an open RunHandle) and write
    out/report.md, out/report.json and the PNGs (out defaults to RUN/inspect). Returns the JSON dict.

    layer: analyse only that layer (default: all); knn: neighbours in the clustering coefficient's graph
    (default 10, lowered to the t-SNE sample - 1; a larger explicit value is refused); dense: a dense run (directory) for the layer sweep's
    comparison; skip: section names from SECTIONS to leave out; force: overwrite files of an earlier report
    in `out` (otherwise FileExistsError). Arguments are checked before any analysis runs.
    """
    t_start = time.perf_counter()
    bad = sorted(set(skip) - set(SECTIONS))
    if bad:
        raise ValueError(f"unknown section(s) {bad} in skip; sections: {', '.join(SECTIONS)}")
    h = run if isinstance(run, RunHandle) else open_run(run, device)
    model, cfg = h.model, h.model.config
    require_memory(model)
    layers = check_layers(model, None if layer is None else [layer])
    out = Path(out) if out is not None else h.path / "inspect"
    refuse_overwrite([out / f for f in report_files(layers, skip)], force)
    int_in("--seed", seed, 0, MAX_SEED)  # scikit-learn's random_state range: it refused -1 only in the clusters
    dense_h = None
    if dense is not None and "sweeps" not in skip:
        dense_h = dense if isinstance(dense, RunHandle) else open_run(dense, device)
        try:  # its text is read only in the sweeps section, after minutes of analyses: read it now
            dense_val = dense_h.token_ids("val")
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--dense {dense_h.path}: cannot read its validation text ({e})") from None
    names = h.names
    seq_len = int(h.config["train"]["seq_len"])
    log(f"inspect {h.path} ({cfg.name}, kind {cfg.kind}, vocab {cfg.vocab_size}, {cfg.n_layer} layers, K_M "
        f"{cfg.ffn_memory_hidden}) -> {out}")
    train_ids = h.token_ids("train")
    val_ids = h.token_ids("val")
    counts = token_counts(train_ids, cfg.vocab_size)
    seen = np.flatnonzero(counts > 0)
    # the later sections would fail on these only after minutes of analyses (and leave their PNGs): check now
    if "clusters" not in skip:
        if len(seen) < MIN_TSNE_SAMPLE:
            raise ValueError(f"only {len(seen)} distinct tokens occur in the training split, too few to cluster "
                             f"(t-SNE needs {MIN_TSNE_SAMPLE}); pass --skip clusters")
        if not 2 <= n_clusters <= len(seen):
            raise ValueError(f"--clusters {n_clusters}: K-means needs 2 to {len(seen):,} clusters here (the "
                             f"{len(seen):,} distinct tokens of the training split are what it groups)")
        if tsne_sample < MIN_TSNE_SAMPLE:
            raise ValueError(f"--tsne-sample {tsne_sample}: t-SNE needs at least {MIN_TSNE_SAMPLE} tokens")
        sampled = min(tsne_sample, len(seen))
        if knn is None:  # the default, lowered for tiny samples (the report names the k it used)
            knn = min(DEFAULT_KNN, sampled - 1)
        elif knn >= sampled:  # an explicit k the sample cannot give
            raise ValueError(f"--knn {knn}: the clustering coefficient's graph links each of the {sampled:,} sampled "
                             f"tokens to at most {sampled - 1:,} others; give 1 to {sampled - 1:,}")
        check_tau(outlier_tau)
    if "edits" not in skip:
        edit_tok, edit_src, edit_notes = _pick_edit_tokens(h, counts, edit_token, edit_source)
        # the edits score whole windows of the run's seq_len tokens, those that hold the edit token
        if eval_tokens < seq_len:
            raise ValueError(f"--eval-tokens {eval_tokens}: the edits score windows of the run's {seq_len} tokens "
                             f"(its seq_len); give at least {seq_len}")
        n_win = (len(val_ids) - 1) // seq_len
        if not (val_ids[:n_win * seq_len] == edit_tok).any():
            raise ValueError(f"the edit token {names(edit_tok)} (id {edit_tok}) does not occur in the {n_win} windows "
                             f"of {seq_len} tokens of the validation split, so editing it changes nothing there; "
                             "pass another --edit-token, or --skip edits")
    if "access" not in skip and not 1 <= top_k <= cfg.ffn_memory_hidden:
        raise ValueError(f"--top-k {top_k}: the access maps rank the {cfg.ffn_memory_hidden} memory keys of a "
                         f"layer; give 1 to {cfg.ffn_memory_hidden}")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"run": str(h.path), "model": cfg.to_dict(), "seed": seed, "layers": layers,
                 "seen_tokens": int(len(seen)), "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
                 "torch_threads": torch.get_num_threads(), "device": device}
    md = [f"# Memory inspection: `{h.path.name}`", "",
          f"Model `{cfg.name}` (kind `{cfg.kind}`): d = {cfg.d_model}, {cfg.n_layer} layers, memory FFN width "
          f"K_M = {cfg.ffn_memory_hidden} keys per layer, vocabulary {cfg.vocab_size:,} (`{h.config['tokenizer']}`). "
          f"{len(seen):,} tokens occur in the training split ({len(train_ids):,} tokens); validation split "
          f"{len(val_ids):,} tokens. Seed {seed}. Definitions: docs/interpret.md.", ""]
    if cfg.is_flex:
        md += [f"Flex model: the analyses read FFN-M (the memory, K_M = {cfg.ffn_memory_hidden}); FFN-C "
               f"(K_C = {cfg.ffn_context_hidden}) reads the residual stream and is not a memory.", ""]
    png = lambda name: out / name  # noqa: E731

    # ---- 1. identity
    if "identity" not in skip:
        log("[1/6] key-value decomposition check")
        rows = [check_decomposition(model, l, progress=progress)
                for l in progress_bar(layers, enabled=progress, desc="identity")]
        res["identity"] = rows
        md += ["## 1. The key-value decomposition", "",
               "c_i(t) = (q.k_i) silu(q.g_i) with q = norm_m,l(E[t]); sum_i c_i v_i against the model's own memory "
               "FFN output, every vocabulary token:", ""]
        md += _table(["layer", "tokens", "max abs error", "max rel error", "ok"],
                     [[r["layer"], r["tokens"], r["max_abs_err"], r["max_rel_err"], str(r["ok"])] for r in rows])
        nonfinite = [(r["layer"], r["nonfinite_tokens"]) for r in rows if r["nonfinite_tokens"]]
        if nonfinite:  # the model's data, not the decomposition: one line from `memllm inspect`, no traceback
            raise ValueError(f"NaN or inf memory outputs (layer, tokens): {nonfinite}; the run's embedding or memory "
                             "FFN weights hold NaN or inf, and nothing can be read from those rows")
        if not all(r["ok"] for r in rows):
            raise AssertionError(f"the key-value decomposition does not reproduce the memory FFN: {rows}")

    # ---- 2. access maps
    access = {}
    if "access" not in skip:
        log("[2/6] access maps")
        md += ["## 2. Access maps", "",
               f"Each token's top-{top_k} keys by contribution |c_i| ||v_i||; a key's utilization is the number of "
               f"tokens (of all {cfg.vocab_size:,}) with it in their top-{top_k}; dead keys are in no token's top-{top_k}.", ""]
        rows = []
        for l in progress_bar(layers, enabled=progress, desc="access maps"):
            am = access_map(model, l, k=top_k, progress=progress)
            access[l] = am
            am.plot(png(f"access_l{l}.png"))
            s = am.summary()
            rows.append([l, s["keys"], s["dead_keys"], s["utilization_median"], s["utilization_max"],
                         s["top1pct_key_share"]])
        res["access"] = [access[l].summary() for l in layers]
        md += _table(["layer", "keys", "dead keys", "median utilization", "max utilization", "share of top-k slots "
                      "held by the 1% most used keys"], rows)
        for l in layers:
            am = access[l]
            md += [f"Layer {l} ([plot](access_l{l}.png)): the 4 most used keys and the tokens that use them most:", ""]
            top_keys = np.argsort(-am.utilization, kind="stable")[:4]
            md += _table(["key", "utilization", "tokens (largest contribution first)"],
                         [[int(k), int(am.utilization[k]), names.many([t for t, _ in am.tokens_of(int(k))[:8]], md=True)]
                          for k in top_keys])

    # ---- 3. clusters
    clusters = {}
    if "clusters" not in skip:
        log("[3/6] clusters, clustering coefficient, outlier keys (t-SNE on "
            f"{min(tsne_sample, len(seen))} tokens per layer)")
        for l in progress_bar(layers, enabled=progress, desc="clusters"):
            cr = cluster_layer(model, l, tokens=seen, n_clusters=n_clusters, sample=tsne_sample,
                               knn=knn, outlier_tau=outlier_tau, seed=seed, counts=counts, progress=progress)
            clusters[l] = cr
            cr.plot(png(f"tsne_l{l}.png"), names=names)
        crs = [clusters[l] for l in layers]
        plot_layer_summary(crs, png("layers_clusters_outliers.png"))
        res["clusters"] = [c.summary() for c in crs]
        md += ["## 3. Clusters, clustering coefficient, outlier keys", "",
               f"K-means ({n_clusters} clusters) over the L2-normalised coefficient vectors of the {len(seen):,} seen "
               f"tokens; t-SNE and the clustering coefficient (mean local clustering coefficient of the "
               # the k actually used (the default 10 is lowered to sample - 1 for tiny samples)
               f"{crs[0].knn}-NN cosine graph) on a seeded sample of {min(tsne_sample, len(seen))}; 'shuffled' is "
               f"the same coefficient after permuting every key's column across tokens. Outlier keys: contribution > "
               f"{outlier_tau:g} x the token's RMS contribution. [plot](layers_clusters_outliers.png)", ""]
        md += _table(["layer", "clustering coef.", "shuffled", "silhouette", "outlier keys / token (mean)",
                      "p99", "max", "tokens with >= 1"],
                     [[c.layer, c.clustering_coefficient, c.clustering_coefficient_shuffled, c.silhouette,
                       float(c.outliers.mean()), float(np.percentile(c.outliers, 99)), int(c.outliers.max()),
                       float((c.outliers > 0).mean())] for c in crs])
        last = crs[-1]
        worst = np.argsort(-last.outliers, kind="stable")[:10]
        md += [f"Tokens with the most outlier keys at layer {last.layer}: "
               + ", ".join(f"{names.md(last.tokens[i])} ({int(last.outliers[i])})" for i in worst), ""]
        for c in crs:
            md += [f"### Layer {c.layer} clusters ([t-SNE](tsne_l{c.layer}.png))", ""]
            order = np.argsort(-c.sizes, kind="stable")
            md += _table(["cluster", "tokens", "most frequent members", "closest to the centroid"],
                         [[int(k), int(c.sizes[k]), names.many(c.frequent.get(int(k), []), md=True),
                           names.many(c.central[int(k)][:6], md=True)] for k in order])

    # ---- 4. logit lens
    if "lens" not in skip:
        log("[4/6] logit lens on the memory")
        ba = bigram_agreement(model, train_ids, layers, k=10, min_count=20, progress=progress)
        ba.plot(png("lens_bigram.png"))
        res["lens"] = ba.summary()
        md += ["## 4. Logit lens on the memory", "",
               "Each ToL row ToL[t, l] through the final norm and the LM head ('sum': all layers' rows added). "
               f"Hit rate: share of the {len(ba.tokens):,} tokens seen >= {ba.min_count} times in training whose "
               f"most frequent successor is among the lens's top-{ba.k}; the unigram reference is the share whose "
               f"successor is among the {ba.k} most frequent tokens. [plot](lens_bigram.png)", ""]
        md += _table(["layer"] + [str(l) for l in ba.hit] + ["unigram"],
                     [["hit@10"] + list(ba.hit.values()) + [ba.unigram]])
        # tokens seen in training only: an unseen one keeps initial noise (module docstring)
        frequent = _by_frequency(counts)
        examples, what = [int(i) for i in frequent[:2000] if _is_word(names(i))][:6], "frequent words"
        if not examples:  # a text without words (numbers, code)
            examples, what = frequent[:6].tolist(), "the most frequent tokens"
        lens = memory_lens(model, examples, layers, k=5)
        md += [f"Next tokens promoted by the memory of {what}:", ""]
        md += _table(["token"] + [f"layer {l}" if l != SUM else "sum" for l in lens.layers],
                     [[names.md(t)] + [names.many([p for p, _ in lens.promoted(int(t), l)], md=True)
                                       for l in lens.layers] for t in examples])

    # ---- 5. sweeps
    if "sweeps" not in skip:
        log(f"[5/6] layer and alpha sweeps ({eval_tokens:,} validation tokens per point)")
        sw = layer_drop_sweep(model, val_ids, seq_len, max_tokens=eval_tokens, progress=progress)
        sweeps = [sw]
        notes = []
        if dense_h is not None:
            dcfg, dval = dense_h.model.config, dense_val
            dsw = layer_drop_sweep(dense_h.model, dval, int(dense_h.config["train"]["seq_len"]), max_tokens=eval_tokens,
                                   progress=progress)
            sweeps.append(dsw)
            if dense_h.tokenizer.fingerprint != h.tokenizer.fingerprint or dval.shape != val_ids.shape:
                notes.append(f"Note: `{dense_h.path.name}` uses another tokenizer or validation text; its "
                             "perplexities are per its own tokens and compare only as ratios.")
            if dcfg.has_memory:
                notes.append(f"Note: `{dense_h.path.name}` is not dense (kind {dcfg.kind}): its sweep drops memory.")
        plot_layer_sweeps(sweeps, png("sweep_layers.png"))
        al = alpha_sweep(model, val_ids, seq_len, alphas=alphas, max_tokens=eval_tokens, progress=progress)
        al.plot(png("sweep_alpha.png"))
        res["sweeps"] = {"layers": [s.summary() for s in sweeps], "alpha": al.summary()}
        md += ["## 5. Sweeps", "",
               f"Validation perplexity over the first {sw.tokens:,} validation tokens (windows of {seq_len}). "
               "One layer dropped at a time (paper Fig. 4): its memory term for this run"
               + (", its FFN for the dense run" if dense_h is not None else " (no dense run given: --dense RUN)")
               + ". [plot](sweep_layers.png)", ""] + notes + ([""] if notes else [])
        hdr = ["dropped layer"] + [f"{s.name} ({'memory' if s.what == 'memory' else 'FFN'})" for s in sweeps]
        n_l = max(len(s.points) for s in sweeps)
        md += _table(hdr, [["none"] + [s.baseline[1] for s in sweeps]]
                     + [[str(i)] + [s.points[i][2] if i < len(s.points) else None for s in sweeps] for i in range(n_l)])
        md += ["Whole memory scaled by alpha (paper Table 1). [plot](sweep_alpha.png)", ""]
        md += _table(["alpha"] + [f"{p[0]:g}" for p in al.points], [["ppl"] + [p[2] for p in al.points]])

    # ---- 6. edits
    if "edits" not in skip:
        log("[6/6] memory edits")
        res["edits"] = _edits_section(h, edit_tok, edit_src, layers, val_ids, seq_len, eval_tokens, counts, md,
                                      edit_notes, png, progress, log)

    res["seconds"] = time.perf_counter() - t_start
    md += [f"_Generated by `memllm inspect` in {res['seconds']:.0f} s ({torch.get_num_threads()} torch threads, "
           f"device {device})._", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(res, indent=1, default=_jsonable) + "\n")
    log(f"wrote {out / 'report.md'} in {res['seconds']:.0f} s")
    return res


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _edits_section(h: RunHandle, tok: int, src: int, layers, val_ids, seq_len, eval_tokens, counts, md, notes,
                   png, progress, log) -> dict:
    from scipy.stats import spearmanr

    model, names = h.model, h.names
    nm = lambda t: names.md(t)  # noqa: E731
    out = {"token": tok, "source": src}
    md += ["## 6. Memory edits", "",
           f"Edited token {nm(tok)} (token {tok}, {int(counts[tok]):,} times in training), rows copied from "
           f"{nm(src)} (token {src}); layers {layers if len(layers) < model.config.n_layer else 'all'}. Loss changes "
           f"(nats), edited model minus original, in windows of {seq_len} validation tokens: for (a) and (b) the "
           f"first windows that contain {nm(tok)} (up to {eval_tokens:,} tokens; no other window can change), "
           f"for (c) the first {eval_tokens:,} tokens.", ""] + notes
    # (a) suppress the token's memory rows
    e1 = edit_effect(model, val_ids, lambda: edited_rows(model, suppress_token_rows(model, tok, layers)),
                     seq_len=seq_len, focus=[tok], max_tokens=eval_tokens, progress=progress, windows="focus",
                     description=f"memory rows of {names(tok)} set to zero")
    e1.plot(png("edit_suppress_token.png"), names=names)
    # (b) rewrite the token's rows with the source's
    e2 = edit_effect(model, val_ids, lambda: edited_rows(model, copy_token_rows(model, tok, src, layers)),
                     seq_len=seq_len, focus=[tok], max_tokens=eval_tokens, progress=progress, windows="focus",
                     description=f"memory rows of {names(tok)} replaced by those of {names(src)}")
    # (c) suppress the key the token reads most, at the layer where its top contribution is largest
    best = (None, -1.0, None)
    for l in layers:
        co = coefficients(model, l, [tok])
        c = np.abs(co.coef[0]) * co.value_norms
        if c.max() > best[1]:
            best = (l, float(c.max()), int(c.argmax()))
    kl, _, key = best
    e3 = edit_effect(model, val_ids, lambda: suppressed_keys(model, kl, [key]), seq_len=seq_len,
                     max_tokens=eval_tokens, progress=progress,
                     description=f"key {key} of layer {kl} suppressed (the key {names(tok)} reads most)")
    e3.plot(png("edit_suppress_key.png"), names=names)
    # does the access map predict who is hit? contribution of the key to each input token vs its mean |delta|
    _, contrib = _key_column(model, kl, key)  # [V], indexed by token id
    grouped = e3.by_input(min_count=5)
    in_toks = np.array([t for t, _, _ in grouped])
    hit = np.array([abs(v) for _, v, _ in grouped])
    rho = float(spearmanr(contrib[in_toks], hit).statistic) if len(in_toks) > 2 else float("nan")
    pred_top = set(in_toks[np.argsort(-contrib[in_toks], kind="stable")[:20]].tolist())
    meas_top = [t for t, _, _ in sorted(grouped, key=lambda r: -abs(r[1]))[:20]]
    overlap = len(pred_top & set(meas_top)) / max(1, min(20, len(in_toks)))
    s1, s2, s3 = e1.summary(), e2.summary(), e3.summary()
    out.update(suppress_token=s1, rewrite_token=s2, suppress_key={"layer": kl, "key": key, **s3,
               "spearman_contribution_vs_abs_delta": rho, "top20_overlap": overlap, "input_tokens": int(len(in_toks))})
    for edit, s in (("(a)", s1), ("(b)", s2)):
        if s["max_abs_delta_unreached"]:  # (None: no such position) causal attention makes it exactly 0
            warning = (f"WARNING: edit {edit} changed the loss by up to {s['max_abs_delta_unreached']:.3g} nats before "
                       f"the first {names(tok)} of a window, where a row edit cannot act (causal attention): "
                       "expected exactly 0")
            md += [f"**{warning}**", ""]
            log(warning)
    md += ["### (a) Suppress the token's memory ([plot](edit_suppress_token.png))", ""]
    md += _table(["positions", "with the token as input", "mean delta there", "mean abs delta later in its window",
                  "positions before it (unreachable)", "max abs delta there"],
                 [[s1["positions"], s1["focus_positions"], s1["mean_delta_at_focus"], s1["mean_abs_delta_after_focus"],
                   s1["unreached_positions"], s1["max_abs_delta_unreached"]]])
    md += ["Next tokens whose loss rose most (mean over their positions, >= 5 occurrences): "
           + ", ".join(f"{nm(t)} {v:+.3f}" for t, v, _ in s1["top_targets"][:8]), "",
           "Next tokens that lost the most probability right after the token (mean change of p): "
           + ", ".join(f"{nm(t)} {v:+.3f}" for t, v in (s1.get("falling_after_focus") or [])[:8]), ""]
    md += [f"### (b) Rewrite: {nm(tok)} reads {nm(src)}'s memory", "",
           f"Mean loss change where {nm(tok)} is the input: {_f(s2['mean_delta_at_focus'])} nats over "
           f"{s2['focus_positions']} positions; max abs change before its first occurrence in each window (0 "
           f"expected): {_f(s2['max_abs_delta_unreached'])}.", "",
           "Next tokens that gained the most probability right after it (mean change of p): "
           + ", ".join(f"{nm(t)} {v:+.3f}" for t, v in (s2.get("rising_after_focus") or [])[:8]), "",
           "... and lost the most: "
           + ", ".join(f"{nm(t)} {v:+.3f}" for t, v in (s2.get("falling_after_focus") or [])[:8]), ""]
    md += [f"### (c) Suppress key {key} of layer {kl} ([plot](edit_suppress_key.png))", "",
           f"The key with {nm(tok)}'s largest contribution. Mean loss change {_f(s3['mean_delta'])} nats over all "
           f"{s3['positions']} positions. Inputs hit hardest (mean delta, >= 5 occurrences): "
           + ", ".join(f"{nm(t)} {v:+.3f}" for t, v, _ in s3["top_inputs"][:8]), "",
           f"Does the access map predict it? Over the {len(in_toks)} input tokens seen >= 5 times, Spearman "
           f"correlation between the key's contribution |c_i(t)| ||v_i|| and the token's mean |delta loss|: "
           f"{_f(rho)}; overlap of the 20 most-contributing and the 20 most-hit tokens: {overlap:.0%}. The tokens "
           f"that use key {key} most: " + names.many([t for t in np.argsort(-contrib, kind='stable')[:10]], md=True), ""]
    return out


# ---------------------------------------------------------------- one token
def token_report(run, token: str, *, layer: int | None = None, k: int = 8, neighbours: int = 10,
                 outlier_tau: float = DEFAULT_OUTLIER_TAU, device: str = "cpu",
                 progress: bool = False) -> tuple[str, dict]:
    """One token across layers: its top k keys (and the tokens that use its top key most), its nearest
    neighbours in coefficient space (cosine, among seen tokens), the k next tokens its memory promotes, its
    outlier keys (contribution > outlier_tau x RMS). token: text (one token of the vocabulary) or '#ID'.
    Returns (markdown, dict)."""
    h = run if isinstance(run, RunHandle) else open_run(run, device)
    model, cfg = h.model, h.model.config
    require_memory(model)
    layers = check_layers(model, None if layer is None else [layer])
    tok, note = resolve_token(h.tokenizer, token, cfg.vocab_size)
    most = min(cfg.ffn_memory_hidden, cfg.vocab_size)
    if not 1 <= k <= most:  # the lens would refuse it naming its own argument `k`
        raise ValueError(f"--top-k {k}: the token view lists its top keys (of {cfg.ffn_memory_hidden}) and promoted "
                         f"tokens (of {cfg.vocab_size:,}); give 1 to {most}")
    outlier_tau = check_tau(outlier_tau)
    names = h.names
    try:
        counts = token_counts(h.token_ids("train"), cfg.vocab_size)
        pool, pool_note = np.flatnonzero(counts > 0), "tokens seen in training"
        freq = f"{int(counts[tok]):,} times in the training split"
    except (FileNotFoundError, ValueError) as e:  # the run's text is not installed here: use the vocabulary
        pool, pool_note, freq = None, "the whole vocabulary", f"training text unavailable ({e})"
    lens = memory_lens(model, [tok], layers, k=k)
    md = [f"# {names.md(tok)} in `{h.path.name}`", "", f"{note}; {freq}. Neighbours among {pool_note}.", ""]
    rows, info = [], {"token": tok, "note": note, "layers": []}
    for l in progress_bar(layers, enabled=progress, desc="layers"):
        co = coefficients(model, l, [tok])
        contrib = np.abs(co.coef[0]) * co.value_norms
        top = np.argsort(-contrib, kind="stable")[:k]
        am_users = _key_users(model, l, int(top[0]), pool)
        nb = nearest_tokens(model, l, tok, tokens=pool, n=neighbours)
        n_out = int(outlier_key_counts(co.coef, co.value_norms, outlier_tau)[0])
        prom = lens.promoted(tok, l)
        rows.append([str(l), ", ".join(f"{int(i)}:{contrib[i]:.3g}" for i in top[:5]),
                     names.many([t for t, _ in am_users[:5]], md=True),
                     names.many([t for t, _ in nb], md=True), names.many([t for t, _ in prom], md=True), str(n_out)])
        info["layers"].append({"layer": l, "top_keys": [(int(i), float(co.coef[0, i]), float(contrib[i])) for i in top],
                               "top_key_users": am_users, "neighbours": nb, "promoted": prom, "outlier_keys": n_out})
    md += _table(["layer", "top keys (key:contribution)", "tokens that use its top key most",
                  f"nearest {neighbours} tokens (coefficient cosine)", f"promoted next tokens (top {k})",
                  f"outlier keys (tau {outlier_tau:g})"], rows)
    if SUM in lens.layers:
        info["promoted_sum"] = lens.promoted(tok, SUM)
        md += ["All layers' memory together promotes: " + names.many([t for t, _ in info["promoted_sum"]], md=True), ""]
    return "\n".join(md), info


def _key_column(model, layer: int, key: int, tokens=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N], contributions |c_key(t)| ||v_key|| [N]) of `tokens` (None: all) at `layer`, streamed in chunks: the
    whole [N, K] coefficient matrix for one of its columns was 2.8 GB a layer for the 1B preset (128,256 x 5,464),
    and twice that while its chunks were joined."""
    vnorm = key_value_weights(model, layer).value_norms[key]
    ids, col = [], []
    for chunk, c in iter_coefficients(model, layer, tokens, verify=True):
        ids.append(chunk.cpu())
        col.append((c[:, key].abs() * vnorm).cpu())
    return torch.cat(ids).numpy(), torch.cat(col).numpy()


def _key_users(model, layer: int, key: int, pool, n: int = 10) -> list[tuple[int, float]]:
    """The n tokens (of `pool`, None: all) with the largest contribution on `key` at `layer`."""
    ids, c = _key_column(model, layer, key, pool)
    order = np.argsort(-c, kind="stable")[:n]
    return [(int(ids[i]), float(c[i])) for i in order]
