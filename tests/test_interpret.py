"""Tests of the interpretability toolkit (memllm_kernels.interpret) on tiny models: shapes, the key-value
identity sum_i c_i v_i = FFN output, determinism, planted structure recovered, edits that change exactly what
they should, clear errors for bad arguments, and the `inspect` command on two tiny trained runs.

Models are tiny (d = 32, 2 layers, vocabulary 300) so the file runs in about a minute on two CPU cores; the
runs for the command-line tests train for 20 steps on a synthetic text (module fixture, trained once).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from memllm_kernels.interpret import (access_map, alpha_sweep, bigram_agreement, check_decomposition, cluster_layer,
                                      clustering_coefficient, coefficients, copy_token_rows, edit_effect, edited_rows,
                                      iter_coefficients, key_value_weights, layer_drop_sweep, memory_lens,
                                      memory_rows, nearest_tokens, outlier_key_counts, resolve_token,
                                      suppress_token_rows, suppressed_keys)
from memllm_kernels.interpret.clusters import kmeans, knn_graph, local_clustering, normalise_rows, shuffled_columns
from memllm_kernels.interpret.lens import top_successors
from memllm_kernels.interpret.report import report_files
from memllm_kernels.interpret.sweeps import dropped_ffn, memory_scale
from memllm_kernels.model import ModelConfig, Transformer
from memllm_kernels.model.tol import iter_tol_chunks, swap_ffn_for_tol
from memllm_kernels.model.train import evaluate

# ---- the test matrix, named once
MEMORY_KINDS = ["memoryllm", "flex2"]  # flex: the analyses read FFN-M
TINY = dict(vocab_size=300, n_layer=2, d_model=32, n_head=4, block_size=64, name="test-tiny")
SEEDS = [0, 1]
# float32 tolerances, with reasons:
#   the identity is checked against an independent float64 evaluation of the same weights; float32 sums of
#   d = 32 and K = 88 products of O(1) terms err by ~1e-7 relative, 1e-5 leaves a 100x margin.
IDENTITY_RTOL = 1e-5
#   a key edit removes c_i v_i; the edited FFN sums K - 1 terms in another order than old - c_i v_i: same size.
EDIT_ATOL = 1e-6

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn not installed (pip install -e '.[interpret]')")
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason="matplotlib not installed (pip install -e '.[interpret]')")
needs_train_deps = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("safetensors", "tokenizers", "tqdm", "sklearn", "matplotlib")),
    reason="training a run and the report need safetensors, tokenizers, tqdm, scikit-learn and matplotlib")


def tiny_model(kind: str = "memoryllm", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(kind=kind, **{**TINY, **kw})).eval()
    # Bigger-than-init memory weights so coefficients, losses and edits are far from rounding noise.
    with torch.no_grad():
        for mem in m.memory_modules():
            for w in (mem.ffn.w_gate.weight, mem.ffn.w_up.weight, mem.ffn.w_down.weight):
                w.mul_(10)
        m.norm.weight.fill_(1.0)
    return m


def ffn_reference64(model: Transformer, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The memory FFN in float64, written out independently: RMSNorm then SwiGLU. [N] -> [N, d]."""
    mem = model.layers[layer].memory
    x = model.tok_embeddings.weight.detach().double()[ids]
    q = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mem.norm.eps) * mem.norm.weight.detach().double()
    f = mem.ffn
    return f.w_down.weight.detach().double() @ (torch.nn.functional.silu(q @ f.w_gate.weight.detach().double().t())
                                                * (q @ f.w_up.weight.detach().double().t())).t()


# ---------------------------------------------------------------- coefficients
@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_coefficients_shapes_and_identity(kind):
    model = tiny_model(kind)
    cfg = model.config
    for layer in range(cfg.n_layer):
        co = coefficients(model, layer, chunk_tokens=37)  # chunks that do not divide the vocabulary
        assert co.coef.shape == (cfg.vocab_size, cfg.ffn_memory_hidden) and co.coef.dtype == np.float32
        assert co.value_norms.shape == (cfg.ffn_memory_hidden,)
        np.testing.assert_array_equal(co.tokens, np.arange(cfg.vocab_size))
        kv = key_value_weights(model, layer)
        assert kv.keys.shape == kv.gates.shape == kv.values.shape == (cfg.ffn_memory_hidden, cfg.d_model)
        summed = torch.from_numpy(co.coef).double() @ kv.values.double()  # sum_i c_i v_i
        ref = ffn_reference64(model, layer, torch.arange(cfg.vocab_size)).t()
        err = (summed - ref).abs().max() / ref.abs().max()
        assert err < IDENTITY_RTOL, err
        # and against the model's own module, as the toolkit checks it
        own = model.layers[layer].memory.lookup(model.tok_embeddings.weight).detach().double()
        assert ((summed - own).abs().max() / own.abs().max()) < IDENTITY_RTOL
        chk = check_decomposition(model, layer)
        assert chk["ok"] and chk["tokens"] == cfg.vocab_size
    assert cfg.is_flex == (kind == "flex2") and (cfg.ffn_memory_hidden < cfg.ffn_hidden) == cfg.is_flex


def test_identity_check_catches_a_wrong_decomposition(monkeypatch):
    """The built-in check is live: a decomposition without the gate fails it."""
    model = tiny_model()
    # the module, not the function of the same name that the package exports
    coef_mod = importlib.import_module("memllm_kernels.interpret.coefficients")
    monkeypatch.setattr(coef_mod, "coefficients_of", lambda q, kv: q @ kv.keys.t())
    with pytest.raises(AssertionError, match="differs from the memory FFN's output"):
        list(iter_coefficients(model, 0, verify=True))
    assert not check_decomposition(model, 0)["ok"]


def test_identity_check_flags_nan_rows():
    """A NaN row compared false with the tolerance: check_decomposition said ok with error 0.0 and the verified
    coefficients came back with a NaN row. Now the token is named and the layer is not ok."""
    model = tiny_model()
    with torch.no_grad():
        model.tok_embeddings.weight[5] = float("nan")
    chk = check_decomposition(model, 0)
    assert chk["nonfinite_tokens"] == 1 and not chk["ok"] and chk["max_rel_err"] < IDENTITY_RTOL  # the rest still fit
    with pytest.raises(ValueError, match=r"layer 0: 1 token\(s\) have a NaN or inf .*first: token id 5"):
        coefficients(model, 0)
    assert check_decomposition(model, 0, [4, 6])["ok"]
    # access_map without the check (its default): topk ranked the NaN row's keys first and key_max was NaN for all
    with pytest.raises(ValueError, match="layer 0: token id 5 has NaN or inf coefficients"):
        access_map(model, 0)
    assert np.isfinite(access_map(model, 0, tokens=[4, 6]).key_max).all()


def test_knn_graph_refuses_a_sample_beyond_memory(monkeypatch):
    """13 n^2 bytes: a sample of 50,000 tokens needs 32 GB; refused before any is allocated."""
    clusters = importlib.import_module("memllm_kernels.interpret.clusters")
    monkeypatch.setattr(clusters, "mem_available", lambda: 13 * 100 * 100 - 1)
    with pytest.raises(ValueError, match=r"k-NN graph of 100 tokens needs about 0.0 GiB .*--tsne-sample"):
        knn_graph(np.random.default_rng(0).standard_normal((100, 8)), 3)
    monkeypatch.setattr(clusters, "mem_available", lambda: 13 * 100 * 100)
    assert knn_graph(np.random.default_rng(0).standard_normal((100, 8)), 3).shape == (100, 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_identity_check_of_a_half_precision_model(dtype, monkeypatch):
    """A bf16 / fp16 model's own FFN rounds its output (0.5-0.75 eps off the float32 sum): the float32 tolerance
    called its correct decomposition a mismatch, so coefficients() and every clustering raised AssertionError.
    The tolerance follows the FFN's dtype, and a decomposition without the gate still fails it."""
    model = tiny_model().to(dtype)
    ref = ffn_reference64(model, 1, torch.arange(300)).t()  # the same (rounded) weights, in float64
    co = coefficients(model, 1)  # verify=True
    summed = torch.from_numpy(co.coef).double() @ key_value_weights(model, 1).values.double()
    assert ((summed - ref).abs().max() / ref.abs().max()) < 2 * torch.finfo(dtype).eps  # q's rounding to dtype
    chk = check_decomposition(model, 1)
    assert chk["ok"] and 0 < chk["max_rel_err"] < chk["rtol"] == 8 * torch.finfo(dtype).eps
    coef_mod = importlib.import_module("memllm_kernels.interpret.coefficients")
    monkeypatch.setattr(coef_mod, "coefficients_of", lambda q, kv: q @ kv.keys.t())
    with pytest.raises(AssertionError, match="differs from the memory FFN's output"):
        coefficients(model, 1)


def test_coefficients_of_a_token_subset_match_the_full_table():
    model = tiny_model()
    full = coefficients(model, 1).coef
    sub = coefficients(model, 1, [5, 0, 299]).coef
    np.testing.assert_allclose(sub, full[[5, 0, 299]], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- access maps
def test_access_map_matches_brute_force_and_finds_a_planted_dead_key():
    model = tiny_model()
    layer, k, dead = 1, 4, 17
    with torch.no_grad():
        model.layers[layer].memory.ffn.w_down.weight[:, dead] = 0  # value 17 is zero: no token can read it
    am = access_map(model, layer, k=k, tokens_per_key=5, chunk_tokens=64)
    co = coefficients(model, layer)
    contrib = co.contributions
    V, K = contrib.shape
    # ||v_i|| from the weights themselves (the identity test checks the coefficients): value i is W_down's column i
    np.testing.assert_allclose(co.value_norms, model.layers[layer].memory.ffn.w_down.weight.detach().norm(dim=0),
                               rtol=1e-6)
    assert am.top_keys.shape == am.top_coef.shape == am.top_contrib.shape == (V, k)
    brute = np.argsort(-contrib, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(np.take_along_axis(contrib, am.top_keys, 1), np.take_along_axis(contrib, brute, 1),
                               rtol=1e-6)
    np.testing.assert_allclose(am.top_coef, np.take_along_axis(co.coef, am.top_keys, 1), rtol=1e-6)
    assert am.utilization.sum() == V * k and am.utilization.shape == (K,)
    np.testing.assert_array_equal(am.utilization, np.bincount(am.top_keys.ravel(), minlength=K))
    # inverted index: the tokens that use each key most
    for key in (0, 3, K - 1):
        want = np.sort(contrib[:, key])[::-1][:5]
        np.testing.assert_allclose([c for _, c in am.tokens_of(key)], want, rtol=1e-6)
        assert contrib[am.tokens_of(key)[0][0], key] == pytest.approx(want[0], rel=1e-6)
    assert dead in am.dead_keys and am.key_max[dead] == 0
    assert am.summary()["dead_keys"] == len(am.dead_keys)
    with pytest.raises(ValueError, match="key 88 is out of range"):
        am.tokens_of(88)


# ---------------------------------------------------------------- clusters
def test_local_clustering_on_a_known_graph():
    # a triangle 0-1-2 plus a pendant node 3 attached to 2
    adj = np.zeros((4, 4), bool)
    for a, b in [(0, 1), (1, 2), (0, 2), (2, 3)]:
        adj[a, b] = adj[b, a] = True
    np.testing.assert_allclose(local_clustering(adj), [1, 1, 1 / 3, 0])


def test_clustering_coefficient_separates_blobs_from_noise():
    rng = np.random.default_rng(0)
    # 20 tight blobs of k + 1 = 11 points: each point's 10 neighbours are its blob, a clique, so C = 1 exactly
    centers = rng.normal(size=(20, 40))
    blobs = np.concatenate([c + 0.05 * rng.normal(size=(11, 40)) for c in centers]).astype(np.float32)
    noise = rng.normal(size=(220, 40)).astype(np.float32)
    cb, cn = clustering_coefficient(blobs, 10), clustering_coefficient(noise, 10)
    assert cb == 1.0 and cn < 0.3
    # shuffling each column across rows destroys the blobs
    assert clustering_coefficient(shuffled_columns(blobs, 0), 10) < 0.3
    adj = knn_graph(blobs, 10)
    assert (adj == adj.T).all() and not adj.diagonal().any() and (adj.sum(1) >= 10).all()


@needs_sklearn
def test_planted_groups_land_in_one_cluster_each():
    """Tokens given identical embeddings have identical coefficient vectors at every layer: one cluster."""
    model = tiny_model()
    groups = [list(range(10, 20)), list(range(100, 115)), list(range(200, 208))]
    with torch.no_grad():
        E = model.tok_embeddings.weight
        for g in groups:
            E[g] = torch.randn(model.config.d_model) * 3
    for layer in range(model.config.n_layer):
        cr = cluster_layer(model, layer, n_clusters=8, sample=120, seed=0, tsne=False)
        for g in groups:
            assert len(set(cr.labels[g])) == 1, (layer, g, cr.labels[g])
        assert len({cr.labels[g[0]] for g in groups}) == 3  # and the groups are told apart
        assert cr.labels.shape == (300,) and cr.centers.shape == (8, model.config.ffn_memory_hidden)
        assert cr.sizes.sum() == 300 and cr.outliers.shape == (300,)
        # a planted group member's nearest neighbours are its group (cosine 1)
        nb = nearest_tokens(model, layer, groups[1][0], n=len(groups[1]) - 1)
        assert {t for t, _ in nb} == set(groups[1][1:]) and min(s for _, s in nb) > 1 - 1e-5


@needs_sklearn
@pytest.mark.parametrize("seed", SEEDS)
def test_clusters_are_deterministic_with_a_seed(seed):
    model = tiny_model()
    counts = np.arange(300)[::-1].copy()
    a = cluster_layer(model, 0, n_clusters=5, sample=80, seed=seed, counts=counts)
    b = cluster_layer(model, 0, n_clusters=5, sample=80, seed=seed, counts=counts)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.sample, b.sample)
    np.testing.assert_array_equal(a.tsne, b.tsne)
    assert a.tsne.shape == (80, 2) and a.clustering_coefficient == b.clustering_coefficient
    assert a.frequent == b.frequent and all(len(v) <= 8 for v in a.frequent.values())
    other = cluster_layer(model, 0, n_clusters=5, sample=80, seed=seed + 10, tsne=False)
    assert not np.array_equal(a.sample, other.sample)


@needs_sklearn
def test_clusters_of_tiny_samples():
    """A sample whose tokens each sit in a cluster of their own has no silhouette (sklearn raises): 0, as for
    one cluster. Too small a sample is refused by name, before K-means runs."""
    model = tiny_model()
    toks = np.arange(10)
    cr = cluster_layer(model, 0, tokens=toks, n_clusters=10, sample=5, seed=0)
    assert len(np.unique(cr.labels[cr.sample])) == 5 and cr.silhouette == 0.0
    assert cr.tsne.shape == (5, 2) and cr.knn == 4
    with pytest.raises(ValueError, match="sample needs at least 5 tokens, got 4"):
        cluster_layer(model, 0, tokens=toks, n_clusters=2, sample=4)
    with pytest.raises(ValueError, match="sample needs at least 2 tokens, got 1"):
        cluster_layer(model, 0, tokens=toks, n_clusters=2, sample=1, tsne=False)


def test_outlier_key_counts_definition():
    K = 100
    flat = np.ones((1, K), np.float32)
    spike = np.ones((1, K), np.float32)
    spike[0, 7] = 100.0  # far above 6 x RMS (RMS ~ 10.4)
    two = np.ones((1, K), np.float32)
    two[0, [1, 2]] = 30.0  # RMS ~ 4.6: both above 6 x RMS
    vn = np.ones(K, np.float32)
    got = outlier_key_counts(np.concatenate([flat, spike, two]), vn)
    np.testing.assert_array_equal(got, [0, 1, 2])
    np.testing.assert_array_equal(outlier_key_counts(np.concatenate([flat, spike, two]) * 1000, vn), got)  # scale-free
    np.testing.assert_array_equal(outlier_key_counts(-spike, vn), [1])  # signs do not matter
    vn2 = vn.copy()
    vn2[3] = 500.0  # a huge value vector makes its key an outlier through its contribution
    assert outlier_key_counts(flat, vn2)[0] == 1
    with pytest.raises(ValueError, match="tau must be > 0"):
        outlier_key_counts(flat, vn, tau=0)


@needs_sklearn
def test_planted_outlier_key_is_counted():
    model = tiny_model()
    base = cluster_layer(model, 1, n_clusters=4, sample=50, tsne=False).outliers
    with torch.no_grad():
        model.layers[1].memory.ffn.w_down.weight[:, 5] *= 200  # value 5 dominates every output
    planted = cluster_layer(model, 1, n_clusters=4, sample=50, tsne=False).outliers
    assert planted.mean() > base.mean() + 0.5


def test_outlier_key_counts_streams_rows():
    """The contributions and their float64 squares of all rows at once peaked at 3x the coefficients (14 GB of
    temporaries at the 1B shape); row chunks keep the peak a fraction of it, with the same counts."""
    import tracemalloc

    rng = np.random.default_rng(0)
    coef = rng.normal(size=(40000, 100)).astype(np.float32)
    coef[::7, 3] = 50.0  # an outlier key in every 7th token
    vn = rng.uniform(0.5, 2, 100).astype(np.float32)
    a = np.abs(coef.astype(np.float64)) * vn
    want = (a > 6 * np.sqrt((a ** 2).mean(1, keepdims=True))).sum(1)  # the definition, in float64 throughout
    tracemalloc.start()
    try:
        got = outlier_key_counts(coef, vn)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, want)
    assert got[::7].min() >= 1 and peak < coef.nbytes, peak / coef.nbytes


@needs_sklearn
def test_set_analyses_refuse_repeated_tokens():
    """A token stream passed as `tokens` made repeats cosine-1 cliques (clustering coefficient 1.0 for 3 tokens x 3)
    and listed one token twice in a key's inverted index and among the nearest tokens."""
    model = tiny_model()
    text = [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for call in (lambda: cluster_layer(model, 0, tokens=text, n_clusters=2, sample=9, tsne=False),
                 lambda: access_map(model, 0, k=2, tokens=[4, 3, 3]),
                 lambda: nearest_tokens(model, 0, 5, tokens=[7, 8, 7])):
        with pytest.raises(ValueError, match="tokens: token id [137] occurs more than once"):
            call()
    am = access_map(model, 0, k=2, tokens=[4, 3], tokens_per_key=2)
    assert all(sorted(am.key_tokens[i]) == [3, 4] for i in range(am.n_keys))
    assert len(memory_lens(model, [3, 3], k=2).tokens) == 2  # a per-token result takes repeats


# ---------------------------------------------------------------- logit lens
@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_memory_lens_matches_brute_force(kind):
    model = tiny_model(kind)
    toks = [3, 77, 250]
    lens = memory_lens(model, toks, k=6, chunk_tokens=2)
    assert lens.layers == [0, 1, "sum"] and lens.top_ids.shape == (3, 3, 6)
    with torch.no_grad():
        rows = [model.layers[l].memory.lookup(model.tok_embeddings.weight[toks]) for l in range(2)]
        for j, r in enumerate(rows + [rows[0] + rows[1]]):
            logits = model.output(model.norm(r))
            np.testing.assert_allclose(lens.top_logits[:, j], logits.topk(6).values.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(lens.top_ids[:, j], logits.topk(6).indices.numpy())  # the tokens, too


def test_planted_promotion_is_found_by_the_lens_and_the_bigram_check():
    """Point the LM head row of token 9 along token 4's layer-1 memory: the lens says 4 promotes 9."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(20, 300, 6000)
    ids[::10] = 4
    ids[1::10] = 9  # 4 is always followed by 9
    toks, succ = top_successors(ids, 300, min_count=20)
    assert succ[list(toks).index(4)] == 9
    before = bigram_agreement(model, ids, [1], k=1, min_count=20)
    assert memory_lens(model, [4], [1], k=1, include_sum=False).promoted(4, 1)[0][0] != 9
    with torch.no_grad():
        r = memory_rows(model, [4], 1)[0]
        model.output.weight[9] = 5 * r / r.norm()
    assert memory_lens(model, [4], [1], k=1, include_sum=False).promoted(4, 1)[0][0] == 9
    ba = bigram_agreement(model, ids, [1], k=1, min_count=20)
    assert ba.successor[list(ba.tokens).index(4)] == 9 and set(ba.hit) == {1, "sum"}
    # token 4 is now a hit; no other token's top successor is 9, so it is the only change that can add one
    assert ba.hit[1] >= before.hit[1] + 1 / len(ba.tokens) - 1e-12


# ---------------------------------------------------------------- sweeps
def _ids(n=2000, seed=0):
    return np.random.default_rng(seed).integers(0, 300, n)


def test_memory_rows_of_a_mapped_tol_check_its_file(tmp_path):
    """memory_rows read a table that load_tol mapped without the model's check of its file: a file truncated under
    it was a SIGBUS, not an error. A file written in place (its modification time moved) now raises OSError."""
    import os

    from memllm_kernels.model.tol import load_tol, precompute_tol

    model = tiny_model()
    path = tmp_path / "tol.safetensors"
    precompute_tol(model, path, progress=False)
    swap_ffn_for_tol(model, load_tol(path, model, mmap=True), backend="reference")
    before = memory_rows(model, [1, 2], 1)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(OSError, match="was written while mapped"):
        memory_rows(model, [1, 2], 1)
    assert before.shape == (2, model.config.d_model)


def test_layer_sweep_uses_the_models_memory_knob_and_restores_it():
    model = tiny_model()
    ids = _ids()
    sw = layer_drop_sweep(model, ids, 32, max_tokens=640)
    assert sw.what == "memory" and [p[0] for p in sw.points] == [0, 1] and sw.tokens == 640
    for layer, loss, ppl in sw.points:
        model.set_memory_scale(1.0, [layer])
        assert loss == pytest.approx(evaluate(model, ids, 32, max_tokens=640)["loss"], rel=1e-6)
        assert ppl == pytest.approx(math.exp(loss)) and loss != pytest.approx(sw.baseline[0], rel=1e-6)
        model.set_memory_scale(1.0)
    with memory_scale(model, 0.3, [1]):
        assert [m.scale for m in model.memory_modules()] == [0.3, 0.0]
    assert [m.scale for m in model.memory_modules()] == [1.0, 1.0]


def test_layer_sweep_baseline_is_at_alpha_1():
    """The points drop one layer at alpha 1; the baseline was measured at whatever scale the model was left at
    (alpha 0.5 here), so 'ppl / baseline' compared two alphas. The model's scales are restored afterwards."""
    model = tiny_model()
    ids = _ids()
    ref = evaluate(model, ids, 32, max_tokens=640)["loss"]
    model.set_memory_scale(0.5)
    assert evaluate(model, ids, 32, max_tokens=640)["loss"] != pytest.approx(ref, rel=1e-6)
    sw = layer_drop_sweep(model, ids, 32, layers=[0], max_tokens=640)
    assert sw.baseline[0] == pytest.approx(ref, rel=1e-6)
    assert [m.scale for m in model.memory_modules()] == [0.5, 0.5]


def test_alpha_sweep_endpoints():
    model = tiny_model()
    ids = _ids()
    al = alpha_sweep(model, ids, 32, alphas=[1.0, 0.5, 0.0], max_tokens=640)
    assert [p[0] for p in al.points] == [1.0, 0.5, 0.0] and al.points[0][1] == al.baseline[0]
    assert al.baseline[0] == pytest.approx(evaluate(model, ids, 32, max_tokens=640)["loss"], rel=1e-6)
    model.set_memory_scale(1.0, [0, 1])  # alpha 0 is every layer's memory dropped
    assert al.points[2][1] == pytest.approx(evaluate(model, ids, 32, max_tokens=640)["loss"], rel=1e-6)
    model.set_memory_scale(0.5)
    assert al.points[1][1] == pytest.approx(evaluate(model, ids, 32, max_tokens=640)["loss"], rel=1e-6)


def test_dense_layer_sweep_drops_the_ffn():
    model = tiny_model("dense")
    ids = _ids()
    before = evaluate(model, ids, 32, max_tokens=640)["loss"]
    sw = layer_drop_sweep(model, ids, 32, max_tokens=640)
    assert sw.what == "ffn" and sw.baseline[0] == pytest.approx(before)
    with dropped_ffn(model, 1):
        assert model.layers[1].ffn is None
        assert evaluate(model, ids, 32, max_tokens=640)["loss"] == pytest.approx(sw.points[1][1], rel=1e-6)
    assert model.layers[1].ffn is not None and evaluate(model, ids, 32, max_tokens=640)["loss"] == before
    assert all(p[1] != pytest.approx(before, rel=1e-6) for p in sw.points)
    with pytest.raises(ValueError, match="has no context FFN"):
        with dropped_ffn(tiny_model("memoryllm"), 0):
            pass


# ---------------------------------------------------------------- edits
def test_suppressing_a_key_removes_exactly_its_term():
    model = tiny_model()
    layer, keys = 1, [3, 40]
    E = model.tok_embeddings.weight
    mem = model.layers[layer].memory
    with torch.no_grad():
        before = mem.lookup(E).clone()
        w_before = mem.ffn.w_down.weight.clone()
    co = coefficients(model, layer)
    kv = key_value_weights(model, layer)
    removed = torch.from_numpy(co.coef[:, keys]) @ kv.values[keys]
    with suppressed_keys(model, layer, keys), torch.no_grad():
        after = mem.lookup(E)
        torch.testing.assert_close(after, before - removed, atol=EDIT_ATOL, rtol=0)
        assert (after - before).abs().max() > 100 * EDIT_ATOL  # the edit did something
        other = model.layers[0].memory.lookup(E)  # another layer is untouched
    assert torch.equal(mem.ffn.w_down.weight, w_before)  # restored bit for bit
    with torch.no_grad():
        assert torch.equal(other, model.layers[0].memory.lookup(E))
    with pytest.raises(IndexError, match=r"keys: key 88 is outside layer 1's keys \[0, 88\)"):
        with suppressed_keys(model, layer, [88]):
            pass


@pytest.mark.parametrize("swapped", [False, True], ids=["ffn", "tol"])
def test_row_edit_changes_exactly_the_token_and_what_follows(swapped):
    model = tiny_model()
    if swapped:  # the same edit on a model whose memory FFNs are ToLs
        table = torch.cat(list(iter_tol_chunks(model, 128)))
        swap_ffn_for_tol(model, table, backend="reference")
    tok, src = 7, 123
    ids = torch.from_numpy(_ids(2 * 40, 3).reshape(2, 40))
    ids[ids == tok] = tok + 1
    ids[0, 25], ids[1, 5] = tok, tok
    ids[0, 30], ids[1, 30] = 8, 9
    first = [25, 5]
    with torch.no_grad():
        base = model(ids)
        rows_src = [memory_rows(model, [src], l)[0] for l in range(2)]
        rows_other = [memory_rows(model, [8, 9], l) for l in range(2)]
    with edited_rows(model, copy_token_rows(model, tok, src)), torch.no_grad():
        edited = model(ids)
        x0 = model.tok_embeddings(ids)
        for l in range(2):
            term = model.layers[l].memory(torch.zeros_like(x0), x0, ids)  # the memory term alone
            torch.testing.assert_close(term[0, 25], rows_src[l], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(term[0, 30], rows_other[l][0], atol=1e-6, rtol=1e-6)  # other tokens: as before
            torch.testing.assert_close(term[1, 30], rows_other[l][1], atol=1e-6, rtol=1e-6)
    for b in range(2):
        assert torch.equal(edited[b, :first[b]], base[b, :first[b]])  # causal: nothing before the token moves
        assert not torch.allclose(edited[b, first[b]], base[b, first[b]])
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # restored
    assert all(type(b.memory).__name__ != "RowOverride" for b in model.layers)


def test_edit_effect_measures_the_edit():
    model = tiny_model()
    ids = _ids(3000, 5)
    tok = int(np.bincount(ids).argmax())
    eff = edit_effect(model, ids, lambda: edited_rows(model, suppress_token_rows(model, tok)), seq_len=32,
                      focus=[tok], max_tokens=1280, description="zero")
    s = eff.summary()
    assert s["positions"] == 1280 and s["focus_positions"] == int((eff.inputs == tok).sum()) > 0
    assert s["max_abs_delta_unreached"] == 0.0 and s["unreached_positions"] > 0
    assert abs(s["mean_delta_at_focus"]) > 1e-4
    assert eff.dprob_focus.shape == (300,) and abs(eff.dprob_focus.sum()) < 1e-5  # probabilities still sum to 1
    # the per-position scoring agrees with the model's own evaluate()
    assert eff.base_loss.mean() == pytest.approx(evaluate(model, ids, 32, max_tokens=1280)["loss"], rel=1e-5)
    # an edit of a token absent from the text changes nothing
    absent = int(np.setdiff1d(np.arange(300), ids)[0])
    none = edit_effect(model, ids, lambda: edited_rows(model, suppress_token_rows(model, absent)), seq_len=32,
                       focus=[absent], max_tokens=640)
    assert np.array_equal(none.base_loss, none.edited_loss) and not none.reached.any()
    with pytest.raises(ValueError, match="no focus token"):
        edit_effect(model, ids, lambda: edited_rows(model, suppress_token_rows(model, absent)), seq_len=32,
                    focus=[absent], windows="focus")


def test_edit_effect_frees_the_base_pass_before_the_edit():
    """The base pass's [B, T, V] log-probabilities stayed alive through the edited pass (16.8 GB a block at the 1B
    shape, batch 16 x 2,048); now only its losses and focus sums are kept. And a batch whose logits cannot fit is
    refused before the first forward, as evaluate() refuses it."""
    import gc

    from memllm_kernels.model import train as train_mod

    model = tiny_model()
    ids = _ids(3000, 5)
    tok = int(np.bincount(ids).argmax())
    alive = []

    def edit():
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.shape == (4, 32, 300)))
        return edited_rows(model, suppress_token_rows(model, tok))
    eff = edit_effect(model, ids, edit, seq_len=32, focus=[tok], max_tokens=256, batch_size=4)
    assert alive == [0, 0] and eff.summary()["focus_positions"] > 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "mem_available", lambda: 1000)
        with pytest.raises(ValueError, match="a batch of 4 x 32 tokens needs at least"):
            edit_effect(model, ids, edit, seq_len=32, max_tokens=256, batch_size=4)


def test_edit_effect_focus_windows_find_a_late_token():
    """windows='focus' scores the windows that hold the edited token, wherever they are in the text."""
    model = tiny_model()
    ids = _ids(3200, 6)
    tok = 299
    ids[ids == tok] = 298
    ids[[2500, 2900, 3100]] = tok  # only late in the text, in three different 32-token windows
    edit = lambda: edited_rows(model, suppress_token_rows(model, tok))  # noqa: E731
    first = edit_effect(model, ids, edit, seq_len=32, focus=[tok], max_tokens=640)
    assert first.summary()["focus_positions"] == 0 and np.array_equal(first.base_loss, first.edited_loss)
    eff = edit_effect(model, ids, edit, seq_len=32, focus=[tok], max_tokens=640, windows="focus")
    s = eff.summary()
    assert s["positions"] == 3 * 32 and s["focus_positions"] == 3 and s["max_abs_delta_unreached"] == 0.0
    assert np.abs(eff.delta[eff.reached]).max() > 0


@pytest.mark.parametrize("swapped", [False, True], ids=["ffn", "tol"])
def test_edits_nest_and_readers_see_the_edited_rows(swapped):
    """Nested edited_rows failed ('RowOverride' object has no attribute 'store'), as did memory_lens inside a
    block: memory_rows now gives the rows the model reads, a nested edit replaces the outer edit's rows, and
    the analyses that read the FFN weights refuse an edited layer in one line (they said 'swapped for a ToL')."""
    model = tiny_model()
    if swapped:
        swap_ffn_for_tol(model, torch.cat(list(iter_tol_chunks(model, 128))), backend="reference")
    tok, other, src, d = 7, 8, 123, model.config.d_model
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # noqa: E731
    orig = memory_rows(model, [tok, other], 0)
    r1, r2 = torch.full((d,), 0.5), torch.full((d,), -2.0)
    ids = torch.tensor([[tok, other, 3]])
    with edited_rows(model, {(tok, 0): r1}):
        close(memory_rows(model, [tok, other], 0), torch.stack([r1, orig[1]]))
        with edited_rows(model, {(tok, 0): r2, (other, 0): torch.zeros(d)}), torch.no_grad():
            close(memory_rows(model, [tok, other], 0), torch.stack([r2, torch.zeros(d)]))
            x0 = model.tok_embeddings(ids)
            term = model.layers[0].memory(torch.zeros_like(x0), x0, ids)[0]  # what the model adds
            close(term[:2], torch.stack([r2, torch.zeros(d)]))
        close(memory_rows(model, [tok, other], 0), torch.stack([r1, orig[1]]))  # the outer edit again
        for call in (lambda: coefficients(model, 0), lambda: access_map(model, 0),
                     lambda: suppressed_keys(model, 0, [1]).__enter__()):
            with pytest.raises(ValueError, match="layer 0's memory is being edited .* outside the edited_rows"):
                call()
    close(memory_rows(model, [tok, other], 0), orig)
    # the lens inside a copy edit reads the source's rows
    ref = memory_lens(model, [src], k=3)
    with edited_rows(model, copy_token_rows(model, tok, src)):
        np.testing.assert_array_equal(memory_lens(model, [tok], k=3).top_ids, ref.top_ids)
        np.testing.assert_allclose(memory_lens(model, [tok], k=3).top_logits, ref.top_logits, rtol=1e-5, atol=1e-5)
    assert all(type(b.memory).__name__ != "RowOverride" for b in model.layers)


def test_a_memory_module_of_another_kind_is_refused():
    """A memory module the toolkit cannot read (an offload engine's, here a stand-in) got an AttributeError."""
    model = tiny_model()
    model.layers[1].memory = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"layer 1's memory module \(Identity\) is neither a MemoryFFN nor a ToL"):
        memory_rows(model, [3], 1)
    with pytest.raises(ValueError, match=r"layer 1's memory module \(Identity\) is not a MemoryFFN"):
        coefficients(model, 1)


# ---------------------------------------------------------------- bad arguments
def test_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"layer 2 is out of range: test-tiny has 2 layers \(0..1\)"):
        coefficients(model, 2)
    with pytest.raises(ValueError, match="layer -1 is out of range"):
        access_map(model, -1)
    with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \[0, 300\)"):
        memory_lens(model, [300])
    with pytest.raises(ValueError, match="k must be in"):
        access_map(model, 0, k=0)
    with pytest.raises(ValueError, match="n_clusters must be in"):
        kmeans(normalise_rows(np.ones((5, 3))), 9)
    dense = tiny_model("dense")
    for call in (lambda: coefficients(dense, 0), lambda: access_map(dense, 0), lambda: memory_lens(dense, [1]),
                 lambda: alpha_sweep(dense, _ids(), 32), lambda: edited_rows(dense, {(1, 0): torch.zeros(32)}).__enter__()):
        with pytest.raises(ValueError, match="is a dense model .*no memory FFNs to analyse"):
            call()
    table = torch.cat(list(iter_tol_chunks(model, 300)))
    swap_ffn_for_tol(model, table, backend="reference")
    with pytest.raises(ValueError, match="swapped for a ToL"):
        coefficients(model, 0)
    assert memory_lens(model, [1], k=2).top_ids.shape == (1, 3, 2)  # the lens reads ToL rows directly


def test_ids_are_checked_where_they_enter():
    """Float ids were truncated (key 1.7 suppressed key 1, a float text scored as ids), out-of-range ids failed
    deep inside torch ('Target 300 is out of bounds', 'index out of range in self') and an empty token list was
    refused as a float64 dtype: now TypeError, or an IndexError (also a ValueError, as before) naming the
    argument and the range, and the empty list reaches the 'no tokens' error."""
    model = tiny_model()
    edit = lambda: suppressed_keys(model, 1, [3])  # noqa: E731
    with pytest.raises(ValueError, match="no tokens to analyse"):
        coefficients(model, 1, [])
    with pytest.raises(ValueError, match="no tokens to analyse"):  # the lens returned an empty result
        memory_lens(model, [])
    w = model.layers[1].memory.ffn.w_down.weight.clone()
    for bad, err, msg in (([1.7], TypeError, "keys: keys must be integers, got dtype float64"),
                          ([5, -1], IndexError, r"keys: key -1 is outside layer 1's keys \[0, 88\) \(at position 1\)")):
        with pytest.raises(err, match=msg):
            suppressed_keys(model, 1, bad).__enter__()
    assert torch.equal(model.layers[1].memory.ffn.w_down.weight, w)  # nothing was scaled
    floats, past = _ids().astype(float), np.r_[_ids(), 300]
    past_msg = r"ids: token id 300 is outside the vocabulary \[0, 300\) \(at position 2000\)"
    for call in (lambda t: layer_drop_sweep(model, t, 32, max_tokens=64),
                 lambda t: alpha_sweep(model, t, 32, alphas=[0.5], max_tokens=64),
                 lambda t: edit_effect(model, t, edit, seq_len=32, max_tokens=64),
                 lambda t: bigram_agreement(model, t, min_count=5)):
        with pytest.raises(TypeError, match="ids: token ids must be integers, got dtype float64"):
            call(floats)
        with pytest.raises(IndexError, match=past_msg):
            call(past)
    with pytest.raises(ValueError, match="ids must be a 1-D sequence"):
        layer_drop_sweep(model, _ids().reshape(2, -1), 32)
    for call, name in ((lambda t: memory_lens(model, t), "tokens"), (lambda t: nearest_tokens(model, 1, t[0]), "token"),
                       (lambda t: suppress_token_rows(model, t[0]), "token"),
                       (lambda t: copy_token_rows(model, 3, t[0]), "source"),
                       (lambda t: edited_rows(model, {(t[0], 0): torch.zeros(32)}).__enter__(), "rows"),
                       (lambda t: edit_effect(model, _ids(), edit, seq_len=32, focus=t), "focus")):
        with pytest.raises(TypeError, match=f"{name}: token ids must be integers"):
            call([1.7])
        with pytest.raises(IndexError, match=rf"{name}: token id -1 is outside the vocabulary \[0, 300\)"):
            call([-1])
        with pytest.raises(ValueError, match=rf"{name}: token id 300 is outside"):  # a ValueError, as before
            call([300])
    # ints of any integer type still pass
    assert suppress_token_rows(model, np.int16(7), [0]).keys() == {(7, 0)}
    assert memory_lens(model, torch.tensor([1, 2], dtype=torch.int32), k=2).tokens.tolist() == [1, 2]


@pytest.mark.parametrize("call, message", [
    (lambda m: memory_lens(m, [1], chunk_tokens=0), "chunk_tokens must be >= 1, got 0"),
    (lambda m: memory_lens(m, [1], k=2.5), "k must be an int"),
    (lambda m: coefficients(m, 1, chunk_tokens=1.5), "chunk_tokens must be an int"),
    (lambda m: access_map(m, 1, chunk_tokens=64.0), "chunk_tokens must be an int"),
    (lambda m: access_map(m, 1, tokens_per_key=2.5), "tokens_per_key must be an int"),
    (lambda m: access_map(m, 1, tokens_per_key=0), "tokens_per_key must be >= 1"),
    (lambda m: access_map(m, 1, k=2.0), "k must be an int"),
    (lambda m: edit_effect(m, _ids(), lambda: suppressed_keys(m, 1, [3]), seq_len=32, batch_size=0),
     "batch_size must be >= 1, got 0"),
    (lambda m: edit_effect(m, _ids(), lambda: suppressed_keys(m, 1, [3]), seq_len=32.0), "seq_len must be an int"),
    (lambda m: layer_drop_sweep(m, _ids(), 32, batch_size=2.5), "batch_size must be an int"),
    (lambda m: cluster_layer(m, 1, counts=np.ones(5), tsne=False), r"counts must be \[V\] = \[300\]"),
    (lambda m: cluster_layer(m, 1, knn=2.5, tsne=False), "knn must be an int"),
    (lambda m: cluster_layer(m, 1, n_clusters=2.5, tsne=False), "n_clusters must be an int"),
    (lambda m: cluster_layer(m, 1, outlier_tau=float("nan"), tsne=False), "tau must be > 0 and finite, got nan"),
    (lambda m: outlier_key_counts(np.ones((2, 3)), np.ones(3), float("inf")), "tau must be > 0 and finite"),
    (lambda m: nearest_tokens(m, 1, 3, n=-1), "n must be >= 1, got -1"),
    (lambda m: nearest_tokens(m, 1, 3, n=2.5), "n must be an int"),
    (lambda m: knn_graph(np.ones((5, 3)), 2.0), "k must be an int"),
    (lambda m: knn_graph(np.ones((5, 3)), 5), r"k must be in \[1, 4\] for 5 tokens, got 5"),
    (lambda m: suppressed_keys(m, 1, [3], scale=float("nan")).__enter__(), "scale must be a finite number, got nan"),
    (lambda m: bigram_agreement(m, _ids(), min_count=2.5), "min_count must be an int"),
])
def test_options_are_checked_before_any_work(call, message):
    """Each was accepted (tau NaN counted no outlier) or failed inside range(), topk, sklearn or numpy indexing
    ('range() arg 3 must not be zero', 'selected index k out of range', a raw IndexError of counts)."""
    with pytest.raises((TypeError, ValueError), match=message):
        call(tiny_model())


class _Tok:
    """A stand-in tokenizer: ' king', 'king' and 'dom' are single tokens; everything else is per character."""

    vocab = {" king": 10, "king": 11, "dom": 12}

    def encode(self, s):
        if s in self.vocab:
            return [self.vocab[s]]
        if s.endswith("dom") and s[:-3] in self.vocab:
            return [self.vocab[s[:-3]], 12]
        return [100 + ord(c) % 100 for c in s]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv.get(i, "?") for i in ids)


def test_resolve_token():
    tok = _Tok()
    assert resolve_token(tok, "king", 300)[0] == 10  # the word form wins
    assert resolve_token(tok, " king", 300)[0] == 10
    assert resolve_token(tok, "#11", 300) == (11, "raw id 11")
    # the hint names the one way to pick the other token: a shell strips quotes and "'king'" is three tokens
    assert resolve_token(tok, "king", 300)[1] == "' king' is token 10 (also 'king' = 11; pass --token '#11' to pick it)"
    assert "pass --edit-token '#11' to pick it" in resolve_token(tok, "king", 300, "--edit-token")[1]
    with pytest.raises(ValueError, match=r"unknown token 'kingdom': .*\['king', 'dom'\]"):
        resolve_token(tok, "kingdom", 300)
    with pytest.raises(ValueError, match=r"token id 999 is outside the vocabulary \[0, 300\)"):
        resolve_token(tok, "#999", 300)
    with pytest.raises(ValueError, match="no tokenizer"):
        resolve_token(None, "king", 300)


class _WordTok:
    """A stand-in tokenizer with the single tokens of `vocab`; everything else is per character."""

    def __init__(self, vocab: dict):
        self.vocab = vocab

    def encode(self, s):
        return [self.vocab[s]] if s in self.vocab else [100 + ord(c) % 100 for c in s]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv.get(i, "?") for i in ids)


def test_default_edit_pair_needs_both_space_prefixed_words():
    """' king' / ' queen' are the default pair only when both are single tokens: the word piece 'queen' was taken
    for ' queen'. A given --edit-source alone gets an edit token that differs from it (it got ' king' itself)."""
    from pathlib import Path

    from memllm_kernels.interpret import RunHandle
    from memllm_kernels.interpret.report import _pick_edit_tokens

    words = {" king": 10, "queen": 12, " lord": 13, " lady": 14}  # no ' queen'
    counts = np.zeros(300, np.int64)
    counts[[13, 14, 12, 10]] = [50, 40, 30, 20]
    model = tiny_model()
    pick = lambda vocab, *given: _pick_edit_tokens(RunHandle(model, {}, _WordTok(vocab), Path(".")),  # noqa: E731
                                                   counts, *given)[:2]
    assert pick(words, None, None) == (13, 14)  # the two most frequent words
    assert pick(words, None, " lord") == (14, 13) and pick(words, " lady", None) == (14, 13)
    both = {**words, " queen": 15}
    assert pick(both, None, None) == (10, 15)
    assert pick(both, None, "king") == (15, 10)


# ---------------------------------------------------------------- the `inspect` command on trained runs
def _train_runs(root, line, kinds):
    """Runs of each kind trained for 20 steps on six works of 150 lines line(rng) (8 tokens and a full stop),
    in root/<kind>."""
    from memllm_kernels.model.train import TrainConfig, train

    rng = np.random.default_rng(0)
    text = root / "text"
    text.mkdir()
    for i in range(6):
        (text / f"w{i}.txt").write_text("\n".join(" ".join(line(rng)) + "." for _ in range(150)) + "\n")
    tc = TrainConfig(steps=20, batch_size=8, seq_len=32, tokenizer="bpe-320", text=str(text), eval_every=0, warmup=5,
                     lr=3e-3)
    for kind in kinds:
        train(root / kind, ModelConfig(kind=kind, **{**TINY, "name": f"t-{kind}"}), tc, progress=False,
              log=lambda *a: None)
    return {kind: root / kind for kind in kinds}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs trained for 20 steps on a synthetic text: a MemoryLLM and a dense one (same data)."""
    root = tmp_path_factory.mktemp("interpret")
    words = "the king queen lord lady sword crown night day love death fair foul speak hear go come".split()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMLLM_CACHE", str(root / "cache"))
        yield _train_runs(root, lambda rng: rng.choice(words, 8), ("memoryllm", "dense")), mp


def _inspect(*argv):
    from memllm_kernels.interpret.cli import build_parser, main

    return main(build_parser().parse_args(["inspect", *argv]))


def _no_analyses(monkeypatch, *also):
    """Make every analysis of the report (and the functions named in `also`) fail the test: for errors that
    must come before any of them."""
    report = importlib.import_module("memllm_kernels.interpret.report")

    def ran(*a, **kw):
        raise AssertionError("an analysis ran before the error")
    for name in ("check_decomposition", "access_map", "cluster_layer", "bigram_agreement", "layer_drop_sweep",
                 "edit_effect", *also):
        monkeypatch.setattr(report, name, ran)


def test_inspect_help_lists_the_arguments(capsys):
    from memllm_kernels.interpret.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: memllm inspect")
    for opt in ("--layer", "--out", "--force", "--token", "--dense", "--seed", "--tsne-sample", "--skip"):
        assert opt in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["inspect", "RUN", "--skip", "nonsense"])
    assert "unknown section" in capsys.readouterr().err


def test_inspect_help_matches_the_docs():
    """Every option is in docs/interpret.md, and every option with a default names it in --help."""
    import argparse
    from pathlib import Path

    from memllm_kernels.interpret.cli import add_parser

    p = add_parser(argparse.ArgumentParser().add_subparsers())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "interpret.md").read_text()
    for a in p._actions:
        if not a.option_strings or a.dest == "help":
            continue
        assert a.option_strings[-1] in docs, a.option_strings
        if a.default not in (None, False):
            assert "default" in a.help, a.option_strings
    assert "two most frequent word tokens" in docs
    assert "most frequent word token" in " ".join(p.format_help().split())  # (argparse wraps the help's lines)


@pytest.mark.parametrize("argv, message", [
    (["--tsne-sample", "1"], "--tsne-sample: expected an integer >= 5, got 1"),
    (["--tsne-sample", "4"], "--tsne-sample: expected an integer >= 5, got 4"),
    (["--clusters", "1"], "--clusters: expected an integer >= 2, got 1"),
    (["--threads", "-1"], "--threads: expected a positive integer up to 1,024, got -1"),
    (["--outlier-tau", "0"], "--outlier-tau: expected a positive number, got 0"),
    (["--seed", "-1"], "--seed: expected a non-negative integer up to 4,294,967,295, got -1"),  # sklearn's range
    (["--seed", str(2**33)], "--seed: expected a non-negative integer up to 4,294,967,295, got 8589934592"),
    (["--device", "bogus"], "unknown device 'bogus'"),
])
def test_inspect_parser_refuses_bad_numbers(capsys, argv, message):
    from memllm_kernels.interpret.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["inspect", "RUN", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@needs_train_deps
def test_inspect_writes_the_report(runs, tmp_path, capsys):
    paths, _ = runs
    out = tmp_path / "rep"
    rc = _inspect(str(paths["memoryllm"]), "--out", str(out), "--dense", str(paths["dense"]), "--tsne-sample", "60",
                  "--clusters", "4", "--eval-tokens", "640", "--no-progress")
    assert rc == 0, capsys.readouterr().err
    md = (out / "report.md").read_text()
    for head in ("## 1. The key-value decomposition", "## 2. Access maps", "## 3. Clusters", "## 4. Logit lens",
                 "## 5. Sweeps", "## 6. Memory edits"):
        assert head in md
    assert "t-dense (FFN)" in md and "t-memoryllm (memory)" in md
    for png in ("access_l0.png", "access_l1.png", "tsne_l0.png", "tsne_l1.png", "layers_clusters_outliers.png",
                "lens_bigram.png", "sweep_layers.png", "sweep_alpha.png", "edit_suppress_token.png",
                "edit_suppress_key.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    res = json.loads((out / "report.json").read_text())
    assert all(r["ok"] for r in res["identity"]) and len(res["clusters"]) == 2
    assert res["edits"]["suppress_token"]["max_abs_delta_unreached"] == 0.0
    assert [p["at"] for p in res["sweeps"]["alpha"]["points"]] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    # the files the overwrite check looks for are exactly those written
    assert sorted(f.name for f in out.iterdir()) == sorted(report_files([0, 1]))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    rc = _inspect(str(paths["memoryllm"]), "--out", str(out), "--no-progress")  # the same folder again
    assert rc == 2
    assert (f"memllm inspect: error: {out} already has report.md, report.json, access_l0.png, access_l1.png and 8 "
            "more; pass --force to overwrite them") in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # --layer restricts the per-layer analyses; the sweep still covers every layer
    out1 = tmp_path / "rep1"
    rc = _inspect(str(paths["memoryllm"]), "--layer", "1", "--out", str(out1), "--skip", "clusters,edits",
                  "--eval-tokens", "320", "--no-progress")
    assert rc == 0
    res1 = json.loads((out1 / "report.json").read_text())
    assert [r["layer"] for r in res1["identity"]] == [1] and len(res1["sweeps"]["layers"][0]["points"]) == 2
    assert not (out1 / "access_l0.png").exists() and "clusters" not in res1


@needs_train_deps
def test_inspect_refuses_to_overwrite_without_force(runs, tmp_path, capsys, monkeypatch):
    """Files a report or --token would write are named and kept, before any analysis runs; --force
    overwrites them; other files in the folder do not count."""
    paths, _ = runs
    run = str(paths["memoryllm"])
    quick = ["--skip", "identity,access,clusters,lens,sweeps,edits", "--no-progress"]  # report.md + report.json
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _inspect(run, "--out", str(out), *quick) == 0
    (out / "report.md").write_text("mine")
    (out / "token.md").write_text("mine")
    capsys.readouterr()
    with monkeypatch.context() as mp:
        _no_analyses(mp, "token_report")
        assert _inspect(run, "--out", str(out), "--no-progress") == 2
        err = capsys.readouterr().err
        assert err == (f"memllm inspect: error: {out} already has report.md, report.json; pass --force to "
                       "overwrite them\n")
        assert _inspect(run, "--token", "king", "--out", str(out), "--no-progress") == 2
        err = capsys.readouterr().err
        assert err == f"memllm inspect: error: {out} already has token.md; pass --force to overwrite it\n"
    assert (out / "report.md").read_text() == (out / "token.md").read_text() == "mine"
    assert _inspect(run, "--out", str(out), "--force", *quick) == 0
    assert _inspect(run, "--token", "king", "--out", str(out), "--force", "--no-progress") == 0
    assert (out / "report.md").read_text().startswith("# Memory inspection")
    assert "promoted next tokens" in (out / "token.md").read_text()
    assert (out / "notes.txt").read_text() == "mine"


@needs_train_deps
def test_inspect_small_tsne_sample(runs, tmp_path, capsys):
    """The smallest --tsne-sample the help allows runs through, and the report names the k-NN graph it used
    (--knn 10 lowered to 4)."""
    paths, _ = runs
    out = tmp_path / "rep"
    rc = _inspect(str(paths["memoryllm"]), "--out", str(out), "--tsne-sample", "5", "--skip",
                  "identity,access,lens,sweeps,edits", "--no-progress")
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "report.json").read_text())
    assert [c["sample"] for c in res["clusters"]] == [5, 5] and [c["knn"] for c in res["clusters"]] == [4, 4]
    assert "the 4-NN cosine graph" in (out / "report.md").read_text()


@needs_train_deps
def test_inspect_one_token(runs, capsys):
    paths, _ = runs
    rc = _inspect(str(paths["memoryllm"]), "--token", "king", "--no-progress")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "' king'" in out and "promoted next tokens" in out and "nearest 10 tokens" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("| 0 |") or ln.startswith("| 1 |")]) == 2


@needs_train_deps
@pytest.mark.parametrize("argv, message", [
    (["--layer", "2"], "layer 2 is out of range"),
    (["--token", "zzzqqq"], "unknown token 'zzzqqq'"),
    (["--token", "#99999"], "outside the vocabulary"),
    (["--edit-token", "zzzqqq", "--skip", "identity,access,clusters,lens,sweeps"], "unknown token 'zzzqqq'"),
    (["--edit-source", "zzzqqq"], "unknown token 'zzzqqq'"),
    (["--clusters", "2000"], "--clusters 2000: K-means needs 2 to"),
    (["--top-k", "100000"], "--top-k 100000: the access maps rank the"),
    (["--knn", "100000"], "--knn 100000: the clustering coefficient's graph links each of the"),
    (["--edit-token", "king", "--edit-source", "king"], "--edit-source names the edit token itself"),
    (["--token", "king", "--top-k", "1000"], "--top-k 1000: the token view lists its top keys"),  # named `k`
])
def test_inspect_bad_arguments(runs, capsys, monkeypatch, argv, message):
    paths, _ = runs
    _no_analyses(monkeypatch)  # refused before minutes of analyses
    assert _inspect(str(paths["memoryllm"]), "--no-progress", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("memllm inspect: error:") and message in err


@needs_train_deps
def test_inspect_refuses_dense_and_missing_runs(runs, tmp_path, capsys):
    paths, _ = runs
    assert _inspect(str(paths["dense"]), "--no-progress") == 2
    assert "is a dense model" in capsys.readouterr().err
    assert _inspect(str(paths["dense"]), "--token", "king", "--no-progress") == 2
    assert "is a dense model" in capsys.readouterr().err
    assert _inspect(str(tmp_path / "nope"), "--no-progress") == 2
    assert "does not exist" in capsys.readouterr().err


@needs_train_deps
def test_inspect_checks_the_edits_and_the_dense_run_first(runs, tmp_path, capsys, monkeypatch):
    """These were refused only after the other analyses, whose PNGs then blocked a rerun without --force: an edit
    token absent from the validation windows, --eval-tokens below seq_len (the message named max_tokens), a
    --dense run whose text is gone."""
    import shutil

    from memllm_kernels.interpret import open_run

    paths, _ = runs
    run = str(paths["memoryllm"])
    h = open_run(run)
    absent = int(np.setdiff1d(np.arange(h.model.config.vocab_size), h.token_ids("val"))[0])
    dense = tmp_path / "dense"
    shutil.copytree(paths["dense"], dense)
    cfg = json.loads((dense / "config.json").read_text())
    cfg["train"]["text"] = str(tmp_path / "gone")
    (dense / "config.json").write_text(json.dumps(cfg))
    _no_analyses(monkeypatch)
    out = tmp_path / "rep"
    for argv, message in ((["--edit-token", f"#{absent}"], f"(id {absent}) does not occur in the"),
                          (["--eval-tokens", "31"], "--eval-tokens 31: the edits score windows of the run's 32 tokens"),
                          (["--dense", str(dense)], f"--dense {dense}: cannot read its validation text")):
        assert _inspect(run, "--out", str(out), "--no-progress", *argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("memllm inspect: error:") and message in err, err
        assert not out.exists()  # nothing written that a rerun would have to --force


@needs_train_deps
def test_inspect_one_token_uses_outlier_tau(runs, capsys, monkeypatch):
    """--outlier-tau was ignored with --token: the token view always counted outlier keys at tau 6."""
    from memllm_kernels.interpret.clusters import DEFAULT_OUTLIER_TAU

    report = importlib.import_module("memllm_kernels.interpret.report")
    real, taus = report.outlier_key_counts, []

    def spy(coef, value_norms, tau=DEFAULT_OUTLIER_TAU):
        taus.append(tau)
        return real(coef, value_norms, tau)
    monkeypatch.setattr(report, "outlier_key_counts", spy)
    paths, _ = runs
    assert _inspect(str(paths["memoryllm"]), "--token", "king", "--layer", "0", "--outlier-tau", "0.5",
                    "--no-progress") == 0
    assert taus == [0.5] and "outlier keys (tau 0.5)" in capsys.readouterr().out


@needs_train_deps
def test_inspect_warns_when_an_edit_moves_what_it_cannot_reach(runs, tmp_path, capsys, monkeypatch):
    """The report printed the loss change before the edited token's first occurrence but never said that it
    must be 0: a change there now gets a warning in report.md and in the log."""
    report = importlib.import_module("memllm_kernels.interpret.report")
    real = report.edit_effect

    def leaky(*a, **kw):  # an edit that moves positions it cannot reach
        e = real(*a, **kw)
        e.edited_loss = e.edited_loss + np.where(e.reached, 0, 0.25).astype(e.edited_loss.dtype)
        return e
    monkeypatch.setattr(report, "edit_effect", leaky)
    paths, _ = runs
    out = tmp_path / "rep"
    assert _inspect(str(paths["memoryllm"]), "--out", str(out), "--skip", "identity,access,clusters,lens,sweeps",
                    "--eval-tokens", "320", "--no-progress") == 0
    warning = "WARNING: edit (a) changed the loss by up to 0.25 nats before the first"
    assert warning in capsys.readouterr().out and warning in (out / "report.md").read_text()


@needs_train_deps
def test_inspect_reads_one_key_column_streamed(runs, tmp_path, monkeypatch):
    """The token view (each layer's top-key users) and the edit demo (c) built the whole [N, K] coefficient matrix
    to read one column: 2.8 GB a layer at the 1B shape, twice that while joined. They stream it now, with the
    same numbers."""
    report = importlib.import_module("memllm_kernels.interpret.report")
    real, sizes = report.coefficients, []

    def spy(model, layer, tokens=None, **kw):
        sizes.append(model.config.vocab_size if tokens is None else len(tokens))
        return real(model, layer, tokens, **kw)
    monkeypatch.setattr(report, "coefficients", spy)
    paths, _ = runs
    run = str(paths["memoryllm"])
    assert _inspect(run, "--token", "king", "--no-progress") == 0
    assert _inspect(run, "--out", str(tmp_path / "rep"), "--skip", "identity,access,clusters,lens,sweeps",
                    "--eval-tokens", "320", "--no-progress") == 0
    assert sizes and set(sizes) == {1}, sizes  # one token's coefficients at a time, never a whole pool
    model = tiny_model()
    full = coefficients(model, 1)
    col = np.abs(full.coef[:, 40]) * full.value_norms[40]
    users = report._key_users(model, 1, 40, np.arange(0, 300, 2), n=5)
    want = np.arange(0, 300, 2)[np.argsort(-col[::2], kind="stable")[:5]]
    assert [t for t, _ in users] == want.tolist()
    np.testing.assert_allclose([c for _, c in users], col[want], rtol=1e-6)


@needs_train_deps
def test_inspect_names_nan_rows_in_one_line(runs, capsys, monkeypatch):
    """A run whose memory outputs hold NaN failed the identity section with an AssertionError traceback that blamed
    the decomposition; it is the run's weights, said in one line."""
    report = importlib.import_module("memllm_kernels.interpret.report")
    real = report.check_decomposition
    monkeypatch.setattr(report, "check_decomposition", lambda *a, **kw: {**real(*a, **kw), "nonfinite_tokens": 3,
                                                                          "ok": False})
    paths, _ = runs
    assert _inspect(str(paths["memoryllm"]), "--skip", "access,clusters,lens,sweeps,edits", "--no-progress") == 2
    assert "NaN or inf memory outputs (layer, tokens): [(0, 3), (1, 3)]" in capsys.readouterr().err


@needs_train_deps
def test_run_tokens_names_the_splits(runs):
    from memllm_kernels.interpret import open_run

    paths, _ = runs
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'validation'"):  # was KeyError
        open_run(paths["memoryllm"]).token_ids("validation")


@pytest.fixture(scope="module")
def number_run(tmp_path_factory):
    """A MemoryLLM trained for 20 steps on a text of numbers only: no ' king', no word token."""
    root = tmp_path_factory.mktemp("numbers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMLLM_CACHE", str(root / "cache"))
        yield _train_runs(root, lambda rng: map(str, rng.integers(0, 100, 8)), ("memoryllm",))["memoryllm"]


@needs_train_deps
def test_inspect_a_text_without_words(number_run, tmp_path, capsys):
    """Picking the edit pair crashed with an IndexError on a text without word tokens, and with a StopIteration
    when --edit-token was its most frequent token; the lens table listed letters never seen in training. Its most
    frequent tokens stand in for words now."""
    from memllm_kernels.interpret import open_run

    h = open_run(number_run)
    counts = np.bincount(h.token_ids("train"), minlength=h.model.config.vocab_size)
    frequent = np.argsort(-counts, kind="stable")
    quick = ["--skip", "identity,access,clusters,sweeps", "--eval-tokens", "320", "--no-progress"]
    for i, argv in enumerate(([], ["--edit-token", f"#{frequent[0]}"])):
        out = tmp_path / f"rep{i}"
        assert _inspect(str(number_run), "--out", str(out), *quick, *argv) == 0, capsys.readouterr().err
        res = json.loads((out / "report.json").read_text())
        assert (res["edits"]["token"], res["edits"]["source"]) == (frequent[0], frequent[1])
    md = (out / "report.md").read_text()
    table = md.split("Next tokens promoted by the memory of the most frequent tokens:\n\n")[1].split("\n\n")[0]
    assert [row.split(" | ")[0][2:] for row in table.splitlines()[2:]] == [h.names.md(t) for t in frequent[:6]]
