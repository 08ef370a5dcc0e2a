"""Contrastive activation addition: a steering vector from (positive, negative) text pairs.

Axes: `N` texts, `T` positions, `D` d_model.

`contrastive_vector` runs each text to `site` (stopping there), averages the site's activations
over the text's tokens (or takes the last token's), and returns the mean over pairs of positive
minus negative; with `pca=True`, the first principal direction of the differences instead (signed
and scaled to agree with the mean difference). `style_shift` measures what steering with such a
vector does: the mean log-probability per token of held-out positive and negative texts, read by
the steered model after a neutral prefix. Any other steering is measured the same way through a
`steer(scale)` callable: `feature_steer` adds `scale` to one feature of the dictionary attached at
the site (a registry passed as `dictionaries`), which adds `scale * W_dec[f] / norm_scale` to the
site's raw activation at every position.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.errors import UsageError
from jaxinterp.models.decoder import forward
from jaxinterp.models.intercept import Plan, parse_site
from jaxinterp.steering.spec import DictionaryRegistry, SteeringError, SteeringVector, compile_steering

CONTRAST_SETS = ("shakespearean_vs_modern",)


def load_pairs(name_or_path: str) -> list[tuple[str, str]]:
    """(positive, negative) pairs from a shipped set's name or a .jsonl file of
    {"positive": ..., "negative": ...} lines."""
    if name_or_path in CONTRAST_SETS:
        text = resources.files("jaxinterp.steering").joinpath(f"contrast_sets/{name_or_path}.jsonl").read_text()
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise SteeringError(f"contrast set {name_or_path!r} is neither a shipped set {CONTRAST_SETS} nor a file")
        text = p.read_text()
    pairs = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
                pairs.append((row["positive"], row["negative"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SteeringError(f"{name_or_path}: line {i + 1} is not a {{positive, negative}} JSON object") from None
    return pairs


def split_held_out(pairs: list, held_out: int) -> tuple[list, list]:
    """(training pairs, the last `held_out` pairs)."""
    if not 0 < held_out < len(pairs):
        raise UsageError(f"--held-out {held_out}: need between 1 and {len(pairs) - 1} of the {len(pairs)} pairs")
    return pairs[:-held_out], pairs[-held_out:]


def _batch(tokenizer, texts: list[str], prefix: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded ids [N, T], attention mask, and a mask of the text's own tokens (not BOS/prefix)."""
    pre = tokenizer.encode(prefix, add_bos=True) if prefix else [tokenizer.bos_id]
    rows = [pre + tokenizer.encode(t, add_bos=False) for t in texts]
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), tokenizer.pad_id if tokenizer.pad_id is not None else 0, np.int32)
    mask, own = np.zeros_like(ids), np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):], own[i, t - len(r) + len(pre):] = r, 1, 1
    return ids, mask, own


def site_means(model, tokenizer, site: str, texts: list[str], *, positions: str = "mean", batch: int = 16) -> np.ndarray:
    """[N, D] per text: the site's activations averaged over its tokens, or at its last token."""
    parse_site(site, model.cfg.n_layers)
    out = []
    for s in range(0, len(texts), batch):
        ids, mask, own = _batch(tokenizer, texts[s : s + batch])
        res = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      plan=Plan(capture=(site,), stop_early=True))
        x = np.asarray(res.captured[site], np.float32)
        if positions == "last":
            out.append(x[:, -1])
        else:
            out.append((x * own[..., None]).sum(1) / own.sum(1, keepdims=True))
    return np.concatenate(out)


class ContrastVector(NamedTuple):
    vector: np.ndarray
    """[D] the steering direction (raw units of the site)."""
    differences: np.ndarray
    """[pairs, D] positive minus negative per pair."""
    explained: float
    """Fraction of the differences' variance along the first principal direction."""


def contrastive_vector(model, tokenizer, site: str, pairs, *, positions: str = "mean", pca: bool = False) -> ContrastVector:
    if positions not in ("mean", "last"):
        raise SteeringError(f"positions {positions!r} unknown; choose mean or last")
    if not pairs:
        raise SteeringError("no contrast pairs given")
    pos = site_means(model, tokenizer, site, [p for p, _ in pairs], positions=positions)
    neg = site_means(model, tokenizer, site, [n for _, n in pairs], positions=positions)
    diff = pos - neg
    mean = diff.mean(0)
    centred = diff - mean
    _, s, vt = np.linalg.svd(centred if len(diff) > 1 else diff, full_matrices=False)
    explained = float(s[0] ** 2 / max((s**2).sum(), 1e-12))
    vec = mean
    if pca:
        u = vt[0] * np.sign(vt[0] @ mean or 1.0)
        vec = u * float(mean @ u)
    return ContrastVector(vector=vec.astype(np.float32), differences=diff, explained=explained)


def continuation_logprob(model, tokenizer, texts: list[str], prefix: str, steering=None, batch: int = 16, *,
                         dictionaries: DictionaryRegistry | None = None) -> np.ndarray:
    """[N] mean log-probability per token of each text after `prefix`, under `steering` (feature
    edits through the dictionaries attached in `dictionaries`)."""
    out = []
    for s in range(0, len(texts), batch):
        ids, mask, own = _batch(tokenizer, texts[s : s + batch], prefix)
        lens = mask.sum(1).tolist()
        edits, ep = compile_steering(steering, dictionaries, model.cfg, lens)
        logits = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), plan=Plan(edits=edits),
                         edit_params=ep).logits
        lp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
        tok_lp = np.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        w = own[:, 1:]
        out.append((tok_lp * w).sum(1) / w.sum(1))
    return np.concatenate(out)


def feature_steer(site: str, feature: int) -> Callable[[float], SteeringVector]:
    """`steer` for `style_shift`: add `scale` (raw activation units) to `feature` of the dictionary
    attached at `site`."""
    return lambda scale: SteeringVector(site, features={int(feature): float(scale)}, mode="add")


def style_shift(model, tokenizer, site: str, vector: np.ndarray | None, held_out, scales=(0.0, 2.0, 4.0, 8.0),
                prefix: str = "He said:", *, steer: Callable[[float], SteeringVector | None] | None = None,
                dictionaries: DictionaryRegistry | None = None) -> list[dict]:
    """Per scale: mean log-prob per token of the held-out positive and negative texts, and their
    margin, with `vector * scale` added at `site` on every position, or under `steer(scale)` when
    given (`vector` is then unused; feature steering reads `dictionaries`)."""
    if steer is None:
        if vector is None:
            raise SteeringError("style_shift needs a vector or a steer(scale) callable")

        def steer(scale: float) -> SteeringVector | None:
            return None if scale == 0 else SteeringVector(site, vector=vector, scale=scale)
    rows = []
    for scale in scales:
        st = steer(float(scale))
        lp_pos = continuation_logprob(model, tokenizer, [p for p, _ in held_out], prefix, st, dictionaries=dictionaries)
        lp_neg = continuation_logprob(model, tokenizer, [n for _, n in held_out], prefix, st, dictionaries=dictionaries)
        rows.append({"scale": float(scale), "logprob_positive": float(lp_pos.mean()),
                     "logprob_negative": float(lp_neg.mean()), "margin": float((lp_pos - lp_neg).mean())})
    return rows
