"""One pass over a corpus: a model's activations at a dictionary's site, its features, their stats.

Axes: `N` contexts, `T` tokens per context (BOS first), `D` the site's width, `F` d_sae, `E` firing
(token, feature) entries.

A location is `context * T + position` in the contexts array given (positions 1..T-1; BOS is never
counted, as in training), so `locate(loc, T)` names the token back.

Besides the statistics, a pass can keep every firing entry (`keep_entries=True`): the sparse code
of each token as (location, feature, activation) rows, in location order. That is what a dashboard
needs to shade the tokens around an example, and what delphi's activation cache holds. A TopK
dictionary keeps k entries a token (d_sae 4,608, k 32: ~12 bytes x 32 a token).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.data.activations import site_activations
from jaxinterp.errors import UsageError
from jaxinterp.features.stats import FeatureStats, init_stats, update_stats, update_stats_sparse


class Entries(NamedTuple):
    """Firing (location, feature, activation) entries of a pass, in location order."""

    locs: np.ndarray
    """[E] int32 token locations."""
    feats: np.ndarray
    """[E] int32 features."""
    vals: np.ndarray
    """[E] float32 activations (all > 0)."""

    @staticmethod
    def concat(parts) -> Entries:
        parts = list(parts)
        if not parts:
            return Entries(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        return Entries(*(np.concatenate(p) for p in zip(*parts)))


class CorpusPass(NamedTuple):
    stats: FeatureStats
    entries: Entries | None
    """Every firing entry, when the pass kept them."""


def locate(loc: int, context_length: int) -> tuple[int, int]:
    """(context, position) of a location."""
    return divmod(int(loc), context_length)


@partial(jax.jit, static_argnames=("cap",))
def _firing(acts_nf, loc_n, cap: int):
    n, f = acts_nf.shape
    on = (acts_nf > 0) & (loc_n >= 0)[:, None]
    idx = jnp.nonzero(on.reshape(-1), size=cap, fill_value=0)[0]
    return loc_n[idx // f], (idx % f).astype(jnp.int32), acts_nf.reshape(-1)[idx].astype(jnp.float32), jnp.sum(on)


def firing_entries(acts_nf, loc_n, *, max_active: int = 64) -> Entries:
    """The firing entries of one batch [N, F] at locations [N] (rows at location -1 are padding);
    room for `max_active` a row on average."""
    cap = acts_nf.shape[0] * max_active
    locs, feats, vals, count = jax.device_get(_firing(acts_nf, loc_n, cap))
    if count > cap:
        raise UsageError(f"a batch has {int(count)} firing entries, more than max_active={max_active} a token "
                         f"makes room for ({cap}); raise max_active (--max-active) or keep no entries")
    return Entries(locs[:count], feats[:count], vals[:count])


def code_entries(vals_nk, ids_nk, loc_n) -> Entries:
    """The firing entries of one batch's sparse code (values [N, K] of features [N, K])."""
    vals, ids, locs = jax.device_get((vals_nk, ids_nk, loc_n))
    on = (vals > 0) & (locs >= 0)[:, None]
    return Entries(np.broadcast_to(locs[:, None], on.shape)[on].astype(np.int32), ids[on].astype(np.int32),
                   vals[on].astype(np.float32))


def corpus_pass(model, dictionary, contexts_nt: np.ndarray, *, k: int = 20, samples: int = 40,
                batch_contexts: int = 16, keep_entries: bool = False, max_active: int = 64,
                state: CorpusPass | None = None, start: int = 0,
                on_batch: Callable[[int, CorpusPass], None] | None = None) -> CorpusPass:
    """Statistics of every feature of `dictionary` (a `jaxinterp.load_dictionary` artifact) over
    `contexts_nt` [N, T], read at the dictionary's input site, and with `keep_entries` every firing
    entry. Continues `state` from context `start` (a saved pass) when given. Each batch costs one
    model forward and one encode; `on_batch(next_context, state so far)` follows each (the
    entries it sees are only that batch's, for a caller that saves them as it goes)."""
    n, t = contexts_nt.shape
    dictionary.check_model(model.cfg.d_model, model.cfg.n_layers)
    stats = init_stats(dictionary.d_sae, k, samples) if state is None else state.stats
    kept = [] if state is None or state.entries is None else [state.entries]
    positions = np.arange(1, t)
    for s in range(start, n, batch_contexts):
        ctx = contexts_nt[s : s + batch_contexts]
        rows = site_activations(model, ctx, dictionary.site)[:, : dictionary.d_in]
        locs = ((s + np.arange(len(ctx)))[:, None] * t + positions[None, :]).reshape(-1).astype(np.int32)
        pad = batch_contexts * (t - 1) - len(rows)  # the short last batch: one compiled update for all
        if pad:
            rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
            locs = np.concatenate([locs, np.full(pad, -1, np.int32)])
        rows, locs = jnp.asarray(rows), jnp.asarray(locs)
        code = dictionary.encode_sparse(rows)
        if code is not None:  # a k-sparse kind: statistics and entries from the [N, K] code
            stats = update_stats_sparse(stats, *code, locs)
            batch = code_entries(*code, locs) if keep_entries else None
        else:
            acts = dictionary.encode(rows)
            stats = update_stats(stats, acts, locs, max_active=max_active)
            batch = firing_entries(acts, locs, max_active=max_active) if keep_entries else None
        if batch is not None:
            kept.append(batch)
        if on_batch is not None:
            on_batch(min(s + batch_contexts, n), CorpusPass(stats, batch))
    return CorpusPass(stats, Entries.concat(kept) if keep_entries else None)


def corpus_stats(model, dictionary, contexts_nt: np.ndarray, *, k: int = 20, batch_contexts: int = 16,
                 stats: FeatureStats | None = None, start: int = 0,
                 progress: Callable[[int], None] | None = None) -> FeatureStats:
    """The statistics of `corpus_pass` alone (continuing `stats` from context `start` when given)."""
    state = None if stats is None else CorpusPass(stats, None)
    samples = 40 if stats is None else stats.sample_keys.shape[1]
    hook = None if progress is None else (lambda done, _: progress(done))
    return corpus_pass(model, dictionary, contexts_nt, k=k, samples=samples, batch_contexts=batch_contexts,
                       state=state, start=start, on_batch=hook).stats
