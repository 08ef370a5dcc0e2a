"""One pass over a corpus: a model's activations at a dictionary's site, its features, their stats.

Axes: `N` contexts, `T` tokens per context (BOS first), `D` the site's width, `F` d_sae.

A location is `context * T + position` in the contexts array given (positions 1..T-1; BOS is never
counted, as in training), so `locate(loc, T)` names the token back.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxinterp.data.activations import site_activations
from jaxinterp.features.stats import FeatureStats, init_stats, update_stats


def locate(loc: int, context_length: int) -> tuple[int, int]:
    """(context, position) of a location."""
    return divmod(int(loc), context_length)


def corpus_stats(model, dictionary, contexts_nt: np.ndarray, *, k: int = 20, batch_contexts: int = 16,
                 stats: FeatureStats | None = None, start: int = 0,
                 progress: Callable[[int], None] | None = None) -> FeatureStats:
    """Statistics of every feature of `dictionary` (a `jaxinterp.load_dictionary` artifact) over
    `contexts_nt` [N, T], read at the dictionary's input site; continue `stats` from context `start`
    (a saved state) when given. Each batch costs one model forward and one encode."""
    n, t = contexts_nt.shape
    dictionary.check_model(model.cfg.d_model, model.cfg.n_layers)
    stats = init_stats(dictionary.d_sae, k) if stats is None else stats
    positions = np.arange(1, t)
    for s in range(start, n, batch_contexts):
        ctx = contexts_nt[s : s + batch_contexts]
        rows = site_activations(model, ctx, dictionary.site)[:, : dictionary.d_in]
        locs = ((s + np.arange(len(ctx)))[:, None] * t + positions[None, :]).reshape(-1).astype(np.int32)
        pad = batch_contexts * (t - 1) - len(rows)  # the short last batch: one compiled update for all
        if pad:
            rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
            locs = np.concatenate([locs, np.full(pad, -1, np.int32)])
        stats = update_stats(stats, dictionary.encode(jnp.asarray(rows)), jnp.asarray(locs))
        if progress is not None:
            progress(min(s + batch_contexts, n))
    return stats
