"""What fires on a prompt, and which features separate two sets of texts.

Axes: `B` texts, `T` tokens (BOS first), `D` the site's width, `F` d_sae, `K` features kept.

Texts are token-id sequences of any lengths; they are right-padded into one batch (a causal model's
earlier positions do not see the padding) and the padding is masked out. BOS is never counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxinterp.errors import UsageError
from jaxinterp.models import Plan, forward


def _features(model, dictionary, texts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(feature activations [B, T, F], mask [B, T] of counted positions) for right-padded texts."""
    dictionary.check_model(model.cfg.d_model, model.cfg.n_layers)
    t = max(len(x) for x in texts)
    tokens = np.zeros((len(texts), t), np.int32)
    mask = np.zeros((len(texts), t), bool)
    for i, x in enumerate(texts):
        tokens[i, : len(x)] = x
        mask[i, 1 : len(x)] = True
    res = forward(model, jnp.asarray(tokens), plan=Plan(capture=(dictionary.site,), stop_early=True))
    acts = np.asarray(dictionary.encode(np.asarray(res.captured[dictionary.site], np.float32)))
    return acts, mask


class TokenFeatures(NamedTuple):
    ids: np.ndarray
    """[T, K] the features most active at each position (position 0, BOS, is all -1)."""
    values: np.ndarray
    """[T, K] their activations (0 where fewer than K fire)."""


def fires_here(model, dictionary, tokens: Sequence[int], *, k: int = 10) -> TokenFeatures:
    """The top `k` features at every token of one prompt (ids -1 where nothing more fires)."""
    acts, mask = _features(model, dictionary, [tokens])
    a = np.where(mask[0][:, None], acts[0], 0.0)
    ids = np.argsort(-a, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(a, ids, 1)
    return TokenFeatures(np.where(vals > 0, ids, -1), vals)


class Contrast(NamedTuple):
    ids: np.ndarray
    """[K] the features most active on set A relative to set B, by effect size."""
    effect_size: np.ndarray
    """[K] Cohen's d of their per-token activations (A minus B over the pooled deviation)."""
    mean_a: np.ndarray
    mean_b: np.ndarray
    max_act: np.ndarray
    """[K] their largest per-token activation over both sets (a unit for steering amounts)."""


def contrast(model, dictionary, texts_a: Sequence[Sequence[int]], texts_b: Sequence[Sequence[int]], *,
             k: int = 20, batch: int = 16) -> Contrast:
    """Features whose per-token mean activation is higher on `texts_a` than on `texts_b` (swap the
    sets for the other direction), ranked by effect size; tokens of every text weigh the same."""
    moments, peak = [], np.zeros(dictionary.d_sae)
    for texts in (texts_a, texts_b):
        n, s1, s2 = 0.0, 0.0, 0.0
        for i in range(0, len(texts), batch):
            acts, mask = _features(model, dictionary, texts[i : i + batch])
            a = acts[mask].astype(np.float64)
            n, s1, s2 = n + len(a), s1 + a.sum(0), s2 + (a**2).sum(0)
            peak = np.maximum(peak, a.max(0, initial=0.0))
        if n < 2:
            raise UsageError("contrast: each set needs at least two tokens past BOS; give longer or more texts")
        mean = s1 / n
        moments.append((n, mean, np.maximum(s2 / n - mean**2, 0.0) * n / (n - 1)))
    (na, ma, va), (nb, mb, vb) = moments
    pooled = np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    d = np.where(pooled > 0, (ma - mb) / np.maximum(pooled, 1e-12), 0.0)
    ids = np.argsort(-d, kind="stable")[:k]
    return Contrast(ids, d[ids], ma[ids], mb[ids], peak[ids])


class TokenMatches(NamedTuple):
    ids: np.ndarray
    """[K] features whose top contexts fire on, or whose decoder promotes, a matching token; most first."""
    in_top: np.ndarray
    """[K] how many of each one's top contexts fire on a matching token."""
    in_logits: np.ndarray
    """[K] how many of its most promoted tokens match."""


def matching_tokens(strings: Sequence[str], query: str, *, contains: bool = False) -> np.ndarray:
    """Token ids whose text, stripped and lowercased, equals `query` (stripped and lowercased), or
    contains it with `contains`."""
    q = query.strip().lower()
    if not q:
        raise UsageError("the token to search for is empty; give some text, e.g. 'thou'")
    hit = (lambda s: q in s) if contains else (lambda s: s == q)
    return np.asarray([i for i, s in enumerate(strings) if hit(s.strip().lower())], np.int64)


def by_token(stats, contexts_nt: np.ndarray, strings: Sequence[str], query: str, *, logits=None,
             contains: bool = False, k: int = 20) -> TokenMatches:
    """Features whose top contexts (from corpus `stats` over `contexts_nt`) fire on a token matching
    `query`, or whose logit effects promote one, ranked by the count of their top contexts that do,
    then by the count of promoted tokens that do."""
    ids = matching_tokens(strings, query, contains=contains)
    top_locs = np.asarray(stats.top_locs)
    focus = np.where(top_locs >= 0, contexts_nt.reshape(-1)[np.maximum(top_locs, 0)], -1)
    in_top = np.isin(focus, ids).sum(1)
    in_logits = np.zeros_like(in_top) if logits is None else np.isin(np.asarray(logits.pos_ids), ids).sum(1)
    order = np.lexsort((np.arange(len(in_top)), -in_logits, -in_top))
    order = order[(in_top[order] > 0) | (in_logits[order] > 0)][:k]
    return TokenMatches(order, in_top[order], in_logits[order])
