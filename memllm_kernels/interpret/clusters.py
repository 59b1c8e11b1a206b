"""Clusters of tokens by the keys they read: K-means, a 2-D t-SNE view, a clustering coefficient per layer
and outlier keys per token (the paper reports the last two without defining them; ours are below and in
docs/interpret.md).

Features. Each token's coefficient vector c(t) [K] is L2-normalised first, so tokens group by *which* keys
they read and in what proportions, not by how loud their memory is; K-means (Euclidean on unit vectors),
t-SNE and the nearest-neighbour graph therefore all agree with cosine similarity.

Clustering coefficient of a layer (our definition). Take a seeded sample of S tokens (default 2,000), build
the symmetric k-nearest-neighbour graph of their normalised coefficient vectors (k = 10; an edge t-u when u
is among t's k nearest or t among u's), and average the local clustering coefficient of Watts and Strogatz
over the tokens: C_t = (edges among t's neighbours) / (deg_t (deg_t - 1) / 2). It is 1 when every token's
neighbours are also each other's neighbours (tight, separated groups), near 0 when neighbourhoods do not
overlap. As a reference the same number is computed after permuting each key's column independently across
the sampled tokens ("shuffled"), which keeps every key's distribution and destroys the token-level structure.

Outlier keys of a token at a layer (our definition). With contributions a_i = |c_i(t)| ||v_i|| (the norm of
key i's term in the token's output), key i is an outlier for t when a_i > tau * RMS_j(a_j), tau = 6 by default.
For Gaussian-like contributions that almost never happens (P(|z| > 6) ~ 2e-9); a key that alone carries a
large share of a token's output does. The threshold is relative, so the count does not grow with the
memory's overall scale. (At most K / tau^2 keys can pass it: 19 of the tiny preset's 688.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import int_at_least
from ..model.model import Transformer
from ..offload.tiers import mem_available
from ._common import check_layer, check_token, check_token_set, int_in, new_figure, require, save_figure
from .coefficients import DEFAULT_CHUNK_TOKENS, coefficients

DEFAULT_TSNE_SAMPLE = 2000
# t-SNE's perplexity (min(30, (S - 1) / 3), below) must stay under the sample size and its neighbour search
# needs a few points: 5 is the smallest sample tsne_2d accepts.
MIN_TSNE_SAMPLE = 5
DEFAULT_CLUSTERS = 16
DEFAULT_KNN = 10
DEFAULT_OUTLIER_TAU = 6.0
MAX_SEED = 2**32 - 1  # scikit-learn's random_state (K-means, PCA, t-SNE) takes seeds in [0, 2**32)
# Above this many tokens K-means runs as MiniBatchKMeans: full Lloyd iterations over GPT-2's 50,257 x 688
# coefficients with several restarts take minutes on two cores, mini-batches seconds.
MINIBATCH_ABOVE = 20000


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero): [N, K] float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of min(size, n) distinct indices into range(n), sorted."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def outlier_key_counts(coef: np.ndarray, value_norms: np.ndarray, tau: float = DEFAULT_OUTLIER_TAU,
                       chunk: int = 4096) -> np.ndarray:
    """Outlier keys per token (module docstring): coef [N, K], value_norms [K] -> counts [N] int64.

    In row chunks: the contributions and their float64 squares of all rows at once were 5 x coef's size in
    temporaries (14 GB for the 1B preset's 128,256 x 5,464 coefficients)."""
    tau = check_tau(tau)
    coef = np.asarray(coef)
    vn = np.asarray(value_norms, dtype=np.float32)[None, :]
    out = np.empty(coef.shape[0], dtype=np.int64)
    for s in range(0, coef.shape[0], chunk):
        a = np.abs(coef[s:s + chunk].astype(np.float32)) * vn
        rms = np.sqrt((a.astype(np.float64) ** 2).mean(axis=1, keepdims=True))
        out[s:s + chunk] = (a > tau * rms).sum(axis=1)
    return out


def check_tau(tau) -> float:
    """The outlier threshold as a float: finite and > 0 (NaN compared false with every contribution and counted
    no outlier at all)."""
    tau = float(tau)
    if not 0 < tau < math.inf:
        raise ValueError(f"the outlier threshold tau must be > 0 and finite, got {tau}")
    return tau


def knn_graph(x: np.ndarray, k: int = DEFAULT_KNN) -> np.ndarray:
    """Symmetric k-nearest-neighbour adjacency [N, N] bool of the rows of x (cosine similarity; no self-loops).

    Dense: S^2 booleans and one S x S similarity matrix (2,000 tokens: 16 MB), fine for the sampled sizes.
    """
    n = x.shape[0]
    k = int_in("k", k, 1, n - 1, f" for {n} tokens")
    # The similarity (float32), the graph (bool) and local_clustering's two float32 products: 13 n^2 bytes, 32 GB
    # for a sample of 50,000 tokens; refused up front rather than swapped or killed.
    need, avail = 13 * n * n, mem_available()
    if avail is not None and need > avail:
        raise ValueError(f"the k-NN graph of {n} tokens needs about {need / 2**30:.1f} GiB of memory, "
                         f"{avail / 2**30:.1f} GiB is available; sample fewer tokens (--tsne-sample)")
    u = torch.from_numpy(normalise_rows(x))
    sim = u @ u.t()
    sim.fill_diagonal_(-float("inf"))
    nn_idx = sim.topk(k, dim=1).indices
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj.scatter_(1, nn_idx, True)
    adj |= adj.t().clone()
    return adj.numpy()


def local_clustering(adj: np.ndarray) -> np.ndarray:
    """Watts-Strogatz local clustering coefficient of each node of an undirected graph: [N] float64.

    Triangles through t are (A^3)_tt / 2 = sum_u (A^2)_tu A_tu / 2; nodes of degree < 2 get 0.
    """
    a = torch.from_numpy(np.asarray(adj, dtype=np.float32))
    tri = ((a @ a) * a).sum(1).double() / 2
    deg = a.sum(1).double()
    pairs = deg * (deg - 1) / 2
    return torch.where(pairs > 0, tri / pairs.clamp(min=1), torch.zeros_like(tri)).numpy()


def clustering_coefficient(coef: np.ndarray, k: int = DEFAULT_KNN) -> float:
    """Mean local clustering coefficient of the k-NN graph of the coefficient vectors (module docstring)."""
    return float(local_clustering(knn_graph(coef, k)).mean())


def shuffled_columns(coef: np.ndarray, seed: int) -> np.ndarray:
    """Each column permuted independently across rows (the clustering coefficient's reference)."""
    rng = np.random.default_rng(seed)
    out = np.array(coef, copy=True)
    for j in range(out.shape[1]):
        out[:, j] = out[rng.permutation(out.shape[0]), j]
    return out


def kmeans(x: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """K-means of the rows of x (already normalised): (labels [N], centers [n_clusters, K], method).

    KMeans (3 restarts) up to MINIBATCH_ABOVE rows, MiniBatchKMeans (batches of 2,048, 3 restarts) above.
    """
    cluster = require("sklearn.cluster", "clustering")
    n = x.shape[0]
    n_clusters = int_in("n_clusters", n_clusters, 2, n, f" for {n} tokens")
    if n > MINIBATCH_ABOVE:
        km = cluster.MiniBatchKMeans(n_clusters=n_clusters, batch_size=2048, n_init=3, random_state=seed)
        method = "MiniBatchKMeans"
    else:
        km = cluster.KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
        method = "KMeans"
    labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float32), method


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the rows of x: [N, 2]. PCA to 50 dimensions first (the usual speed-up: t-SNE's
    neighbour search in 688 dimensions costs far more than the projection loses), perplexity 30 (less for
    tiny samples), PCA initialisation, seeded."""
    decomposition = require("sklearn.decomposition", "t-SNE")
    manifold = require("sklearn.manifold", "t-SNE")
    n = x.shape[0]
    if n < MIN_TSNE_SAMPLE:
        raise ValueError(f"t-SNE needs at least {MIN_TSNE_SAMPLE} tokens, got {n}")
    dims = min(50, x.shape[1], n)
    if x.shape[1] > dims:
        x = decomposition.PCA(n_components=dims, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (n - 1) / 3)
    ts = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return ts.fit_transform(np.asarray(x, dtype=np.float32)).astype(np.float32)


@dataclass
class ClusterResult:
    """Clusters of `tokens` [N] at `layer`.

    labels [N]; centers [n_clusters, K] (of normalised vectors); central / frequent: per cluster, example
    token ids (closest to the centroid / most frequent in the training text, when counts were given);
    sample [S]: indices into `tokens` used for t-SNE and the clustering coefficient; tsne [S, 2] or None;
    outliers [N]: outlier keys per token; silhouette: of the K-means labels on the sample (cosine; 0 where
    it is undefined: one cluster, or every sampled token in a cluster of its own).
    """

    layer: int
    tokens: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    method: str
    sample: np.ndarray
    tsne: np.ndarray | None
    clustering_coefficient: float
    clustering_coefficient_shuffled: float
    silhouette: float
    outliers: np.ndarray
    knn: int
    outlier_tau: float
    central: dict = field(default_factory=dict)
    frequent: dict = field(default_factory=dict)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.centers))

    def cluster_of(self, token: int) -> int:
        rows = np.flatnonzero(self.tokens == token)
        if not len(rows):
            raise ValueError(f"token {token} was not clustered (not among the analysed tokens)")
        return int(self.labels[rows[0]])

    def summary(self) -> dict:
        o = self.outliers
        return {"layer": self.layer, "tokens": int(len(self.tokens)), "clusters": int(len(self.centers)),
                "method": self.method, "sample": int(len(self.sample)), "knn": self.knn,
                "clustering_coefficient": self.clustering_coefficient,
                "clustering_coefficient_shuffled": self.clustering_coefficient_shuffled,
                "silhouette": self.silhouette, "outlier_tau": self.outlier_tau,
                "outlier_keys_mean": float(o.mean()), "outlier_keys_median": float(np.median(o)),
                "outlier_keys_p99": float(np.percentile(o, 99)), "outlier_keys_max": int(o.max()),
                "tokens_with_outlier": float((o > 0).mean())}

    def plot(self, path=None, names=None, labels_per_cluster: int = 2):
        """The t-SNE view coloured by cluster, with `labels_per_cluster` example tokens written per cluster."""
        if self.tsne is None:
            raise ValueError("this result has no t-SNE view (computed with tsne=False)")
        names = names or (lambda i: f"#{int(i)}")
        fig = new_figure(9, 7)
        ax = fig.subplots()
        lab = self.labels[self.sample]
        cmap = "tab20" if len(self.centers) <= 20 else "nipy_spectral"
        ax.scatter(self.tsne[:, 0], self.tsne[:, 1], c=lab, cmap=cmap, s=6, alpha=0.7,
                   vmin=0, vmax=max(1, len(self.centers) - 1))
        examples = self.frequent or self.central
        pos = {int(t): i for i, t in enumerate(self.tokens[self.sample])}
        for c in range(len(self.centers)):
            shown = [t for t in examples.get(c, []) if t in pos][:labels_per_cluster]
            for t in shown:
                x, y = self.tsne[pos[t]]
                ax.annotate(names(t), (x, y), fontsize=7, alpha=0.9)
        ax.set(title=f"layer {self.layer}: t-SNE of {len(self.sample)} tokens' coefficient vectors, "
                     f"{len(self.centers)} clusters ({self.method})", xticks=[], yticks=[])
        return save_figure(fig, path)


def cluster_layer(model: Transformer, layer: int, *, tokens=None, n_clusters: int = DEFAULT_CLUSTERS,
                  sample: int = DEFAULT_TSNE_SAMPLE, knn: int = DEFAULT_KNN, outlier_tau: float = DEFAULT_OUTLIER_TAU,
                  seed: int = 0, counts: np.ndarray | None = None, n_examples: int = 8, tsne: bool = True,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS, progress: bool = False) -> ClusterResult:
    """K-means over the coefficient vectors of `tokens` (None: the vocabulary) at `layer`, the clustering
    coefficient and a t-SNE view on a seeded sample of `sample` of them, and outlier keys of every token.

    counts: optional [V] token frequencies; then each cluster's examples are its most frequent tokens.
    Deterministic for a given seed.
    """
    layer = check_layer(model, layer)
    # every option is checked before the coefficients and K-means, which can take minutes
    for name, v, low in (("n_clusters", n_clusters, 2), ("sample", sample, 1), ("knn", knn, 1),
                         ("n_examples", n_examples, 0)):
        int_at_least(name, v, low)
    outlier_tau = check_tau(outlier_tau)
    tokens = check_token_set(model, tokens)
    V = model.config.vocab_size
    if counts is not None and np.shape(counts) != (V,):
        raise ValueError(f"counts must be [V] = [{V}] token frequencies, got shape {list(np.shape(counts))}")
    co = coefficients(model, layer, tokens, chunk_tokens=chunk_tokens, progress=progress)
    n = len(co.tokens)
    if n < 3:
        raise ValueError(f"clustering needs at least 3 tokens, got {n}")
    # checked before K-means, which can take minutes: the sample needs 2 tokens for a k-NN graph, more for t-SNE
    need = MIN_TSNE_SAMPLE if tsne else 2
    if min(sample, n) < need:
        raise ValueError(f"the t-SNE / clustering-coefficient sample needs at least {need} tokens, got "
                         f"{min(sample, n)} (sample {sample}, {n} tokens)")
    x = normalise_rows(co.coef)
    labels, centers, method = kmeans(x, n_clusters, seed)
    idx = sample_indices(n, sample, seed)
    xs = x[idx]
    k = min(knn, len(idx) - 1)
    cc = clustering_coefficient(xs, k)
    cc_shuf = clustering_coefficient(shuffled_columns(xs, seed), k)
    metrics = require("sklearn.metrics", "clustering")
    # sklearn defines the silhouette for 2 <= labels <= samples - 1 only; outside that every sampled token is
    # alone in its cluster or all share one, and 0 is sklearn's own value for a one-token cluster
    n_labels = len(np.unique(labels[idx]))
    sil = float(metrics.silhouette_score(xs, labels[idx], metric="cosine")) if 2 <= n_labels < len(idx) else 0.0
    view = tsne_2d(xs, seed) if tsne else None
    dist = _chunked_dists(x, centers)
    central, frequent = {}, {}
    for c in range(len(centers)):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(dist[members, c], kind="stable")]
        central[c] = [int(t) for t in co.tokens[order[:n_examples]]]
        if counts is not None:
            f = np.asarray(counts)[co.tokens[members]]
            top = members[np.argsort(-f, kind="stable")[:n_examples]]
            frequent[c] = [int(t) for t in co.tokens[top]]
    return ClusterResult(layer, co.tokens, labels, centers, method, idx, view, cc, cc_shuf, sil,
                         outlier_key_counts(co.coef, co.value_norms, outlier_tau), k, outlier_tau, central, frequent)


def _chunked_dists(x: np.ndarray, centers: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Squared distances [N, n_clusters] without an [N, n_clusters, K] temporary."""
    c2 = (centers ** 2).sum(1)[None]
    out = np.empty((x.shape[0], centers.shape[0]), dtype=np.float32)
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        out[s:s + chunk] = (xb ** 2).sum(1, keepdims=True) - 2 * xb @ centers.T + c2
    return out


def nearest_tokens(model: Transformer, layer: int, token: int, *, tokens=None, n: int = 10,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[tuple[int, float]]:
    """The `n` tokens (among `tokens`, None: the vocabulary) whose coefficient vectors are most similar
    (cosine) to `token`'s at `layer`: [(token id, cosine)], the token itself excluded."""
    from .coefficients import iter_coefficients

    layer = check_layer(model, layer)
    token = check_token(model, token)
    n = int_at_least("n", n, 1)
    tokens = check_token_set(model, tokens)
    (_, q), = list(iter_coefficients(model, layer, [token]))
    q = q[0] / q[0].norm().clamp(min=1e-30)
    best_s = torch.empty(0)
    best_t = torch.empty(0, dtype=torch.int64)
    for ids, c in iter_coefficients(model, layer, tokens, chunk_tokens=chunk_tokens):
        s = (c @ q) / c.norm(dim=1).clamp(min=1e-30)
        keep = ids != token
        cand_s = torch.cat([best_s, s[keep].cpu()])
        cand_t = torch.cat([best_t, ids[keep].cpu()])
        top = cand_s.topk(min(n, cand_s.numel())).indices
        best_s, best_t = cand_s[top], cand_t[top]
    return [(int(t), float(s)) for t, s in zip(best_t, best_s)]


def plot_layer_summary(results: list[ClusterResult], path=None):
    """Clustering coefficient (and its shuffled reference) and mean outlier keys per token, against layer."""
    fig = new_figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    ls = [r.layer for r in results]
    ax1.plot(ls, [r.clustering_coefficient for r in results], "o-", label="coefficient vectors")
    ax1.plot(ls, [r.clustering_coefficient_shuffled for r in results], "x--", color="gray", label="keys shuffled")
    ax1.set(title="clustering coefficient (k-NN graph)", xlabel="layer", ylabel="mean local C", ylim=(0, None))
    ax1.legend()
    ax2.bar(ls, [r.outliers.mean() for r in results], color="tab:red")
    ax2.set(title=f"outlier keys per token (tau = {results[0].outlier_tau:g})" if results else "outlier keys",
            xlabel="layer", ylabel="mean count")
    for ax in (ax1, ax2):
        ax.set_xticks(ls)
    return save_figure(fig, path)
