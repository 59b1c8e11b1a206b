"""Interpretability toolkit for the FFN memory of MemoryLLM / Flex-MemoryLLM models (paper sections 2.3.1 and 3).

Every vocabulary token is a query, the up-projection rows are keys, the down-projection columns are values
and the gate reweights keys: c_i(t) = (q.k_i) silu(q.g_i) with q = norm_m,l(E[t]), and FFN_l(q) = sum_i c_i v_i.

    coefficients.py   c(t) for the vocabulary in chunks, checked against the model's own FFN output
    access.py         top-k keys per token, inverted index, key utilization, dead keys
    clusters.py       K-means / t-SNE of coefficient vectors, clustering coefficient, outlier keys
    lens.py           logit lens on each ToL row: which next tokens a token's memory promotes
    sweeps.py         perplexity with one layer's memory (or a dense FFN) dropped, and with memory * alpha
    edits.py          suppress/rewrite keys or a token's rows and measure which losses change
    report.py         `memllm inspect RUN`: all of the above as markdown + PNGs; the one-token view
    cli.py            the `inspect` subcommand (add_parser / main)

Plots need matplotlib and clustering scikit-learn: pip install 'memllm-kernels[interpret]'. See
docs/interpret.md for definitions (clustering coefficient, outlier keys) and an example report.
"""

from ._common import RunHandle, TokenNames, memory_ffn, memory_rows, open_run, resolve_token  # noqa: F401
from .access import AccessMap, access_map  # noqa: F401
from .clusters import (ClusterResult, cluster_layer, clustering_coefficient, nearest_tokens,  # noqa: F401
                       outlier_key_counts)
from .coefficients import (Coefficients, check_decomposition, coefficients, iter_coefficients,  # noqa: F401
                           key_value_weights)
from .edits import (EditEffect, copy_token_rows, edit_effect, edited_rows, suppress_token_rows,  # noqa: F401
                    suppressed_keys)
from .lens import BigramAgreement, LensResult, bigram_agreement, memory_lens  # noqa: F401
from .sweeps import SweepResult, alpha_sweep, dropped_ffn, layer_drop_sweep, memory_scale  # noqa: F401
