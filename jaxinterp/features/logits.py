"""Per-feature logit effects: the tokens a feature's write promotes and suppresses directly.

Axes: `F` d_sae, `D` d_model, `V` vocab, `K` tokens kept per side.

The direct effect of one unit of feature f is `(W_dec[f] / scale) * final_norm.weight @ W_U`, the
decoder row in the site's raw units, through the final norm's weight (its normalisation by the
residual's size is left out, as in SAELens' and Neuronpedia's logit tables). A transcoder's row is
its write at the target site; the same product applies.

Beside the top tokens, each feature's effects on the whole vocabulary go into a histogram of
`LOGIT_BINS` equal bins between that feature's smallest and largest effect.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinterp import dictionaries as dl

LOGIT_BINS = 50


class LogitEffects(NamedTuple):
    pos_ids: jax.Array
    """[F, K] tokens with the largest effect, descending."""
    pos_vals: jax.Array
    """[F, K] their effects."""
    neg_ids: jax.Array
    """[F, K] tokens with the most negative effect, most negative first."""
    neg_vals: jax.Array
    """[F, K] their effects."""
    hist: jax.Array
    """[F, LOGIT_BINS] int32 counts of the vocabulary's effects per bin."""
    hist_lo: jax.Array
    """[F] the smallest effect (the first bin's left edge)."""
    hist_hi: jax.Array
    """[F] the largest effect (the last bin's right edge)."""

    def hist_edges(self, feature: int) -> list[float]:
        """The `LOGIT_BINS + 1` bin edges of `feature`'s histogram."""
        lo, hi = float(self.hist_lo[feature]), float(self.hist_hi[feature])
        return [lo + (hi - lo) * i / LOGIT_BINS for i in range(LOGIT_BINS + 1)]


@partial(jax.jit, static_argnames=("k",))
def _chunk(rows_cd, norm_d, head_dv, k):
    logits = (rows_cd * norm_d) @ head_dv
    pos_vals, pos_ids = jax.lax.top_k(logits, k)
    neg_vals, neg_ids = jax.lax.top_k(-logits, k)
    lo, hi = jnp.min(logits, 1), jnp.max(logits, 1)  # not from the top-k's: XLA's CPU scatter then runs ~10x slower
    width = jnp.maximum(hi - lo, 1e-30) / LOGIT_BINS
    bins = jnp.clip(jnp.floor((logits - lo[:, None]) / width[:, None]), 0, LOGIT_BINS - 1).astype(jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], bins.shape)
    hist = jnp.zeros((logits.shape[0], LOGIT_BINS), jnp.int32).at[rows, bins].add(1)
    return pos_ids, pos_vals, neg_ids, -neg_vals, hist, lo, hi


def logit_effects(model, dictionary, *, k: int = 10, chunk: int = 256) -> LogitEffects:
    """`LogitEffects` of every feature of `dictionary` on `model`'s output, `chunk` features at a
    time (a [chunk, V] product, never [F, V])."""
    dictionary.check_model(model.cfg.d_model, model.cfg.n_layers)
    params = dictionary.params
    rows = jnp.asarray(params["W_dec"], jnp.float32) / dl.target_scale(dictionary.spec, params)
    head = (model.embed[...].T if model.lm_head is None else model.lm_head[...]).astype(jnp.float32)
    norm = model.final_norm.weight[...].astype(jnp.float32)
    parts = [_chunk(rows[s : s + chunk], norm, head, k) for s in range(0, rows.shape[0], chunk)]
    return LogitEffects(*(jnp.concatenate(p) for p in zip(*parts)))
