"""Cross-layer transcoders (CLTs) as pure functions over a parameter dict.

Axes: `B` batch, `L` covered layers, `D` d_model, `F` features per layer, `T` a source layer's
targets, `K` top-k.

A CLT covers L consecutive layers. Features of layer l read that layer's input site (normalised
`x_l`) and write to the MLP outputs of layers l .. l + T_l - 1, where T_l = min(span, L - l):

    h_l    = x_l @ W_enc[l] + b_enc[l]                                  [B, F]
    a_l    = act(h_l)               jumprelu(h, threshold[l]) or the row's top k (relu)
    y^_j   = b_dec[j] + sum over l <= j < l + T_l of  a_l @ W_dec_l[:, j - l, :]   (+ x_j @ W_skip[j])

Parameters (the layout shards every large array over `d_sae` on the `model` axis):

    W_enc     [L, D, F]      ("layer", "d_model", "d_sae")
    b_enc     [L, F]         ("layer", "d_sae");  threshold [L, F] for jumprelu
    W_dec_{l} [F, T_l, D]    ("d_sae", None, "d_model"), one array per source layer: the triangle
                             is stored without the L(L - 1)/2 empty blocks a dense [L, L, F, D] holds
    b_dec     [L, D]         ("layer", "d_model");  W_skip [L, D, D] when asked
    norm_in, norm_out [L]    buffers: per-layer scales with E||x_l||^2 = D (and the same for targets)

Weights: F * D * (L + sum_l T_l) (+ L D^2 with skips); sum_l T_l = L (L + 1) / 2 without a span.

Training loss (normalised units, every target layer weighted the same):

    mse      = sum_j mean_b ||y^_j - y_j||^2
    sparsity = lambda   * mean_b sum_{l, i} tanh(c * ||W_dec,l,i|| * a_{l,i})      (jumprelu)
    pre      = lambda_P * mean_b sum_{l, i} relu(threshold_{l,i} - h_{l,i}) * ||W_dec,l,i||
    where ||W_dec,l,i|| is feature (l, i)'s decoder vectors concatenated over all its targets.

The penalties follow Anthropic's recipe ("Circuit Tracing", Ameisen et al. 2025); top-k CLTs
(EleutherAI's recipe) train on the mse alone.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinterp.dictionaries import ops, sparse
from jaxinterp.dictionaries.activations import jumprelu_ste
from jaxinterp.errors import UsageError

ARCHITECTURE = "clt"
"""`dictionary.architecture` of a cross-layer transcoder."""
ACTIVATIONS = ("jumprelu", "topk")


def configured(dictionary_cfg) -> bool:
    """Whether a `DictionaryConfig` asks for a cross-layer transcoder (which reads every covered
    layer's sites instead of `data.site`)."""
    return dictionary_cfg.architecture == ARCHITECTURE
INPUT_POINTS = ("resid_mid", "mlp_in")
Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class CLTSpec:
    """The static shape of a cross-layer transcoder (hashable: a jit static argument)."""

    activation: str
    """jumprelu or topk."""
    n_layers: int
    """L: the layers covered (the first is `first_layer` of the model)."""
    d_model: int
    d_sae: int
    """F: features per layer."""
    k: int = 32
    """topk: features kept per layer and row."""
    span: int | None = None
    """Targets per source layer (None: every later layer), EleutherAI's `--cross_layer`."""
    skip: bool = False
    """A linear skip path W_skip[j] from each layer's input to its output."""
    first_layer: int = 0
    input_point: str = "resid_mid"
    """Where each layer's features read: resid_mid, or mlp_in (the MLP's normalised input)."""
    jumprelu_bandwidth: float = 0.05
    tanh_scale: float = 4.0
    """c in the tanh sparsity penalty."""
    compute_dtype: str = "float32"
    """Dtype of the encoder and decoder matmuls in training (parameters stay float32)."""
    post_encoder: bool = False
    """Per (source, target offset) offsets `post_enc_{l}` [F, T_l], added to each active feature's
    activation before that target's decoder: `(a + post_enc_l[:, o] [a > 0]) @ W_dec_l[:, o]`
    (EleutherAI clt-training's post-encoder, read from its runs; encode and reconstruct only)."""
    topk_path: str = "sparse"
    """topk training: `sparse` (each source layer's decoder [F, T D] read through `sparse.topk_decode`,
    whose backward touches only the selected rows; `auto`/`pallas` pick its kernels) or `dense` (a
    dense [B, F] code times the decoder, differentiated by autodiff: the reference)."""

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"CLT activation {self.activation!r}: choose one of {ACTIVATIONS}")
        if self.n_layers < 1 or self.d_model < 1 or self.d_sae < 1:
            raise UsageError(f"CLT n_layers={self.n_layers}, d_model={self.d_model}, d_sae={self.d_sae}: "
                             "all must be at least 1")
        if self.span is not None and self.span < 1:
            raise UsageError(f"CLT span={self.span}: give at least 1 (1 is a set of per-layer transcoders) or None")
        if self.input_point not in INPUT_POINTS:
            raise UsageError(f"CLT input_point {self.input_point!r}: choose one of {INPUT_POINTS}")
        if self.activation == "topk" and not 0 < self.k <= self.d_sae:
            raise UsageError(f"CLT k={self.k} must be in [1, d_sae={self.d_sae}]")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise UsageError(f"CLT compute_dtype {self.compute_dtype!r}: choose float32 or bfloat16")
        if self.topk_path not in ("sparse", "dense", "auto", "pallas"):
            raise UsageError(f"CLT topk_path {self.topk_path!r}: choose sparse, dense, auto or pallas")

    @property
    def selects_k(self) -> bool:
        """Each (row, layer) keeps its top k features (no sparsity penalty; aux-k for dead ones)."""
        return self.activation == "topk"

    @property
    def penalised(self) -> bool:
        """Trained with the tanh sparsity and pre-activation penalties (jumprelu)."""
        return self.activation == "jumprelu"

    def targets(self, layer: int) -> int:
        """T_l: how many layers source layer `layer` (0-based within the CLT) writes to."""
        span = self.n_layers if self.span is None else self.span
        return min(span, self.n_layers - layer)

    @property
    def n_weights(self) -> int:
        """Parameters, biases and thresholds included."""
        f, d, n = self.d_sae, self.d_model, self.n_layers
        dec = sum(self.targets(l) for l in range(n))
        return (f * d * (n + dec) + n * f * (2 if self.activation == "jumprelu" else 1) + n * d
                + (n * d * d if self.skip else 0) + (f * dec if self.post_encoder else 0))


def sites(spec: CLTSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the input site of each covered layer, its mlp_out), in layer order: what one forward captures."""
    layers = range(spec.first_layer, spec.first_layer + spec.n_layers)
    return (tuple(f"blocks.{l}.{spec.input_point}" for l in layers), tuple(f"blocks.{l}.mlp_out" for l in layers))


def split_rows(spec: CLTSpec, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows [N, 2 L D] of the sites `sites(spec)` side by side (inputs, then targets) as (x [N, L, D],
    y [N, L, D]): a CLT's training batch stays one array, as a transcoder's does."""
    n, (l, d) = rows.shape[0], (spec.n_layers, spec.d_model)
    if rows.shape[1:] != (2 * l * d,):
        raise UsageError(f"CLT rows of shape {tuple(rows.shape)}: expected [N, {2 * l * d}] (the {l} input sites, "
                         f"then the {l} mlp_out sites, {d} each)")
    return rows[:, : l * d].reshape(n, l, d), rows[:, l * d :].reshape(n, l, d)


def param_axes(spec: CLTSpec) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of every parameter and buffer."""
    axes = {"W_enc": ("layer", "d_model", "d_sae"), "b_enc": ("layer", "d_sae"), "b_dec": ("layer", "d_model"),
            "norm_in": ("layer",), "norm_out": ("layer",)}
    axes |= {f"W_dec_{l}": ("d_sae", None, "d_model") for l in range(spec.n_layers)}
    if spec.activation == "jumprelu":
        axes["threshold"] = ("layer", "d_sae")
    if spec.skip:
        axes["W_skip"] = ("layer", "d_model", None)
    if spec.post_encoder:
        axes |= {f"post_enc_{l}": ("d_sae", None) for l in range(spec.n_layers)}
    return axes


def init(key: jax.Array, spec: CLTSpec, *, threshold: float = 0.03) -> Params:
    """Encoders uniform in +-1/sqrt(D), decoders in +-1/sqrt(L * F) (summed over up to L sources),
    biases zero, thresholds `threshold`, skips zero, scales one."""
    n, d, f = spec.n_layers, spec.d_model, spec.d_sae
    keys = jax.random.split(key, n + 1)
    enc = 1.0 / d**0.5
    dec = 1.0 / (n * f) ** 0.5
    p = {"W_enc": jax.random.uniform(keys[0], (n, d, f), jnp.float32, -enc, enc),
         "b_enc": jnp.zeros((n, f), jnp.float32), "b_dec": jnp.zeros((n, d), jnp.float32),
         "norm_in": jnp.ones((n,), jnp.float32), "norm_out": jnp.ones((n,), jnp.float32)}
    for l in range(n):
        p[f"W_dec_{l}"] = jax.random.uniform(keys[l + 1], (f, spec.targets(l), d), jnp.float32, -dec, dec)
    if spec.activation == "jumprelu":
        p["threshold"] = jnp.full((n, f), threshold, jnp.float32)
    if spec.skip:
        p["W_skip"] = jnp.zeros((n, d, d), jnp.float32)
    if spec.post_encoder:
        p |= {f"post_enc_{l}": jnp.zeros((f, spec.targets(l)), jnp.float32) for l in range(n)}
    return p


def decoder_norms(spec: CLTSpec, params: Params) -> jax.Array:
    """[L, F] the norm of each feature's decoder vectors concatenated over all its targets."""
    return jnp.stack([jnp.sqrt(jnp.sum(params[f"W_dec_{l}"] ** 2, axis=(1, 2))) for l in range(spec.n_layers)])


def pre_acts(spec: CLTSpec, params: Params, xn_bld: jax.Array) -> jax.Array:
    """h [B, L, F] of normalised inputs."""
    return jnp.einsum("bld,ldf->blf", xn_bld, params["W_enc"]) + params["b_enc"]


def activate(spec: CLTSpec, params: Params, h_blf: jax.Array) -> jax.Array:
    """a [B, L, F]: jumprelu against each feature's threshold, or each (row, layer)'s top k."""
    if spec.activation == "jumprelu":
        return jumprelu_ste(h_blf, params["threshold"], spec.jumprelu_bandwidth)
    kth = jax.lax.top_k(h_blf, spec.k)[0][..., -1:]  # ties at the k-th value keep more than k
    return jnp.where(h_blf >= kth, jax.nn.relu(h_blf), 0.0)


def decode(spec: CLTSpec, params: Params, a_blf: jax.Array, xn_bld: jax.Array | None = None) -> jax.Array:
    """y^ [B, L, D] (normalised units): every source layer's features written to its targets."""
    b = a_blf.shape[0]
    out = jnp.broadcast_to(params["b_dec"], (b, spec.n_layers, spec.d_model))
    for l in range(spec.n_layers):
        t = spec.targets(l)
        if spec.post_encoder:  # each target reads the active features shifted by its own offsets
            a = a_blf[:, l, :, None] + (a_blf[:, l, :, None] > 0) * params[f"post_enc_{l}"]
            out = out.at[:, l : l + t].add(jnp.einsum("bft,ftd->btd", a, params[f"W_dec_{l}"]))
        else:
            out = out.at[:, l : l + t].add(jnp.einsum("bf,ftd->btd", a_blf[:, l], params[f"W_dec_{l}"]))
    if spec.skip:
        if xn_bld is None:
            raise UsageError("a CLT with skips decodes from its inputs too: pass xn_bld")
        out = out + jnp.einsum("bld,lde->ble", xn_bld, params["W_skip"])
    return out


def layer_encoder(spec: CLTSpec, params: Params, layer: int) -> Params:
    """Layer `layer`'s encoder alone (W_enc [D, F], b_enc, norm_in, threshold for jumprelu): what
    `activate(spec, p, (x * p["norm_in"]) @ p["W_enc"] + p["b_enc"])` needs at that layer's site."""
    return {name: params[name][layer] for name in ("W_enc", "b_enc", "norm_in", "threshold") if name in params}


def normalise_in(params: Params, x_bld: jax.Array) -> jax.Array:
    return x_bld * params["norm_in"][:, None]


def normalise_out(params: Params, y_bld: jax.Array) -> jax.Array:
    return y_bld * params["norm_out"][:, None]


def encode(spec: CLTSpec, params: Params, x_bld: jax.Array) -> jax.Array:
    """Feature activations [B, L, F] of raw inputs [B, L, D]."""
    return activate(spec, params, pre_acts(spec, params, normalise_in(params, x_bld)))


def reconstruct(spec: CLTSpec, params: Params, x_bld: jax.Array) -> jax.Array:
    """The CLT's raw output [B, L, D] for raw inputs [B, L, D] (every covered layer's mlp_out)."""
    xn = normalise_in(params, x_bld)
    return decode(spec, params, activate(spec, params, pre_acts(spec, params, xn)), xn) / params["norm_out"][:, None]


class LossWeights(NamedTuple):
    sparsity: jax.Array | float = 0.0
    """lambda of the tanh penalty (jumprelu; warm it up from 0)."""
    pre_act: jax.Array | float = 0.0
    """lambda_P of the pre-activation penalty (jumprelu)."""


class CLTOutput(NamedTuple):
    loss: jax.Array
    mse: jax.Array
    """sum over target layers of the per-row squared error, mean over rows (normalised units)."""
    mse_per_layer: jax.Array
    """[L] each target layer's share of `mse`."""
    sparsity: jax.Array
    pre_act: jax.Array
    l0_per_layer: jax.Array
    """[L] mean active features per row."""
    acts: jax.Array | None
    """[B, L, F] (None on the sparse topk path, which never forms it)."""
    codes: tuple[jax.Array, jax.Array] | None = None
    """topk on the sparse path: (values [B, L, K], feature ids [B, L, K])."""
    pre_acts: jax.Array | None = None
    """h [B, L, F]."""
    err: jax.Array | None = None
    """y^ - y [B, L, D], normalised units."""


def _codes(spec: CLTSpec, h_blf: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(values [B, L, K] >= 0, feature ids [B, L, K]): each (row, layer)'s top k, selected per layer
    so that a d_sae split over the mesh merges candidates instead of gathering [B, F] (`ops.topk`)."""
    picks = [ops.topk(h_blf[:, l], spec.k) for l in range(spec.n_layers)]
    return jax.nn.relu(jnp.stack([v for v, _ in picks], 1)), jnp.stack([i for _, i in picks], 1)


def decode_sparse(spec: CLTSpec, params: Params, vals_blk: jax.Array, idx_blk: jax.Array,
                  xn_bld: jax.Array | None = None) -> jax.Array:
    """`decode` of top-k codes: source layer l's decoder, viewed as [F, T_l D], is read at the k
    selected rows only, forward and backward (`sparse.topk_decode`: only those rows get gradient)."""
    if spec.post_encoder:
        raise UsageError("a CLT with post-encoder offsets (read from clt-training) decodes densely only: "
                         "use clt.decode / reconstruct")
    b, dt = vals_blk.shape[0], jnp.dtype(spec.compute_dtype)
    out = jnp.broadcast_to(params["b_dec"], (b, spec.n_layers, spec.d_model))
    for l in range(spec.n_layers):
        t = spec.targets(l)
        table = params[f"W_dec_{l}"].reshape(spec.d_sae, t * spec.d_model).astype(dt)
        y = sparse.topk_decode(vals_blk[:, l].astype(dt), idx_blk[:, l], table, path=spec.topk_path)
        out = out.at[:, l : l + t].add(y.astype(jnp.float32).reshape(b, t, spec.d_model))
    if spec.skip:
        out = out + _skip(spec, params, xn_bld)
    return out


def _skip(spec: CLTSpec, params: Params, xn_bld: jax.Array | None) -> jax.Array:
    if xn_bld is None:
        raise UsageError("a CLT with skips decodes from its inputs too: pass xn_bld")
    return _einsum(spec, "bld,lde->ble", xn_bld, params["W_skip"])


def _pre_acts_dt(spec: CLTSpec, params: Params, xn_bld: jax.Array) -> jax.Array:
    return _einsum(spec, "bld,ldf->blf", xn_bld, params["W_enc"]) + params["b_enc"]


def _einsum(spec: CLTSpec, eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """A batched matmul with both operands in the compute dtype, returned as float32 (XLA's CPU
    runtime has no bfloat16 x bfloat16 -> float32 batched dot, so the product is cast after)."""
    dt = jnp.dtype(spec.compute_dtype)
    return jnp.einsum(eq, a.astype(dt), b.astype(dt)).astype(jnp.float32)


def forward(spec: CLTSpec, params: Params, x_bld: jax.Array, y_bld: jax.Array, weights: LossWeights) -> CLTOutput:
    """The training loss of raw inputs [B, L, D] against raw targets [B, L, D]. A topk CLT on the
    `sparse` path (the default) decodes from its [B, L, K] codes and returns `acts` None."""
    xn, yn = normalise_in(params, x_bld), normalise_out(params, y_bld)
    h = _pre_acts_dt(spec, params, xn)
    codes = None
    if spec.activation == "topk" and spec.topk_path != "dense":
        codes = _codes(spec, h)
        a = None
        y_hat = decode_sparse(spec, params, *codes, xn)
    else:
        a = activate(spec, params, h)
        dt = jnp.dtype(spec.compute_dtype)
        low = {k: v.astype(dt) if k.startswith("W_dec_") or k == "W_skip" else v for k, v in params.items()}
        y_hat = decode(spec, low, a.astype(dt), xn.astype(dt)).astype(jnp.float32)
    err = y_hat - yn
    mse_per_layer = jnp.mean(jnp.sum(err**2, axis=-1), axis=0)
    mse = jnp.sum(mse_per_layer)
    sparsity = pre = jnp.float32(0.0)
    if spec.activation == "jumprelu":
        norms = decoder_norms(spec, params)
        sparsity = jnp.mean(jnp.sum(jnp.tanh(spec.tanh_scale * norms * a), axis=(1, 2)))
        pre = jnp.mean(jnp.sum(jax.nn.relu(params["threshold"] - h) * norms, axis=(1, 2)))
    loss = mse + weights.sparsity * sparsity + weights.pre_act * pre
    on = (codes[0] > 0) if codes is not None else (a > 0)
    l0 = jnp.mean(jnp.sum(on, axis=-1), axis=0)
    return CLTOutput(loss, mse, mse_per_layer, sparsity, pre, l0, a, codes, h, err)


def fired(spec: CLTSpec, out: CLTOutput) -> jax.Array:
    """[L, F] bool: the features that fired on some row of the batch."""
    if out.codes is None:
        return jnp.any(out.acts > 0, axis=0)
    vals, idx = out.codes
    on = (vals > 0).transpose(1, 0, 2).reshape(spec.n_layers, -1)
    ids = idx.transpose(1, 0, 2).reshape(spec.n_layers, -1)
    return jax.vmap(lambda i, o: jnp.zeros((spec.d_sae,), jnp.bool_).at[i].max(o))(ids, on)


def aux_k_loss(spec: CLTSpec, params: Params, x_bld: jax.Array, out: CLTOutput, dead_lf: jax.Array,
               aux_k: int) -> jax.Array:
    """EleutherAI's aux-k loss for a topk CLT: each layer's `aux_k` largest pre-activations among
    its dead features `dead_lf` [L, F] decode (through the same sparse decoder, no bias) into the
    main reconstruction's error, held constant; the squared error of that fit divided by the
    error's own squared norm, so the term is scale-free. 0 when no feature is dead."""
    err = jax.lax.stop_gradient(out.err)  # y^ - y, normalised units
    h = jnp.where(dead_lf[None], out.pre_acts, -jnp.inf)
    picks = [ops.topk(h[:, l], aux_k) for l in range(spec.n_layers)]
    vals = jnp.where(jnp.isfinite(jnp.stack([v for v, _ in picks], 1)), jnp.stack([v for v, _ in picks], 1), 0.0)
    vals = jax.nn.relu(vals)
    idx = jnp.stack([i for _, i in picks], 1)
    zero = params | {"b_dec": jnp.zeros_like(params["b_dec"])}
    aux_spec = dataclasses.replace(spec, skip=False)
    fit = decode_sparse(aux_spec, zero, vals, idx)
    total = jnp.sum(jnp.mean(jnp.sum((fit + err) ** 2, -1), 0))
    scale = jnp.maximum(jnp.sum(jnp.mean(jnp.sum(err**2, -1), 0)), 1e-12)
    return jnp.where(jnp.any(dead_lf), total / scale, 0.0)


def project_decoder_grad(spec: CLTSpec, grads: Params, params: Params) -> Params:
    """Each feature's decoder gradient without its component along the feature's (unit-norm)
    decoder vectors concatenated over all its targets (topk CLTs keep those at norm one)."""
    out = dict(grads)
    for l in range(spec.n_layers):
        w, g = params[f"W_dec_{l}"], grads[f"W_dec_{l}"]
        out[f"W_dec_{l}"] = g - jnp.sum(g * w, axis=(1, 2), keepdims=True) * w
    return out


def normalise_decoder(spec: CLTSpec, params: Params) -> Params:
    """Each feature's concatenated decoder vectors scaled to norm one."""
    out = dict(params)
    for l in range(spec.n_layers):
        w = params[f"W_dec_{l}"]
        out[f"W_dec_{l}"] = w / jnp.maximum(jnp.sqrt(jnp.sum(w**2, axis=(1, 2), keepdims=True)), 1e-12)
    return out


def clamp_params(spec: CLTSpec, params: Params) -> Params:
    """jumprelu thresholds kept >= 0 after an update."""
    return params | ({"threshold": jnp.maximum(params["threshold"], 0.0)} if "threshold" in params else {})


BUFFERS = ("norm_in", "norm_out")
"""Parameters that are not trained: the per-layer scales."""


def split_params(params: Params) -> tuple[Params, Params]:
    """(trainable, buffers)."""
    return ({k: v for k, v in params.items() if k not in BUFFERS}, {k: v for k, v in params.items() if k in BUFFERS})


def fit_to_data(spec: CLTSpec, params: Params, x_bld: jax.Array, y_bld: jax.Array, *, normalize: bool = True) -> Params:
    """Per-layer scales with E||x_l||^2 = D (and the same for each target), from raw rows, and b_dec
    at the mean of the normalised targets."""
    d = spec.d_model
    if normalize:
        norm_in = jnp.sqrt(d / jnp.maximum(jnp.mean(jnp.sum(x_bld.astype(jnp.float32) ** 2, -1), 0), 1e-12))
        norm_out = jnp.sqrt(d / jnp.maximum(jnp.mean(jnp.sum(y_bld.astype(jnp.float32) ** 2, -1), 0), 1e-12))
    else:
        norm_in = norm_out = jnp.ones((spec.n_layers,), jnp.float32)
    b_dec = jnp.mean(y_bld.astype(jnp.float32) * norm_out[:, None], axis=0)
    return params | {"norm_in": norm_in, "norm_out": norm_out, "b_dec": b_dec}


def typical_rows(spec: CLTSpec, rows: jax.Array, ratio: float) -> jax.Array:
    """[N] bool: rows none of whose sites' norms exceed `ratio` times that site's median over the batch."""
    n = rows.shape[0]
    norms = jnp.sqrt(jnp.sum(rows.astype(jnp.float32).reshape(n, 2 * spec.n_layers, spec.d_model) ** 2, -1))
    return jnp.all(norms <= ratio * jnp.median(norms, axis=0), axis=-1)


def replace_outliers(spec: CLTSpec, rows: jax.Array, ratio: float) -> jax.Array:
    """Rows [N, 2 L D] with each atypical row (`typical_rows`) replaced by a typical row of the
    batch, cycling; unchanged when `ratio` is 0 (the SAE trainer's rule, per site)."""
    if not ratio:
        return rows
    keep = typical_rows(spec, rows, ratio)
    order = jnp.argsort(~keep, stable=True)
    n_keep = jnp.maximum(jnp.sum(keep), 1)
    rank = jnp.cumsum(~keep) - 1
    return jnp.where(keep[:, None], rows, rows[order[jnp.where(keep, 0, rank) % n_keep]])


class MemoryEstimate(NamedTuple):
    """Bytes per device of a training step, on a mesh of `data` x `model` devices."""

    weights: int
    optimizer: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations


def memory_estimate(spec: CLTSpec, *, batch: int, data: int = 1, model: int = 1, weight_bytes: int = 4,
                    optimizer_slots: int = 2) -> MemoryEstimate:
    """Per-device bytes of training: weights split over `model` by d_sae (the small [L, D] biases
    and scales replicated), Adam's `optimizer_slots` float32 copies and one float32 gradient of
    them, and activations of `batch` rows split over `data` (and their F axis over `model`):
    inputs and targets 2 L D, and per feature pre-activation, activation and their gradients,
    4 L F, float32."""
    n, d, f = spec.n_layers, spec.d_model, spec.d_sae
    replicated = 2 * n * d + 2 * n + (n * d * d if spec.skip else 0)
    split = spec.n_weights - replicated
    per_device = split // model + replicated
    rows = -(-batch // data)
    return MemoryEstimate(weights=per_device * weight_bytes, optimizer=per_device * 4 * optimizer_slots,
                          gradients=per_device * 4, activations=rows * (2 * n * d + 4 * n * f // model) * 4)


def check_memory(estimate: MemoryEstimate, budget_bytes: int, *, what: str = "this CLT") -> None:
    """Raise a one-line `UsageError` with the numbers when `estimate` exceeds `budget_bytes`."""
    if estimate.total > budget_bytes:
        gib = 2**30
        raise UsageError(
            f"{what} needs {estimate.total / gib:.2f} GiB per device (weights {estimate.weights / gib:.2f}, "
            f"optimizer {estimate.optimizer / gib:.2f}, gradients {estimate.gradients / gib:.2f}, activations "
            f"{estimate.activations / gib:.2f}) over the budget of {budget_bytes / gib:.2f} GiB; split d_sae over "
            "more devices (mesh model axis), shrink the batch, d_sae or the span, or raise the budget")
