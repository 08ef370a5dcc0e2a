"""How faithfully a CLT stands in for the MLPs it covers.

Axes: `N` contexts, `T` positions, `L` covered layers, `V` vocab.

Per target layer, on the original model's activations: FVU and explained variance of the
reconstruction of `mlp_out` (the fraction of its variance around the mean the CLT leaves
unexplained), L0 of each source layer's features, and the fraction of features that never fired.
With every covered MLP replaced (no error terms, the replacement model of `replacement.py`), over
each next-token prediction of the contexts:

    agreement      the original's and the replacement's top-1 tokens are the same
    kl             KL(original || replacement) of the next-token distributions, in nats
    ce_original, ce_replacement, ce_ablated    cross-entropy of the next token; ablated: the
                   covered MLPs' outputs zeroed
    ce_loss_score  (ce_ablated - ce_replacement) / (ce_ablated - ce_original)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.circuits.replacement import replacement_forward
from jaxinterp.dictionaries import clt
from jaxinterp.dictionaries.artifact import CLTDictionary
from jaxinterp.models import Plan, forward


def _zero(x_btd, params, positions_bt):
    del params, positions_bt
    return jnp.zeros_like(x_btd)


def _next_token_terms(logits_btv, tokens_bt):
    lp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    return lp, -jnp.take_along_axis(lp, tokens_bt[:, 1:, None], axis=-1)[..., 0]


class _LayerSums:
    """Running sums of the per-layer metrics over rows x [N, L, D], y [N, L, D] (raw units)."""

    def __init__(self, spec: clt.CLTSpec):
        self.spec = spec
        self.err2, self.y2 = np.zeros(spec.n_layers), np.zeros(spec.n_layers)
        self.y1 = np.zeros((spec.n_layers, spec.d_model))
        self.l0, self.fired, self.rows = np.zeros(spec.n_layers), np.zeros((spec.n_layers, spec.d_sae), bool), 0

    def add(self, params: clt.Params, x, y) -> None:
        d = CLTDictionary(self.spec, params)
        a = np.asarray(d.encode(x))
        y_hat = np.asarray(d.reconstruct(x), np.float64)
        y = np.asarray(y, np.float64)
        self.err2 += ((y_hat - y) ** 2).sum((0, 2))
        self.y1 += y.sum(0)
        self.y2 += (y**2).sum((0, 2))
        self.l0 += (a > 0).sum((0, 2))
        self.fired |= (a > 0).any(0)
        self.rows += len(y)

    def result(self) -> dict:
        var = self.y2 - (self.y1**2).sum(1) / max(self.rows, 1)
        fvu = self.err2 / np.maximum(var, 1e-30)
        return {"fvu": float(self.err2.sum() / max(var.sum(), 1e-30)), "fvu_per_layer": fvu.tolist(),
                "explained_variance_per_layer": (1 - fvu).tolist(), "l0": float(self.l0.sum() / max(self.rows, 1) /
                                                                                self.spec.n_layers),
                "l0_per_layer": (self.l0 / max(self.rows, 1)).tolist(), "dead_fraction": float(1 - self.fired.mean()),
                "eval_rows": self.rows}


def row_fidelity(spec: clt.CLTSpec, params: clt.Params, batches) -> dict:
    """The per-layer metrics over batches of rows [N, 2 L D] (inputs then targets, `clt.split_rows`):
    fvu (all layers' error over all layers' variance), fvu and explained variance per layer, mean and
    per-layer L0, and the fraction of features that never fired."""
    sums = _LayerSums(spec)
    for rows in batches:
        sums.add(params, *clt.split_rows(spec, jnp.asarray(rows, jnp.float32)))
    return sums.result()


def replacement_fidelity(model, spec: clt.CLTSpec, params: clt.Params, contexts_nt: np.ndarray, *,
                         batch: int = 8) -> dict:
    """The metrics of the module docstring over `contexts_nt` [N, T] (BOS first), and `row_fidelity`'s
    on the same contexts' activations in the original model."""
    inputs, targets = clt.sites(spec)
    ablate = Plan(edits=tuple((s, _zero) for s in targets))
    capture = Plan(capture=inputs + targets)
    sums = {"agree": 0.0, "kl": 0.0, "ce_o": 0.0, "ce_r": 0.0, "ce_a": 0.0, "n": 0}
    layers = _LayerSums(spec)
    for s in range(0, len(contexts_nt), batch):
        tok = jnp.asarray(contexts_nt[s : s + batch])
        orig = forward(model, tok, plan=capture)
        repl = replacement_forward(model, tok, spec, params).logits
        abl = forward(model, tok, plan=ablate).logits
        lp_o, ce_o = _next_token_terms(orig.logits, tok)
        lp_r, ce_r = _next_token_terms(repl, tok)
        _, ce_a = _next_token_terms(abl, tok)
        sums["agree"] += float(jnp.sum(jnp.argmax(lp_o, -1) == jnp.argmax(lp_r, -1)))
        sums["kl"] += float(jnp.sum(jnp.exp(lp_o) * (lp_o - lp_r)))
        sums["ce_o"] += float(jnp.sum(ce_o))
        sums["ce_r"] += float(jnp.sum(ce_r))
        sums["ce_a"] += float(jnp.sum(ce_a))
        sums["n"] += int(ce_o.size)
        # per layer, on the original activations (BOS rows left out, as in training)
        x = jnp.stack([orig.captured[i][:, 1:] for i in inputs], 2).reshape(-1, spec.n_layers, spec.d_model)
        y = jnp.stack([orig.captured[t][:, 1:] for t in targets], 2).reshape(-1, spec.n_layers, spec.d_model)
        layers.add(params, x, y)
    n = sums["n"]
    ce_o, ce_r, ce_a = sums["ce_o"] / n, sums["ce_r"] / n, sums["ce_a"] / n
    return {"agreement": sums["agree"] / n, "kl": sums["kl"] / n, "ce_original": ce_o, "ce_replacement": ce_r,
            "ce_ablated": ce_a, "ce_loss_score": (ce_a - ce_r) / (ce_a - ce_o) if ce_a != ce_o else float("nan"),
            **layers.result(), "eval_tokens": n}
