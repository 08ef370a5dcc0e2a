"""Attribution graphs: every edge of the replacement model's computation on one prompt, linearised.

Axes: `L` model layers, `Lc` layers the transcoders cover, `T` prompt positions, `D` d_model, `F`
features per layer, `R` rows computed together, `N` graph nodes, `K` logit nodes.

Nodes, in circuit-tracer's order: active features (model layer, position, feature id) sorted, one
error node per (layer, position) layer-major, one token node per position, and the logit nodes (the
most probable next tokens at the last position, until their probabilities sum to `logit_probability`,
at most `max_logits`). Features and errors at position 0 (the BOS token) are zeroed.

The linearised model: attention patterns and every norm's scale are constants (`Plan.linearise`), and
each MLP output is `skip + stop_gradient(mlp_out - skip)` (skip = the transcoder's `W_skip` path, else
0), so the forward's value is the model's and the map from what nodes write to what nodes read is
linear. A node writes a vector into the residual stream:

    feature (l, p, f):  a * W_dec_l[f, t] / norm_out[l + t]   at mlp_out of every layer l + t it writes to
    error (j, p):       mlp_out_j - the transcoders' reconstruction at layer j   (all of mlp_out where no
                        transcoder covers j)
    token p:            its embedding (without learned positions)

and reads one: a feature its encoder row `W_enc[l, :, f] * norm_in[l]` at its input site, a logit
`W_U[:, v] - mean_v W_U` at the final norm's output at the last position. The edge s -> t is what s
writes, pushed through the linearised model, read by t. A row (one target, every source) is one VJP of
the linearised map; rows go in batches as a `vmap` of that VJP over cotangents, in chunks sized so the
chunk's gradients [R, L + 1, T, D] fit `memory_gib`.

Which features get rows (`max_feature_nodes`): circuit-tracer's greedy rule. Logit rows first; then,
in rounds of `update_interval * batch_size`, the not yet visited features of largest influence on
the logits through the rows so far. The graph holds the rows of the selected features and the
logits ([R, N], never [N, N]); pruning works on those rows (`pruning.py`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinterp.dictionaries import clt
from jaxinterp.errors import UsageError
from jaxinterp.models import Plan
from jaxinterp.models.decoder import causal_mask, traced_forward
from jaxinterp.models.intercept import HELD, Recorder


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
    max_logits: int = 10
    """At most this many logit nodes."""
    logit_probability: float = 0.95
    """Logit nodes until their probabilities sum to at least this."""
    max_feature_nodes: int | None = None
    """Feature rows to compute (None: every active feature)."""
    batch_size: int = 512
    """Features per greedy step (circuit-tracer's `batch_size`); the ranking is refreshed every
    `update_interval` steps."""
    update_interval: int = 4
    memory_gib: float = 1.0
    """Working memory of one chunk of rows (the gradients of every row in it)."""

    def __post_init__(self):
        if self.max_logits < 1 or not 0.0 < self.logit_probability <= 1.0:
            raise UsageError(f"max_logits={self.max_logits}, logit_probability={self.logit_probability}: give "
                             "max_logits >= 1 and a probability in (0, 1]")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise UsageError(f"max_feature_nodes={self.max_feature_nodes}: give a count >= 0 or None for all")
        if self.batch_size < 1 or self.update_interval < 1 or self.memory_gib <= 0:
            raise UsageError("batch_size and update_interval must be >= 1 and memory_gib > 0")


@dataclasses.dataclass
class Graph:
    """An unpruned attribution graph in circuit-tracer's node order (see the module docstring)."""

    input_ids: np.ndarray
    """[T] the prompt, BOS first."""
    active_features: np.ndarray
    """[n, 3] every active feature (model layer, position, feature id), sorted."""
    activation_values: np.ndarray
    """[n]"""
    selected_features: np.ndarray
    """[M] indices into `active_features` of the features that are nodes (with rows), ascending."""
    logit_token_ids: np.ndarray
    """[K] by descending probability."""
    logit_probabilities: np.ndarray
    rows: np.ndarray
    """[M + K, N] float32: the rows of the selected features, then of the logits; columns in node order."""
    n_layers: int
    """L: model layers (error nodes per position)."""
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_token_ids)

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    @property
    def row_nodes(self) -> np.ndarray:
        """[M + K] the node of each row."""
        return np.concatenate([np.arange(self.n_features), np.arange(self.n_nodes - self.n_logits, self.n_nodes)])

    @property
    def logit_weights(self) -> np.ndarray:
        """[N] the logit probabilities at the logit nodes, zero elsewhere."""
        w = np.zeros(self.n_nodes, np.float32)
        w[self.n_nodes - self.n_logits:] = self.logit_probabilities
        return w

    def node_kinds(self) -> np.ndarray:
        """[N] 0 feature, 1 error, 2 token, 3 logit."""
        counts = (self.n_features, self.n_layers * self.n_pos, self.n_pos, self.n_logits)
        return np.repeat(np.arange(4), counts)

    def adjacency(self) -> np.ndarray:
        """The dense [N, N] matrix (rows targets) circuit-tracer holds; use for small graphs only."""
        a = np.zeros((self.n_nodes, self.n_nodes), np.float32)
        a[self.row_nodes] = self.rows
        return a


def with_bos(ids, tokenizer) -> list[int]:
    """circuit-tracer's rule: keep the ids if the first is a special token, else prepend the first
    non-zero of (BOS, PAD, EOS, the other special tokens)."""
    ids = [int(i) for i in ids]
    special = tuple(getattr(tokenizer, "special_ids", ()))
    if ids and ids[0] in special:
        return ids
    declared = getattr(tokenizer, "declared_special", None)
    if declared:  # an HF tokenizer's own bos / pad / eos, as transformers reports them
        candidates = [declared.get("bos"), declared.get("pad"), declared.get("eos"), *special]
    else:
        candidates = [getattr(tokenizer, "bos_id", None), getattr(tokenizer, "pad_id", None),
                      getattr(tokenizer, "eos_id", None), *special]
    bos = next((c for c in candidates if c), None)
    if bos is None:
        raise UsageError("the tokenizer has no special token to put at position 0; pass ids that start with one")
    return [bos, *ids]


# --- the prompt's forward: features, errors, tokens, logits --------------------------------------


@dataclasses.dataclass
class Prompt:
    """What one forward of the prompt gives attribution (host arrays unless noted)."""

    tokens: np.ndarray
    logits: np.ndarray
    """[V] at the last position."""
    feat_layer: np.ndarray
    """[n] model layer of each active feature; with `feat_pos`, `feat_id`, `feat_act`."""
    feat_pos: np.ndarray
    feat_id: np.ndarray
    feat_act: np.ndarray
    errors: jax.Array
    """[L, T, D] what each error node writes."""
    token_vectors: jax.Array
    """[T, D]"""
    held: dict
    """The frozen norm scales, queries and keys of this forward (`Plan.linearise`)."""
    resid_pre: jax.Array
    """[L, T, D] every block's input."""
    resid_last: jax.Array
    """[T, D] the last block's output (the final norm's input)."""
    mlp_const: jax.Array
    """[L, T, D] each MLP's output less its skip path: a constant of the linearised model."""


def _site_values(model, tokens, spec: clt.CLTSpec):
    inputs, _ = clt.sites(spec)
    n = model.cfg.n_layers
    outs = tuple(f"blocks.{j}.mlp_out" for j in range(n))
    resid = tuple(f"blocks.{j}.resid_pre" for j in range(n)) + (f"blocks.{n - 1}.resid_post",)
    graphdef, state = nnx.split(model)
    plan = Plan(capture=tuple(dict.fromkeys(inputs + outs + resid)), linearise=True)
    return _capture(graphdef, state, jnp.asarray(tokens, jnp.int32)[None], plan), inputs, outs


@partial(jax.jit, static_argnames=("graphdef", "plan"))
def _capture(graphdef, state, tokens_bt, plan):
    res = traced_forward(graphdef, state, tokens_bt, jnp.ones(tokens_bt.shape, jnp.int32), {}, plan)
    return res.logits[0, -1], res.captured


@partial(jax.jit, static_argnames=("spec",))
def _features_and_reconstruction(spec: clt.CLTSpec, params, x_ltd):
    x = jnp.swapaxes(x_ltd, 0, 1).astype(jnp.float32)  # [T, Lc, D]
    xn = clt.normalise_in(params, x)
    a = clt.activate(spec, params, clt.pre_acts(spec, params, xn))
    a = a.at[0].set(0.0)  # position 0 (BOS) has no features
    y = clt.decode(spec, params, a, xn) / params["norm_out"][:, None]
    return jnp.swapaxes(a, 0, 1), jnp.swapaxes(y, 0, 1)  # [Lc, T, F], [Lc, T, D]


def _token_vectors(model, tokens) -> jax.Array:
    x = jnp.take(model.embed[...], jnp.asarray(tokens), axis=0).astype(jnp.float32)
    if model.cfg.embed_scale is not None:
        x = x * model.cfg.embed_scale
    return x


def unembedding(model) -> jax.Array:
    """W_U [D, V]."""
    return model.embed[...].T if model.lm_head is None else model.lm_head[...]


def logit_targets(logits_v, max_logits: int, probability: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities): the top `max_logits` next tokens, cut after the first whose
    cumulative probability reaches `probability` (circuit-tracer's rule)."""
    p = jax.nn.softmax(jnp.asarray(logits_v, jnp.float32))
    top_p, top_i = jax.lax.top_k(p, max_logits)
    cut = int(np.searchsorted(np.cumsum(np.asarray(top_p)), probability, side="left")) + 1
    return np.asarray(top_i[:cut]), np.asarray(top_p[:cut])


def prepare(model, tokens, spec: clt.CLTSpec, params: clt.Params) -> Prompt:
    """One forward of the prompt: the active features, the error and token vectors, the logits."""
    cfg = model.cfg
    if spec.d_model != cfg.d_model or spec.first_layer + spec.n_layers > cfg.n_layers:
        raise UsageError(f"the transcoders cover layers {spec.first_layer}..{spec.first_layer + spec.n_layers - 1} "
                         f"of width {spec.d_model}; the model has {cfg.n_layers} layers of {cfg.d_model}")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 1 or len(tokens) < 2:
        raise UsageError(f"a prompt of shape {tokens.shape}: give one sequence of at least 2 ids (BOS first)")
    (logits, cap), inputs, outs = _site_values(model, tokens, spec)
    x = jnp.stack([cap[s][0] for s in inputs])
    acts, recon = _features_and_reconstruction(spec, params, x)
    mlp = jnp.stack([cap[s][0] for s in outs])
    first = spec.first_layer
    errors = mlp.astype(jnp.float32).at[first:first + spec.n_layers].add(-recon).at[:, 0].set(0.0)
    const = mlp
    if spec.skip:
        skip = jnp.einsum("ltd,lde->lte", x.astype(jnp.float32) * params["norm_in"][:, None, None], params["W_skip"])
        const = mlp.at[first:first + spec.n_layers].add(-(skip / params["norm_out"][:, None, None]).astype(mlp.dtype))
    a = np.asarray(acts)
    l, p, f = np.nonzero(a)  # row-major: sorted by (layer, position, feature)
    return Prompt(tokens=tokens, logits=np.asarray(logits), feat_layer=(l + first).astype(np.int32),
                  feat_pos=p.astype(np.int32), feat_id=f.astype(np.int32), feat_act=a[l, p, f].astype(np.float32),
                  errors=errors, token_vectors=_token_vectors(model, tokens), held=cap[HELD], mlp_const=const,
                  resid_pre=jnp.stack([cap[f"blocks.{j}.resid_pre"][0] for j in range(cfg.n_layers)]),
                  resid_last=cap[f"blocks.{cfg.n_layers - 1}.resid_post"][0])


# --- the linearised map and its rows -------------------------------------------------------------


def _frozen_mlp(skip: bool, x_btd, p, positions_bt, *read):
    """skip + (mlp_out - skip of the prompt's forward, a constant) + delta."""
    del positions_bt
    out = jax.lax.stop_gradient(p["const"]) + p.get("delta", 0.0)
    if skip:
        (x_in,) = read
        out = out + ((x_in.astype(jnp.float32) * p["norm_in"]) @ p["W_skip"] / p["norm_out"]).astype(x_btd.dtype)
    return out.astype(x_btd.dtype)


def _add_delta(x_btd, p, positions_bt):
    del positions_bt
    return x_btd + p["delta"]


def linearised_plan(spec: clt.CLTSpec, n_layers: int) -> Plan:
    """The plan of the linearised model: a `delta` added at `embed` and at every mlp_out (the points
    where nodes write), each MLP's output held at the prompt's (its skip path live), patterns and
    norm scales held, capturing every covered input site and `final`."""
    inputs, _ = clt.sites(spec)
    edits = [("embed", _add_delta)]
    for j in range(n_layers):
        l = j - spec.first_layer
        if spec.skip and 0 <= l < spec.n_layers:
            edits.append((f"blocks.{j}.mlp_out", partial(_frozen_mlp, True), inputs[l]))
        else:
            edits.append((f"blocks.{j}.mlp_out", partial(_frozen_mlp, False)))
    return Plan(capture=(*inputs, "final"), edits=tuple(edits), linearise=True)


def _edit_params(spec: clt.CLTSpec, params, held, mlp_const, deltas) -> dict:
    """Edit parameters of `linearised_plan` for deltas {"embed": [T, D], "mlp": [L, T, D]}."""
    out = {"embed": {"delta": deltas["embed"][None]}, HELD: held}
    for j in range(deltas["mlp"].shape[0]):
        ep = {"delta": deltas["mlp"][j][None], "const": mlp_const[j][None]}
        l = j - spec.first_layer
        if spec.skip and 0 <= l < spec.n_layers:
            ep |= {"W_skip": params["W_skip"][l], "norm_in": params["norm_in"][l], "norm_out": params["norm_out"][l]}
        out[f"blocks.{j}.mlp_out"] = ep
    return out


def _linearised(graphdef, state, tokens, spec: clt.CLTSpec, params, held, mlp_const):
    """f(deltas) -> (covered input sites [Lc, T, D], final [T, D]): the frozen model, affine in deltas."""
    n_layers = mlp_const.shape[0]
    plan = linearised_plan(spec, n_layers)
    mask = jnp.ones((1, tokens.shape[0]), jnp.int32)

    def f(deltas):
        res = traced_forward(graphdef, state, tokens[None], mask, _edit_params(spec, params, held, mlp_const, deltas),
                             plan)
        inputs, _ = clt.sites(spec)
        return jnp.stack([res.captured[s][0] for s in inputs]).astype(jnp.float32), res.captured["final"][0].astype(
            jnp.float32)

    return f


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """Static sizes of one prompt's row computation (padded, so prompts of similar size share)."""

    n_layers: int
    rows: int
    slots: int
    """Feature writes per (layer, position), padded."""
    features: int
    """Feature columns, padded (the last ones are a sink for padded writes)."""
    positions: int
    """Positions per block of the feature-edge loop."""


def _decoder_table(spec: clt.CLTSpec, params) -> tuple[jax.Array, np.ndarray]:
    """(every source layer's decoder rows stacked [F * sum_l T_l, D], the offset of each layer)."""
    offsets = np.cumsum([0] + [spec.d_sae * spec.targets(l) for l in range(spec.n_layers)])
    table = jnp.concatenate([params[f"W_dec_{l}"].reshape(-1, spec.d_model) for l in range(spec.n_layers)])
    return table, offsets


def _slots(spec: clt.CLTSpec, prompt: Prompt, n_layers: int, offsets: np.ndarray, norm_out: np.ndarray):
    """The features' writes grouped by where they land: [L, T, S] arrays of (feature index, decoder
    table row, scale a / norm_out[target]); empty slots point at feature `n` (a sink) with scale 0."""
    first, n_pos, n = spec.first_layer, len(prompt.tokens), len(prompt.feat_act)
    t_of = np.asarray([spec.targets(i) for i in range(spec.n_layers)])
    l = prompt.feat_layer - first
    t_l = t_of[l]
    feat = np.repeat(np.arange(n), t_l)
    t = np.arange(len(feat)) - np.repeat(np.cumsum(t_l) - t_l, t_l)
    src = np.repeat(l, t_l)
    target = src + t
    row = offsets[src] + np.repeat(prompt.feat_id, t_l) * t_of[src] + t
    scale = np.repeat(prompt.feat_act, t_l) / norm_out[target]
    where = (target + first) * n_pos + np.repeat(prompt.feat_pos, t_l)
    order = np.argsort(where, kind="stable")
    where, feat, row, scale = where[order], feat[order], row[order], scale[order]
    counts = np.bincount(where, minlength=n_layers * n_pos)
    s = max(8, -(-int(counts.max(initial=0)) // 8) * 8)
    slot = np.arange(len(where)) - np.repeat(np.cumsum(counts) - counts, counts)
    out_feat = np.full((n_layers * n_pos, s), n, np.int32)
    out_row = np.zeros((n_layers * n_pos, s), np.int32)
    out_scale = np.zeros((n_layers * n_pos, s), np.float32)
    out_feat[where, slot], out_row[where, slot], out_scale[where, slot] = feat, row, scale
    shape = (n_layers, n_pos, s)
    return out_feat.reshape(shape), out_row.reshape(shape), out_scale.reshape(shape)


def _bucket(n: int, quantum: int = 256) -> int:
    """n rounded up to one of 8 steps per power of two (at most 1/8 padding), at least `quantum`."""
    if n <= quantum:
        return quantum
    step = 2 ** max(int(math.log2(n)) - 3, 0)
    return -(-n // step) * step


def block_plan(spec: clt.CLTSpec, layer: int) -> Plan:
    """Block `layer` of the linearised model alone: its MLP frozen (skip path live)."""
    inputs, _ = clt.sites(spec)
    l = layer - spec.first_layer
    skip = spec.skip and 0 <= l < spec.n_layers
    edit = (f"blocks.{layer}.mlp_out", partial(_frozen_mlp, skip), *((inputs[l],) if skip else ()))
    return Plan(edits=(edit,), linearise=True)


def _feature_edges(feats, g_rtd, table, feat_ts, row_ts, scale_ts, block: int):
    """feats [R, F_pad] plus the edges from the features that write at one layer: at each position
    t, the gradient there against each write's decoder vector times its scale, added to the writing
    feature's column. Positions go in blocks of `block` inside a loop, so each block's decoder
    vectors [block, S, D] exist only while it is read (not hoisted for every layer at once)."""
    t = g_rtd.shape[1]
    pad = -t % block
    g = jnp.pad(g_rtd, ((0, 0), (0, pad), (0, 0)))
    f_ix, rows, scale = (jnp.pad(a, ((0, pad), (0, 0)), constant_values=v)
                         for a, v in ((feat_ts, feats.shape[1] - 1), (row_ts, 0), (scale_ts, 0.0)))

    def body(b, acc):
        sl = lambda a, axis=0: jax.lax.dynamic_slice_in_dim(a, b * block, block, axis)  # noqa: E731
        vecs = jnp.take(table, sl(rows), axis=0) * sl(scale)[..., None]  # [P, S, D]
        return acc.at[:, sl(f_ix)].add(jnp.einsum("rpd,psd->rps", sl(g, 1), vecs))

    return jax.lax.fori_loop(0, (t + pad) // block, body, feats)


def _pull_back(norm, scale_t11, t_pos, vec_rd):
    """[R, D]: each row's readout vector (read at position `t_pos` after a frozen norm whose scale
    there is `scale_t11[pos]`) as a vector read before the norm."""

    def one(pos, vec):
        s = scale_t11[0, pos][None, None]
        fn = lambda x: norm(x[None, None], lambda _: s)[0, 0].astype(jnp.float32)  # noqa: E731
        return jax.vjp(fn, jnp.zeros_like(vec, dtype=scale_t11.dtype))[1](vec)[0]

    return jax.vmap(one)(t_pos, vec_rd).astype(jnp.float32)


@partial(jax.jit, static_argnames=("graphdef", "spec", "shapes"))
def _rows(graphdef, state, spec: clt.CLTSpec, params, consts, shapes: _Shapes, table, slots, t_layer, t_pos, t_vec):
    """Rows [R, F_pad + L T + T] for targets (covered layer index, Lc for the logits; position;
    readout vector [D]): one backward sweep of the linearised model, each block's two halves' VJPs
    applied to the R rows' gradients at once (`vmap`). Each row's readout enters the sweep where it
    reads, pulled back to the residual stream there, as a scatter-add into that row's gradient; the
    edges into every node that writes at a layer's mlp_out are read off the gradient there before
    the sweep moves below it."""
    model = nnx.merge(graphdef, state)
    n_pos, r = consts["tokens"].shape[0], t_layer.shape[0]
    positions = jnp.arange(n_pos, dtype=jnp.int32)[None]
    mask = causal_mask(jnp.ones((1, n_pos), jnp.int32))
    held = consts["held"]
    rows_r = jnp.arange(r)
    dt = consts["resid_pre"].dtype

    def inject(g, l, vec):
        return g.at[rows_r, t_pos].add(jnp.where((t_layer == l)[:, None], vec, 0.0).astype(g.dtype))

    final = _pull_back(model.final_norm, held["final_norm"], t_pos, t_vec)
    g = inject(jnp.zeros((r, n_pos, spec.d_model), dt), spec.n_layers, final)  # at the last block's resid_post
    if spec.input_point == "mlp_in":
        ins = {i: _pull_back(model.blocks[i].mlp_norm, held[f"blocks.{i}.mlp_norm"], t_pos, t_vec)
               for i in range(spec.first_layer, spec.first_layer + spec.n_layers)}
    feats = jnp.zeros((r, shapes.features), jnp.float32)
    errs = []
    s_feat, s_row, s_scale = slots
    for i in reversed(range(shapes.n_layers)):
        g32 = g.astype(jnp.float32)  # [R, T, D]: the gradient at block i's mlp_out (= its resid_post)
        errs.append(jnp.einsum("rtd,td->rt", g32, consts["errors"][i]))
        feats = _feature_edges(feats, g32, table, s_feat[i], s_row[i], s_scale[i], shapes.positions)
        l = i - spec.first_layer
        covered = 0 <= l < spec.n_layers
        plan = block_plan(spec, i)
        ep = {HELD: held, f"blocks.{i}.mlp_out": {"const": consts["mlp_const"][i][None]}}
        if spec.skip and covered:
            ep[f"blocks.{i}.mlp_out"] |= {"W_skip": params["W_skip"][l], "norm_in": params["norm_in"][l],
                                          "norm_out": params["norm_out"][l]}

        def mlp_fn(x_td, i=i, plan=plan, ep=ep):
            return model.mlp_half(i, x_td[None], Recorder(plan, ep, positions))[0]

        def attn_fn(x_td, i=i):
            rec = Recorder(Plan(linearise=True), {HELD: held}, positions)
            return model.attention_half(i, x_td[None], positions, mask, positions, rec)[0]

        x_pre = consts["resid_pre"][i]
        x_mid, vjp_attn = jax.vjp(attn_fn, x_pre)
        _, vjp_mlp = jax.vjp(mlp_fn, x_mid)
        g = jax.vmap(lambda c: vjp_mlp(c)[0])(g)  # at resid_mid
        if covered:
            g = inject(g, l, ins[i] if spec.input_point == "mlp_in" else t_vec)
        g = jax.vmap(lambda c: vjp_attn(c)[0])(g)  # at resid_pre = the previous block's resid_post
    tok = jnp.einsum("rtd,td->rt", g.astype(jnp.float32), consts["token_vectors"])
    err = jnp.stack(errs[::-1], axis=1).reshape(r, -1)
    return jnp.concatenate([feats, err, tok], axis=1)


def _row_bytes(n_pos: int, d_model: int, n_cols: int, slots: int) -> int:
    """Working bytes of one row in a chunk: a few [T, D] gradients and cotangents, the [T, S] dots of
    one layer and the row itself, float32."""
    return 4 * (8 * n_pos * d_model + n_pos * slots + n_cols)


def chunk_rows(cfg: AttributionConfig, n_pos: int, d_model: int, n_cols: int, slots: int, rows: int) -> int:
    """Rows per chunk: as many as `memory_gib` holds, at most `batch_size` and not much more than the
    `rows` the graph needs, a power of two."""
    need = _row_bytes(n_pos, d_model, n_cols, slots)
    fit = int(cfg.memory_gib * 2**30) // need
    if fit < 1:
        raise UsageError(f"one row of a {n_pos}-token prompt needs {need / 2**30:.2f} GiB, over "
                         f"memory_gib={cfg.memory_gib}; raise it or shorten the prompt")
    return 2 ** int(math.log2(min(fit, cfg.batch_size, 2 ** math.ceil(math.log2(max(rows, 1))))))


class RowComputer:
    """Rows of one prompt's linearised replacement model, in chunks of a fixed size (compiled once)."""

    def __init__(self, model, spec: clt.CLTSpec, params: clt.Params, prompt: Prompt, cfg: AttributionConfig):
        self.spec, self.params, self.prompt = spec, params, prompt
        self.graphdef, self.state = nnx.split(model)
        self.n_layers, t, d = model.cfg.n_layers, len(prompt.tokens), spec.d_model
        self.n_feat = len(prompt.feat_act)
        self.n_cols = self.n_feat + (self.n_layers + 1) * t
        table, offsets = _decoder_table(spec, params)
        slots = _slots(spec, prompt, self.n_layers, offsets, np.asarray(params["norm_out"]))
        n_logits = min(cfg.max_logits, model.cfg.vocab_size)
        rows = self.n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, self.n_feat)
        self.chunk = chunk_rows(cfg, t, d, self.n_cols, slots[0].shape[-1], max(rows, n_logits))
        self.slots = tuple(jnp.asarray(a) for a in slots)
        n_s = slots[0].shape[-1]
        block = 2 ** int(math.log2(max(1, min(t, (2**26) // (4 * n_s * d)))))  # [P, S, D] within 64 MiB
        self.shapes = _Shapes(self.n_layers, self.chunk, n_s, _bucket(self.n_feat + 1), block)
        self.table = table
        self.consts = {"tokens": jnp.asarray(prompt.tokens), "held": prompt.held, "mlp_const": prompt.mlp_const,
                       "resid_pre": prompt.resid_pre, "resid_last": prompt.resid_last, "errors": prompt.errors,
                       "token_vectors": prompt.token_vectors}
        self.enc = params["W_enc"] * params["norm_in"][:, None, None]  # [Lc, D, F] readouts at the input sites
        self.n_rows = 0

    def __call__(self, layers: np.ndarray, positions: np.ndarray, vectors) -> np.ndarray:
        """Rows [n, n_cols] for targets at covered layers `layers` (Lc: the final norm) and positions,
        reading `vectors` [n, D]."""
        n, r = len(layers), self.chunk
        out = np.empty((n, self.n_cols), np.float32)
        vectors = jnp.asarray(vectors, jnp.float32)
        for s in range(0, n, r):
            e = min(s + r, n)
            pad = r - (e - s)
            lay = jnp.asarray(np.concatenate([layers[s:e], np.full(pad, -1, np.int32)]), jnp.int32)
            pos = jnp.asarray(np.concatenate([positions[s:e], np.zeros(pad, np.int32)]), jnp.int32)
            vec = jnp.concatenate([vectors[s:e], jnp.zeros((pad, self.spec.d_model), jnp.float32)])
            rows = np.asarray(_rows(self.graphdef, self.state, self.spec, self.params, self.consts, self.shapes,
                                    self.table, self.slots, lay, pos, vec))
            out[s:e, : self.n_feat] = rows[: e - s, : self.n_feat]
            out[s:e, self.n_feat:] = rows[: e - s, self.shapes.features:]
        self.n_rows += n
        return out

    def feature_rows(self, idx: np.ndarray) -> np.ndarray:
        p = self.prompt
        layer = p.feat_layer[idx] - self.spec.first_layer
        vec = self.enc[jnp.asarray(layer), :, jnp.asarray(p.feat_id[idx])]  # [n, D]
        return self(layer.astype(np.int32), p.feat_pos[idx], vec)


def partial_influence(rows: np.ndarray, row_nodes: np.ndarray, logit_p: np.ndarray, *, max_iter: int = 128) -> np.ndarray:
    """Influence on the logits of every column node through the rows so far (circuit-tracer's
    `compute_partial_influences`): w Â + w Â² + ... with Â the row-normalised |rows| and w the logit
    probabilities at the last K columns."""
    a = np.abs(rows)
    a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-8)
    prod = np.zeros(rows.shape[1], np.float32)
    prod[-len(logit_p):] = logit_p
    total = np.zeros_like(prod)
    for _ in range(max_iter):
        prod = prod[row_nodes] @ a
        if not prod.any():
            return total
        total += prod
    raise RuntimeError(f"influence did not converge in {max_iter} steps; the rows do not form a DAG")


def attribute(model, tokens, spec: clt.CLTSpec, params: clt.Params, cfg: AttributionConfig = AttributionConfig(),
              *, progress=None) -> Graph:
    """The attribution graph of prompt `tokens` (BOS first, see `with_bos`) on the model with the
    transcoders (spec, params) standing in for its MLPs."""
    t0 = time.perf_counter()
    prompt = prepare(model, tokens, spec, params)
    n_layers, n_pos = model.cfg.n_layers, len(prompt.tokens)
    ids, probs = logit_targets(prompt.logits, cfg.max_logits, cfg.logit_probability)
    w_u = unembedding(model).astype(jnp.float32)
    logit_vecs = (w_u[:, jnp.asarray(ids)] - jnp.mean(w_u, axis=1, keepdims=True)).T  # [K, D]
    rc = RowComputer(model, spec, params, prompt, cfg)
    n_feat, k = rc.n_feat, len(ids)
    n_cols = rc.n_cols + k
    m = n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_feat)
    rows = np.zeros((m + k, n_cols), np.float32)
    row_nodes = np.zeros(m + k, np.int64)
    t1 = time.perf_counter()
    rows[:k, : rc.n_cols] = rc(np.full(k, spec.n_layers, np.int32), np.full(k, n_pos - 1, np.int32), logit_vecs)
    row_nodes[:k] = rc.n_cols + np.arange(k)
    t2 = time.perf_counter()
    visited = np.zeros(n_feat, bool)
    st = k
    while st - k < m:
        if m == n_feat:
            pending = np.arange(n_feat)
        else:
            inf = partial_influence(rows[:st], row_nodes[:st], probs)[:n_feat]
            rank = np.argsort(-inf, kind="stable")
            pending = rank[~visited[rank]][: min(cfg.update_interval * cfg.batch_size, m - (st - k))]
        for s in range(0, len(pending), cfg.batch_size):
            idx = pending[s:s + cfg.batch_size]
            rows[st:st + len(idx), : rc.n_cols] = rc.feature_rows(idx)
            row_nodes[st:st + len(idx)] = idx
            visited[idx] = True
            st += len(idx)
            if progress is not None:
                progress(st - k, m)
    t3 = time.perf_counter()
    selected = np.nonzero(visited)[0]
    order = np.argsort(row_nodes[k:], kind="stable") + k
    cols = np.concatenate([selected, np.arange(n_feat, n_cols)])
    final = np.concatenate([rows[order][:, cols], rows[:k][:, cols]])
    return Graph(input_ids=prompt.tokens, active_features=np.stack([prompt.feat_layer, prompt.feat_pos, prompt.feat_id], 1),
                 activation_values=prompt.feat_act, selected_features=selected, logit_token_ids=ids,
                 logit_probabilities=probs.astype(np.float32), rows=final, n_layers=n_layers,
                 timings={"forward_s": t1 - t0, "logit_rows_s": t2 - t1, "feature_rows_s": t3 - t2,
                          "rows": int(rc.n_rows), "chunk_rows": rc.chunk})


# --- checks --------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("graphdef", "spec"))
def _frozen_reads(graphdef, state, tokens, spec: clt.CLTSpec, params, held, mlp_const, deltas):
    """The frozen model's covered input sites and final norm output for a batch of deltas."""
    f = _linearised(graphdef, state, tokens, spec, params, held, mlp_const)
    return jax.vmap(f)(deltas)


class EdgeCheck(NamedTuple):
    target: np.ndarray
    """[n] node index (a row's node)."""
    source: np.ndarray
    edge: np.ndarray
    """[n] the graph's weight."""
    effect: np.ndarray
    """[n] the target's change when the source's vector is added in the frozen model."""

    @property
    def relative_error(self) -> np.ndarray:
        return np.abs(self.edge - self.effect) / np.maximum(np.abs(self.effect), 1e-30)

    def summary(self, floor: float = 1e-3) -> dict:
        """The largest relative error among edges of at least `floor` times the largest checked (float32
        rounding alone makes tinier ones' relative errors large), and every edge's error against the
        largest."""
        top = np.abs(self.effect).max(initial=0.0)
        big = np.abs(self.effect) >= floor * top
        return {"edges": int(len(self.edge)), "max_relative_error": float(self.relative_error[big].max(initial=0.0)),
                "edges_above_floor": int(big.sum()),
                "max_error_vs_largest": float(np.abs(self.edge - self.effect).max(initial=0.0) / max(top, 1e-30))}


def _source_delta(model, spec: clt.CLTSpec, params, graph: Graph, prompt: Prompt, node: int, scale: float) -> dict:
    t, d, n_layers = graph.n_pos, spec.d_model, graph.n_layers
    emb, mlp = np.zeros((t, d), np.float32), np.zeros((n_layers, t, d), np.float32)
    m = graph.n_features
    if node < m:
        layer, pos, fid = graph.active_features[graph.selected_features[node]]
        a = graph.activation_values[graph.selected_features[node]]
        l = layer - spec.first_layer
        for k in range(spec.targets(l)):
            j = l + k
            mlp[j + spec.first_layer, pos] = scale * a * np.asarray(params[f"W_dec_{l}"][fid, k]) / float(params["norm_out"][j])
    elif node < m + n_layers * t:
        j, pos = divmod(node - m, t)
        mlp[j, pos] = scale * np.asarray(prompt.errors[j, pos])
    else:
        pos = node - m - n_layers * t
        emb[pos] = scale * np.asarray(prompt.token_vectors[pos])
    return {"embed": emb, "mlp": mlp}


def _target_read(model, spec: clt.CLTSpec, params, graph: Graph, node: int, reads) -> float:
    ins, final = reads
    if node < graph.n_features:
        layer, pos, fid = graph.active_features[graph.selected_features[node]]
        l = layer - spec.first_layer
        vec = np.asarray(params["W_enc"][l, :, fid]) * float(params["norm_in"][l])
        return float(np.dot(np.asarray(ins[l, pos], np.float64), vec))
    k = node - (graph.n_nodes - graph.n_logits)
    w_u = np.asarray(unembedding(model), np.float64)
    vec = w_u[:, graph.logit_token_ids[k]] - w_u.mean(axis=1)
    return float(np.dot(np.asarray(final[-1], np.float64), vec))


def check_edges(model, spec: clt.CLTSpec, params: clt.Params, graph: Graph, n: int, *, seed: int = 0) -> EdgeCheck:
    """For `n` random non-zero edges of the graph: add the source's vector (scaled by a power of two so
    the change stands well above float32 rounding of the read, then divided back) in the frozen model
    and read the target's change. Exact attribution gives `effect == edge` to float32 precision."""
    prompt = prepare(model, graph.input_ids, spec, params)
    rng = np.random.default_rng(seed)
    r, c = np.nonzero(graph.rows)
    pick = rng.choice(len(r), size=min(n, len(r)), replace=False)
    targets, sources = graph.row_nodes[r[pick]], c[pick]
    edges = graph.rows[r[pick], c[pick]]
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(graph.input_ids)
    zero = {"embed": np.zeros((1, graph.n_pos, spec.d_model), np.float32),
            "mlp": np.zeros((1, graph.n_layers, graph.n_pos, spec.d_model), np.float32)}
    base_ins, base_fin = _frozen_reads(graphdef, state, tokens, spec, params, prompt.held, prompt.mlp_const, zero)
    base = [_target_read(model, spec, params, graph, int(t), (base_ins[0], base_fin[0])) for t in targets]
    scales = [2.0 ** np.clip(np.ceil(np.log2(max(abs(b), 1e-3) / max(abs(e), 1e-30))), 0, 30) for b, e in zip(base, edges)]
    deltas = [_source_delta(model, spec, params, graph, prompt, int(s), sc) for s, sc in zip(sources, scales)]
    stacked = {k: np.stack([d[k] for d in deltas]) for k in ("embed", "mlp")}
    ins, fin = _frozen_reads(graphdef, state, tokens, spec, params, prompt.held, prompt.mlp_const, stacked)
    effect = np.asarray([(_target_read(model, spec, params, graph, int(t), (ins[i], fin[i])) - base[i]) / scales[i]
                         for i, t in enumerate(targets)])
    return EdgeCheck(targets, sources, edges, effect)


def frozen_reads(model, spec: clt.CLTSpec, params: clt.Params, prompt: Prompt, deltas: dict, *, held=None):
    """(covered input sites [n, Lc, T, D], final [n, T, D]) of the frozen model for a batch of
    deltas {"embed": [n, T, D], "mlp": [n, L, T, D]} added where nodes write. `held` (default the
    prompt's) are the frozen norm scales, queries and keys; `{}` recomputes them from the perturbed
    input (the MLP outputs stay held)."""
    graphdef, state = nnx.split(model)
    return _frozen_reads(graphdef, state, jnp.asarray(prompt.tokens), spec, params,
                         prompt.held if held is None else held, prompt.mlp_const,
                         {k: jnp.asarray(v, jnp.float32) for k, v in deltas.items()})


def _feature_writes(spec: clt.CLTSpec, params, n_layers: int, n_pos: int, feats: np.ndarray, acts: np.ndarray,
                    values: np.ndarray | None = None) -> np.ndarray:
    """[L, T, D] the change at every mlp_out when features (model layer, position, id) with
    activations `acts` take `values` (None: 0, an ablation)."""
    out = np.zeros((n_layers, n_pos, spec.d_model), np.float32)
    new = np.zeros_like(acts) if values is None else values
    for (layer, pos, fid), a, v in zip(feats, acts, new):
        l = int(layer) - spec.first_layer
        for k in range(spec.targets(l)):
            j = l + k
            out[j + spec.first_layer, pos] += (v - a) * np.asarray(params[f"W_dec_{l}"][fid, k]) / float(params["norm_out"][j])
    return out


def _with_mlp_deltas(model, tokens, deltas_ltd: np.ndarray) -> np.ndarray:
    """Logits [V] at the last position of the real model with `deltas` added at every mlp_out."""
    from jaxinterp.models import forward

    sites = tuple(f"blocks.{j}.mlp_out" for j in range(model.cfg.n_layers))
    plan = Plan(edits=tuple((s, _add_delta) for s in sites))
    ep = {s: {"delta": jnp.asarray(deltas_ltd[j][None])} for j, s in enumerate(sites)}
    return np.asarray(forward(model, jnp.asarray(tokens)[None], plan=plan, edit_params=ep).logits[0, -1])


def ablation_check(model, spec: clt.CLTSpec, params: clt.Params, graph: Graph, *, n_features: int = 10,
                   draws: int = 5, seed: int = 0) -> dict:
    """In the real model (nothing frozen): ablate the `n_features` features with the largest positive
    edges into the top logit (each one's decoder writes removed from the MLP outputs it writes to) and
    report the drop of the top logit (less the mean logit, what its node reads) and its probability
    after, against ablating as many random active features (`draws` times, mean)."""
    direct = graph.rows[graph.n_features, : graph.n_features]  # the top logit's row
    n = min(n_features, graph.n_features)
    top = np.argsort(-direct, kind="stable")[:n]
    chosen = graph.selected_features[top]
    target = int(graph.logit_token_ids[0])
    base = _with_mlp_deltas(model, graph.input_ids, np.zeros((graph.n_layers, graph.n_pos, spec.d_model), np.float32))

    def demeaned(logits):  # what a logit node reads: the logit less the mean over the vocabulary
        return float(logits[target] - logits.mean())

    def drop(idx):
        d = _feature_writes(spec, params, graph.n_layers, graph.n_pos, graph.active_features[idx], graph.activation_values[idx])
        logits = _with_mlp_deltas(model, graph.input_ids, d)
        p = np.exp(logits - logits.max())
        return demeaned(base) - demeaned(logits), float(p[target] / p.sum())

    rng = np.random.default_rng(seed)
    top_drop, top_prob = drop(chosen)
    rand = [drop(rng.choice(len(graph.active_features), size=n, replace=False)) for _ in range(draws)]
    pb = np.exp(base - base.max())
    return {"token_id": target, "logit": demeaned(base), "probability": float(pb[target] / pb.sum()),
            "n_features": n, "features": [tuple(int(v) for v in graph.active_features[i]) for i in chosen],
            "top_drop": top_drop, "top_probability_after": top_prob,
            "random_probability_after": float(np.mean([q for _, q in rand])),
            "random_drops": [d for d, _ in rand], "random_drop_mean": float(np.mean([d for d, _ in rand]))}
