"""A continuous-batching engine: requests join and leave a fixed set of decode slots without
recompiling, each with its own sampling, stop tokens, steering and feature reads.

Axes: `N` decode slots, `S` cache slots per sequence (`max_len`), `P` a prompt bucket, `L` layers,
`G` key/value heads, `K` head_dim, `V` vocab, `R` features read per token.

Three jitted programs, in JetStream's split:

- `prefill`: one request's prompt (left-padded to its bucket) through the model into a KV block
  [1, P], its first token sampled; compiled once per bucket.
- `insert`: that block into a free slot of the decode state (cache slots [0, P) of the row, the
  rest of the row marked empty), with the request's sampling parameters, stop ids, steering rows
  and budget; compiled once per bucket.
- `step`: one decode step for every slot: each active row writes its token at its own cache slot
  (`length[n]`), attends over its own valid slots, is steered by its own rows of the steering
  arrays, and samples with its own key and settings; compiled once.

Everything a request changes is data in `DecodeState`: per-slot lengths and positions, sampling
(temperature 0 is greedy), stop ids, the steering slots of every steerable site (feature ids,
values, modes, windows; raw vectors), and the active flag. The steerable sites, the slots per site,
the read and monitored sites and the capacities are `EngineConfig`, fixed when the engine is made:
the state is allocated once. A row's tokens and reads match `jaxinterp.generate` run on that
request alone (same seed: the same per-row key splits; the same left-padded prompt positions).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinterp.dictionaries import sae as dl
from jaxinterp.errors import JaxinterpError
from jaxinterp.generation import Sampling, _sample, bucket
from jaxinterp.models.decoder import Decoder, positions_of
from jaxinterp.models.intercept import Plan, Recorder, parse_site
from jaxinterp.models.kvcache import CacheWriter, empty_cache
from jaxinterp.monitor import drift
from jaxinterp.steering.edits import NO_END, FeatureSlots, SiteSteering, VectorSlots, steer_fn
from jaxinterp.steering.spec import DictionaryRegistry, SteeringVector, compile_steering


class EngineError(JaxinterpError):
    """A request the engine cannot take (too long, too many steering entries, an unknown site)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What the compiled programs and the allocated state depend on."""

    slots: int = 8
    """Decode slots: requests generating at once."""
    max_len: int = 512
    """Cache slots per sequence: the prompt's bucket plus its new tokens must fit."""
    min_bucket: int = 16
    """The smallest prompt bucket (buckets are powers of two from here up to `max_len`)."""
    steer_sites: tuple[str, ...] = ()
    """Sites a request may steer: features through the dictionary attached there (a transcoder's
    written at its target), raw vectors at any of them."""
    feature_slots: int = 4
    """Feature edits per request and site."""
    vector_slots: int = 2
    """Raw-vector edits per request and site."""
    read_sites: tuple[str, ...] = ()
    """Sites whose top features are read at every token (each needs a dictionary)."""
    read_k: int = 8
    monitor_sites: tuple[str, ...] = ()
    """Sites whose drift statistics are folded across every request (each needs a dictionary)."""
    monitor_window: int = 1024
    shift_threshold: float = 3.0
    max_stop: int = 4
    """Stop ids per request."""
    abort_rules: int = 2
    """Abort rules per request (`Request.abort`), each on a read or monitored site."""
    top_logprobs: int = 5
    """Alternatives returned with each token's log-probability (the model's distribution, before
    temperature and truncation)."""

    def __post_init__(self):
        if self.slots < 1 or self.max_len < self.min_bucket + 1 or self.min_bucket < 1:
            raise EngineError(f"engine config {self}: need slots >= 1, min_bucket >= 1, max_len > min_bucket")
        if self.feature_slots < 0 or self.vector_slots < 0 or self.read_k < 1 or self.max_stop < 1:
            raise EngineError("feature_slots and vector_slots >= 0, read_k and max_stop >= 1")


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion: prompt token ids, a budget, sampling, stop ids (None: the model's EOS),
    steering (`SteeringVector`s, windows counted in the request's own positions) and whether its
    per-token feature reads are returned."""

    prompt: tuple[int, ...]
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    steering: tuple[SteeringVector, ...] = ()
    stop: tuple[int, ...] | None = None
    read: bool = False
    monitor: bool = False
    """Keep this request's own firing counts at the monitored sites (`Engine.request_monitor`)."""
    abort: tuple = ()
    """`generation.AbortRule`s: the request ends (finish reason "abort", its last token the pad id)
    once a feature exceeds its threshold where a token is drawn, as `generate`'s `Monitor.abort_when`."""


class SlotCache(NamedTuple):
    k: tuple[jax.Array, ...]
    """Per layer [N, S, G, K]."""
    v: tuple[jax.Array, ...]
    pos: jax.Array
    """[N, S] int32 position of each cache slot's token."""
    valid: jax.Array
    """[N, S] bool."""


class DecodeState(NamedTuple):
    cache: SlotCache
    length: jax.Array
    """[N] int32 cache slots written (the next token goes to slot `length`)."""
    next_pos: jax.Array
    """[N] int32 position of the next token."""
    last: jax.Array
    """[N] int32 the token to feed next."""
    active: jax.Array
    """[N] bool."""
    generated: jax.Array
    """[N] int32 tokens produced so far."""
    budget: jax.Array
    """[N] int32 max_new_tokens."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    """[N] per-slot PRNG keys."""
    stop: jax.Array
    """[N, max_stop] int32 stop ids (-1: none)."""
    steer: dict
    """site -> SiteSteering of [N, ...] slots (dictionary None: the weights are passed apart)."""
    monitor: dict
    """site -> DriftState, folded over every request."""
    abort: dict
    """site -> (feature ids [N, A] int32, thresholds [N, A] float32, on [N, A] bool)."""
    own: dict
    """site -> (firings [N, F] float32, tokens [N] float32): each request's own counts at the
    monitored sites (prompt and generated tokens, BOS excluded)."""


class Prefilled(NamedTuple):
    """A request after its prefill, ready to insert (device arrays)."""

    request: Request
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    pos: jax.Array
    valid: jax.Array
    first: jax.Array
    key: jax.Array
    logprobs: tuple
    """(log-probability of the first token [1], top alternatives (values [1, T], ids [1, T]))."""
    reads: dict
    steer: dict
    abort: dict
    aborted: jax.Array
    own: dict
    prompt_len: int
    bucket: int


class StepOutput(NamedTuple):
    tokens: np.ndarray
    """[N] the token each slot produced (meaningful where `emitted`)."""
    emitted: np.ndarray
    """[N] bool: the slot was active and produced a token this step."""
    finished: np.ndarray
    """[N] bool: the slot's request ended with this token (stop id, budget, abort rule or cache full)."""
    aborted: np.ndarray
    """[N] bool: an abort rule ended it (its token is the pad id)."""
    reads: dict
    """site -> (ids [N, R], values [N, R]) at the position each token was sampled from."""
    logprob: np.ndarray
    """[N] log-probability of each token under the model."""
    top_logprobs: tuple
    """(ids [N, T], log-probabilities [N, T]) of the most likely tokens."""


def _sample_rows(logits_nv, keys_n, temperature, top_k, top_p):
    """Per-row sampling with per-row keys and settings, each row as `generate` draws a batch of one;
    when every row is greedy the sampling path (a sort of the vocabulary per row) is skipped."""
    greedy = jnp.argmax(logits_nv, axis=-1).astype(jnp.int32)

    def sampled(_):
        def one(logits_v, key, t, k, p):
            return _sample(logits_v[None], key, (t, k, p), False)[0]

        drawn = jax.vmap(one)(logits_nv, keys_n, temperature, top_k, top_p)
        return jnp.where(temperature == 0, greedy, drawn)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


def _logprobs(logits_nv, tok_n, t: int):
    lp = jax.nn.log_softmax(logits_nv.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tok_n[:, None], axis=-1)[:, 0]
    return chosen, jax.lax.top_k(lp, t)


def _abort_hits(abort: dict, feats: dict) -> jax.Array:
    """[N] bool: a rule of the row fires at the last position."""
    hit = None
    for site, (ids, thr, on) in abort.items():
        f = jnp.take_along_axis(feats[site][:, -1], ids, axis=-1)
        h = jnp.any(on & (f > thr), axis=-1)
        hit = h if hit is None else hit | h
    return hit


def _features(enc, dict_params, captured):
    out = {}
    for site, spec in enc:
        x = captured[site]
        out[site] = dl.encode(spec, dict_params[site], x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)
    return out


def _edit_params(steer: dict, dict_params: dict, layout: tuple) -> dict:
    return {key: SiteSteering(steer[key].features, steer[key].vectors, dict_params.get(dsite))
            for key, dsite, _ in layout}


def _fill_row(given, empty, capacity: int, what: str):
    """The used slots (mode not OFF) of a compiled one-row `FeatureSlots` / `VectorSlots`, packed into
    the engine's `capacity` slots (`empty`, or None when the site has none)."""
    on = np.flatnonzero(np.asarray(given.modes[0]) != 0)
    if len(on) > capacity or empty is None:
        raise EngineError(f"{len(on)} {what}; the engine takes at most {capacity if empty is not None else 0} per site")
    out = type(empty)(*(np.asarray(a).copy() for a in empty))
    for j, i in enumerate(on):
        for dst, src in zip(out, given):
            dst[0, j] = np.asarray(src)[0, i]
    return out


class SlotWriter:
    """Writes one decode step's keys/values at each row's own cache slot (`length[n]`) of the first
    `rows` rows of the whole cache (in place: the cache is donated), and gives the attention those
    rows."""

    def __init__(self, cache: SlotCache, pos_n1, valid_n1, length_n):
        rows = length_n.shape[0]
        s = cache.pos.shape[1]
        at = jnp.minimum(length_n, s - 1)
        self.rows, self.idx, self.at = rows, jnp.arange(rows), at
        self._pos = cache.pos.at[self.idx, at].set(pos_n1[:, 0])
        self._valid = cache.valid.at[self.idx, at].set(valid_n1[:, 0])
        self.pos = self._pos[:rows]
        causal = jnp.arange(s)[None, :] <= at[:, None]
        self.mask_bts = (self._valid[:rows] & causal)[:, None, :]
        self.k, self.v = list(cache.k), list(cache.v)

    def write(self, layer, k_btgk, v_btgk):
        self.k[layer] = self.k[layer].at[self.idx, self.at].set(k_btgk[:, 0].astype(self.k[layer].dtype))
        self.v[layer] = self.v[layer].at[self.idx, self.at].set(v_btgk[:, 0].astype(self.v[layer].dtype))
        return self.k[layer][: self.rows], self.v[layer][: self.rows]

    def result(self) -> SlotCache:
        return SlotCache(tuple(self.k), tuple(self.v), self._pos, self._valid)


STATIC = ("graphdef", "plan", "enc", "reads", "monitors", "layout", "n_top")


@partial(jax.jit, static_argnames=STATIC)
def _prefill(graphdef, weights, dict_params, tokens_1p, mask_1p, steer_1, abort_1, mon, samp, key, pad_id, *, plan, enc,
             reads, monitors, layout, n_top):
    model = nnx.merge(graphdef, weights)
    p = tokens_1p.shape[1]
    pos = positions_of(mask_1p)
    valid = mask_1p.astype(jnp.bool_)
    writer = CacheWriter(empty_cache(model.cfg, 1, p, model.embed[...].dtype), pos, valid)
    rec = Recorder(plan, _edit_params(steer_1, dict_params, layout), pos)
    logits = model(tokens_1p, pos, writer.mask_bts, rec, writer)[:, -1]
    feats = _features(enc, dict_params, rec.captured)
    counted = (valid & (pos > 0)).reshape(-1)
    mon = {s: drift.observe(mon[s], feats[s].reshape(-1, feats[s].shape[-1]), counted, window=w, shift_threshold=t)
           for s, w, t in monitors}
    own = {s: (jnp.sum((feats[s][0] > 0) & counted[:, None], axis=0, dtype=jnp.float32)[None],
               jnp.sum(counted, dtype=jnp.float32)[None]) for s, _, _ in monitors}
    read = {s: jax.lax.top_k(feats[s][:, -1], r) for s, r in reads}
    key, sub = jax.random.split(key)
    first = _sample_rows(logits, sub[None], *(x[None] for x in samp))
    hit = _abort_hits(abort_1, feats) if abort_1 else jnp.zeros((1,), jnp.bool_)
    first = jnp.where(hit, pad_id, first)
    cache = writer.result()
    return cache.k, cache.v, cache.pos, cache.valid, first, key, _logprobs(logits, first, n_top), read, mon, hit, own


@partial(jax.jit, donate_argnums=(0,))
def _insert(state: DecodeState, slot, k, v, pos, valid, first, key, steer_1, abort_1, hit, own_1, prompt_len, budget,
            samp, stop):
    s = state.cache.pos.shape[1]
    p = pos.shape[1]
    put = lambda a, row: jax.lax.dynamic_update_slice(a, row.astype(a.dtype), (slot,) + (0,) * (a.ndim - 1))  # noqa: E731
    cache = SlotCache(
        k=tuple(put(a, b) for a, b in zip(state.cache.k, k)),
        v=tuple(put(a, b) for a, b in zip(state.cache.v, v)),
        pos=put(state.cache.pos, jnp.pad(pos, ((0, 0), (0, s - p)))),
        valid=put(state.cache.valid, jnp.pad(valid, ((0, 0), (0, s - p)))),
    )
    at = lambda a, x: a.at[slot].set(jnp.asarray(x).astype(a.dtype))  # noqa: E731
    steer = jax.tree.map(lambda a, row: put(a, row), state.steer, steer_1)
    abort = jax.tree.map(lambda a, row: put(a, row), state.abort, abort_1)
    own = jax.tree.map(lambda a, row: put(a, row), state.own, own_1)
    done_now = jnp.isin(first[0], stop) | (budget <= 1) | (p >= s) | hit[0]
    return state._replace(
        cache=cache, length=at(state.length, p), next_pos=at(state.next_pos, prompt_len), last=at(state.last, first[0]),
        active=at(state.active, ~done_now), generated=at(state.generated, 1), budget=at(state.budget, budget),
        temperature=at(state.temperature, samp[0]), top_k=at(state.top_k, samp[1]), top_p=at(state.top_p, samp[2]),
        keys=state.keys.at[slot].set(key), stop=at(state.stop, stop), steer=steer, abort=abort, own=own)


def _rows(state: DecodeState, rows: int) -> DecodeState:
    """The first `rows` slots of the per-slot fields (the cache and the shared monitors stay whole:
    the step writes the cache in place and reads its first rows)."""
    return jax.tree.map(lambda a: a[:rows], state._replace(cache=(), monitor={}))._replace(
        cache=state.cache, monitor=state.monitor)


def _put_rows(state: DecodeState, sub: DecodeState, rows: int) -> DecodeState:
    def put(a, b):
        return jax.lax.dynamic_update_slice(a, b, (0,) * a.ndim) if a.shape != b.shape else b

    merged = jax.tree.map(lambda a, b: a.at[:rows].set(b) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                          else put(a, b), state._replace(cache=(), monitor={}), sub._replace(cache=(), monitor={}))
    return merged._replace(cache=sub.cache, monitor=sub.monitor)


@partial(jax.jit, static_argnames=(*STATIC, "rows"), donate_argnums=(2,))
def _step(graphdef, weights, state: DecodeState, dict_params, pad_id, *, plan, enc, reads, monitors, layout, n_top,
          rows):
    """One decode step of the first `rows` slots (the others hold no request): compiled once per
    power-of-two `rows`, so a lightly loaded engine computes only the slots it uses."""
    full = state
    state = _rows(full, rows)
    model = nnx.merge(graphdef, weights)
    s = state.cache.pos.shape[1]
    pos = state.next_pos[:, None]
    valid = state.active[:, None]
    writer = SlotWriter(state.cache, pos, valid, state.length)
    rec = Recorder(plan, _edit_params(state.steer, dict_params, layout), pos)
    logits = model(state.last[:, None], pos, writer.mask_bts, rec, writer)[:, -1]
    feats = _features(enc, dict_params, rec.captured)
    counted = (state.active & (state.next_pos > 0)).reshape(-1)
    mon = {st: drift.observe(state.monitor[st], feats[st].reshape(-1, feats[st].shape[-1]), counted, window=w,
                             shift_threshold=t)
           for st, w, t in monitors}
    read = {st: jax.lax.top_k(feats[st][:, -1], r) for st, r in reads}
    own = {st: (c + ((feats[st][:, -1] > 0) & counted[:, None]).astype(jnp.float32), n + counted.astype(jnp.float32))
           for st, (c, n) in state.own.items()}
    split = jax.vmap(jax.random.split)(state.keys)
    keys, sub = split[:, 0], split[:, 1]
    tok = _sample_rows(logits, sub, state.temperature, state.top_k, state.top_p)
    emitted = state.active
    hit = emitted & _abort_hits(state.abort, feats) if state.abort else jnp.zeros_like(emitted)
    tok = jnp.where(hit, pad_id, tok)
    length = jnp.where(emitted, state.length + 1, state.length)
    generated = jnp.where(emitted, state.generated + 1, state.generated)
    stopped = jnp.any(tok[:, None] == state.stop, axis=1)
    finished = emitted & (stopped | hit | (generated >= state.budget) | (length >= s))
    new = state._replace(cache=writer.result(), length=length, next_pos=jnp.where(emitted, state.next_pos + 1, state.next_pos),
                         last=jnp.where(emitted, tok, state.last), active=state.active & ~finished, generated=generated,
                         keys=keys, monitor=mon, own=own)  # every row's key splits once a step, as generate's does
    return _put_rows(full, new, rows), tok, emitted, finished, hit, read, _logprobs(logits, tok, n_top)


class Engine:
    """The engine over one model: `prefill` / `insert` / `step` on a decode state allocated once.
    `run(requests)` is the simplest scheduler (fill free slots, step, repeat); the server's
    scheduler interleaves the same calls with arriving requests."""

    def __init__(self, model: Decoder, config: EngineConfig = EngineConfig(), *,
                 dictionaries: DictionaryRegistry | None = None, baselines: dict | None = None):
        self.model, self.config = model, config
        self.registry = dictionaries or DictionaryRegistry()
        cfg = model.cfg
        for site in (*config.steer_sites, *config.read_sites, *config.monitor_sites):
            parse_site(site, cfg.n_layers)
        for site in (*config.read_sites, *config.monitor_sites):
            self.registry.get(site)
        if self.registry.entries:
            self.registry.check(cfg)
        self.pad_id = cfg.pad_id if cfg.pad_id is not None and 0 <= cfg.pad_id < cfg.vocab_size else 0
        self.graphdef, self.weights = nnx.split(model)
        self.layout, edits = self._layout()
        need = tuple(dict.fromkeys([*config.read_sites, *config.monitor_sites]))
        self.abort_sites = need if config.abort_rules else ()
        self.plan = Plan(capture=need, edits=tuple(edits))
        self.enc = tuple((site, self.registry.get(site).spec) for site in need)
        self.reads = tuple((site, min(config.read_k, self.registry.get(site).spec.d_sae)) for site in config.read_sites)
        self.monitors = tuple((site, int(config.monitor_window), float(config.shift_threshold))
                              for site in config.monitor_sites)
        self.n_top = max(1, min(config.top_logprobs, cfg.vocab_size))
        used = {d for _, d, _ in self.layout if d is not None} | set(need)
        self.dict_params = {site: self.registry.get(site).params for site in used}
        baselines = baselines or {}
        self._mon0 = {s: drift.init(baselines.get(s), self.registry.get(s).spec.d_sae) for s in config.monitor_sites}
        self.state = self._empty_state()
        self.free = list(range(config.slots))
        self.requests: dict[int, Request] = {}

    # ------------------------------------------------------------------ structure

    def _layout(self):
        """((steering key, dictionary site or None, (feature slots, vector slots)), ...) and the
        plan's edits: one per site a request can steer (a transcoder's features at its target)."""
        c, layout, edits = self.config, [], []
        for site in dict.fromkeys(c.steer_sites):
            entry = self.registry.entries.get(site)
            fs = c.feature_slots if entry is not None and c.feature_slots else 0
            if entry is not None and entry.target_site is not None and fs:
                layout.append((entry.target_site, site, (fs, 0)))
                edits.append((entry.target_site, steer_fn(entry.spec, "full"), site))
                fs, entry = 0, None
            if fs or c.vector_slots:
                layout.append((site, site if fs else None, (fs, c.vector_slots)))
                edits.append((site, steer_fn(entry.spec if fs else None, "full")))
        keys = [k for k, _, _ in layout]
        if len(set(keys)) != len(keys):
            raise EngineError(f"steerable sites {keys} overlap (a transcoder writes a site that is steered directly)")
        return tuple(layout), edits

    def _empty_steer(self, n: int) -> dict:
        d = self.model.cfg.d_model
        out = {}
        for key, _, (fs, vs) in self.layout:
            z = lambda dt=np.int32, m=fs: np.zeros((n, m), dt)  # noqa: E731
            feats = FeatureSlots(z(), z(np.float32), z(), z(), z()) if fs else None
            vecs = (VectorSlots(np.zeros((n, vs, d), np.float32), z(np.float32, vs), z(np.int32, vs), z(np.int32, vs),
                                z(np.int32, vs)) if vs else None)
            out[key] = SiteSteering(feats, vecs, None)
        return out

    def _empty_abort(self, n: int) -> dict:
        a = self.config.abort_rules
        return {site: (np.zeros((n, a), np.int32), np.zeros((n, a), np.float32), np.zeros((n, a), np.bool_))
                for site in self.abort_sites}

    def _abort_row(self, request: Request) -> dict:
        row = self._empty_abort(1)
        used = {site: 0 for site in row}
        for rule in request.abort:
            if rule.site not in row:
                raise EngineError(f"abort rule at {rule.site!r}: features are computed at {sorted(row) or 'no site'} "
                                  "(EngineConfig read_sites / monitor_sites)")
            d_sae = self.registry.get(rule.site).spec.d_sae
            if not 0 <= int(rule.feature) < d_sae:
                raise EngineError(f"abort rule feature {rule.feature} at {rule.site!r} is out of range; the dictionary "
                                  f"has d_sae={d_sae}")
            j = used[rule.site]
            if j >= self.config.abort_rules:
                raise EngineError(f"more than {self.config.abort_rules} abort rules at {rule.site!r}")
            ids, thr, on = row[rule.site]
            ids[0, j], thr[0, j], on[0, j] = int(rule.feature), float(rule.threshold), True
            used[rule.site] = j + 1
        return row

    def _empty_state(self) -> DecodeState:
        c, cfg = self.config, self.model.cfg
        n, s = c.slots, c.max_len
        dtype = self.model.embed[...].dtype
        shape = (n, s, cfg.n_kv_heads, cfg.head_dim)
        cache = SlotCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                          tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                          jnp.zeros((n, s), jnp.int32), jnp.zeros((n, s), jnp.bool_))
        zi = jnp.zeros((n,), jnp.int32)
        state = DecodeState(cache=cache, length=zi, next_pos=zi, last=zi, active=jnp.zeros((n,), jnp.bool_),
                            generated=zi, budget=zi, temperature=jnp.zeros((n,), jnp.float32), top_k=zi,
                            top_p=jnp.ones((n,), jnp.float32), keys=jax.random.split(jax.random.key(0), n),
                            stop=jnp.full((n, c.max_stop), -1, jnp.int32), abort=self._empty_abort(n),
                            own={s: (jnp.zeros((n, self.registry.get(s).spec.d_sae), jnp.float32),
                                     jnp.zeros((n,), jnp.float32)) for s in c.monitor_sites},
                            steer=jax.tree.map(jnp.asarray, self._empty_steer(n)), monitor=dict(self._mon0))
        # one buffer per leaf: the state is donated to every step, and a buffer donated twice is an error
        return jax.tree.map(lambda a: a if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else jnp.array(a, copy=True),
                            state)

    def state_bytes(self) -> dict[str, int]:
        """Device bytes of the decode state: the KV cache, the steering slots, the monitoring state
        (shared and per request) and the rest; and of the dictionaries' weights."""
        size = lambda t: sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(t)  # noqa: E731
                             if hasattr(a, "dtype") and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key))
        st = self.state
        return {"kv_cache": size(st.cache), "steering": size(st.steer), "monitor": size(st.monitor) + size(st.own),
                "other": size(st._replace(cache=(), steer={}, monitor={}, own={})), "dictionaries": size(self.dict_params)}

    # ------------------------------------------------------------------ requests

    def check(self, request: Request) -> tuple[int, int]:
        """(prompt length, bucket) of a request the engine can take; `EngineError` otherwise."""
        n = len(request.prompt)
        if n == 0:
            raise EngineError("an empty prompt; every request needs at least one token")
        if request.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens={request.max_new_tokens}; ask for at least 1")
        p = bucket(n, self.config.min_bucket)
        if p + request.max_new_tokens > self.config.max_len:
            raise EngineError(f"prompt of {n} tokens (bucket {p}) + max_new_tokens {request.max_new_tokens} exceeds the "
                              f"engine's {self.config.max_len} cache slots per sequence; shorten one")
        stop = request.stop if request.stop is not None else self._default_stop()
        if len(stop) > self.config.max_stop:
            raise EngineError(f"{len(stop)} stop ids; the engine takes at most {self.config.max_stop}")
        if any(not 0 <= int(t) < self.model.cfg.vocab_size for t in request.prompt):
            raise EngineError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size})")
        return n, p

    def validate(self, request: Request) -> None:
        """Raise the `EngineError` (or `SteeringError`) a request would meet, without running it."""
        n, _ = self.check(request)
        self._steer_row(request, n)
        self._abort_row(request)

    def _default_stop(self) -> tuple[int, ...]:
        eos = self.model.cfg.eos_id
        return (eos,) if eos is not None else ()

    def _steer_row(self, request: Request, prompt_len: int) -> dict:
        """The request's steering as one row of every steerable site's slots."""
        row = self._empty_steer(1)
        if not request.steering:
            return row
        _, params = compile_steering(list(request.steering), self.registry, self.model.cfg, [prompt_len])
        known = {key: (fs, vs) for key, _, (fs, vs) in self.layout}
        for key, st in params.items():
            if key not in known:
                raise EngineError(f"site {key!r} is not steerable in this engine; steerable: {sorted(known) or 'none'} "
                                  "(EngineConfig.steer_sites)")
            fs, vs = known[key]
            new = row[key]
            if st.features is not None:
                new = new._replace(features=_fill_row(st.features, new.features, fs, f"feature edits at {key!r}"))
            if st.vectors is not None:
                new = new._replace(vectors=_fill_row(st.vectors, new.vectors, vs, f"vector edits at {key!r}"))
            row[key] = new
        return row

    def prefill(self, request: Request) -> Prefilled:
        n, p = self.check(request)
        tokens = np.full((1, p), self.pad_id, np.int32)
        mask = np.zeros((1, p), np.int32)
        tokens[0, p - n:], mask[0, p - n:] = request.prompt, 1
        steer = self._steer_row(request, n)
        abort = self._abort_row(request)
        samp = (np.float32(request.sampling.temperature), np.int32(request.sampling.top_k),
                np.float32(request.sampling.top_p))
        k, v, pos, valid, first, key, lps, read, mon, hit, own = _prefill(
            self.graphdef, self.weights, self.dict_params, jnp.asarray(tokens), jnp.asarray(mask), steer, abort,
            self.state.monitor, samp, jax.random.key(request.sampling.seed), jnp.int32(self.pad_id), plan=self.plan,
            enc=self.enc, reads=self.reads, monitors=self.monitors, layout=self.layout, n_top=self.n_top)
        self.state = self.state._replace(monitor=mon)
        return Prefilled(request, k, v, pos, valid, first, key, lps, read, steer, abort, hit, own, n, p)

    def insert(self, pre: Prefilled, slot: int | None = None) -> int:
        """Put a prefilled request into a free slot (the first free one by default); returns it."""
        if slot is None:
            if not self.free:
                raise EngineError("no free decode slot; wait for a request to finish")
            slot = self.free[0]
        if slot not in self.free:
            raise EngineError(f"slot {slot} is busy")
        self.free.remove(slot)
        r = pre.request
        stop = list(r.stop if r.stop is not None else self._default_stop())
        stop = np.asarray(stop + [-1] * (self.config.max_stop - len(stop)), np.int32)
        samp = (np.float32(r.sampling.temperature), np.int32(r.sampling.top_k), np.float32(r.sampling.top_p))
        self.state = _insert(self.state, jnp.int32(slot), pre.k, pre.v, pre.pos, pre.valid, pre.first, pre.key,
                             pre.steer, pre.abort, pre.aborted, pre.own, jnp.int32(pre.prompt_len), jnp.int32(r.max_new_tokens), samp, jnp.asarray(stop))
        self.requests[slot] = r
        return slot

    def step_rows(self) -> int:
        """Slots the next step computes: the power of two covering the highest slot in use
        (requests take the lowest free slot, so a light load stays in a short prefix)."""
        used = max(self.requests, default=0) + 1
        return min(self.config.slots, 1 << (used - 1).bit_length())

    def step(self) -> StepOutput:
        rows = self.step_rows()
        self.state, tok, emitted, finished, aborted, read, (lp, (top_v, top_i)) = _step(
            self.graphdef, self.weights, self.state, self.dict_params, jnp.int32(self.pad_id), plan=self.plan, enc=self.enc, reads=self.reads,
            monitors=self.monitors, layout=self.layout, n_top=self.n_top, rows=rows)
        pad = lambda a, fill=0: np.concatenate([np.asarray(a), np.full((self.config.slots - rows, *np.shape(a)[1:]), fill,  # noqa: E731
                                                                        np.asarray(a).dtype)]) if rows < self.config.slots else np.asarray(a)
        return StepOutput(pad(tok), pad(emitted, False), pad(finished, False), pad(aborted, False),
                          {s: (pad(i), pad(v)) for s, (v, i) in read.items()}, pad(lp),
                          (pad(top_i), pad(top_v)))

    def warm_up(self) -> None:
        """Compile every program the engine can run (each prompt bucket's prefill and insert, each
        step size), so that no request waits on a compile. The monitors are left as they were."""
        monitor = jax.tree.map(lambda a: jnp.array(a, copy=True), self.state.monitor)
        p = self.config.min_bucket
        while p < self.config.max_len:
            n = min(p, self.config.max_len - 1)
            pre = self.prefill(Request(tuple([1] * n), max_new_tokens=1, stop=()))
            self.release(self.insert(pre))
            p *= 2
        rows = 1
        while True:
            r = min(rows, self.config.slots)
            self.state, *_ = _step(self.graphdef, self.weights, self.state, self.dict_params, jnp.int32(self.pad_id),
                                   plan=self.plan, enc=self.enc,
                                   reads=self.reads, monitors=self.monitors, layout=self.layout, n_top=self.n_top, rows=r)
            if r == self.config.slots:
                break
            rows *= 2
        self.state = self.state._replace(monitor=monitor)

    def request_monitor(self, slot: int, *, top: int = 10) -> dict:
        """The request in `slot`'s own statistics at each monitored site: tokens counted, its most
        frequent features (id, firing rate), and the frequency KL of its firings against the site's
        baseline (None without one). Read before `release`."""
        out = {}
        for site, (counts, tokens) in self.state.own.items():
            c, n = np.asarray(counts[slot], np.float64), float(tokens[slot])
            order = np.argsort(-c, kind="stable")[:top]
            base = np.asarray(self.state.monitor[site].baseline.count, np.float64)
            kl = None
            if base.sum() > 0 and n > 0:
                p, q = c + 0.5, base + 0.5
                p, q = p / p.sum(), q / q.sum()
                kl = float(np.sum(p * (np.log(p) - np.log(q))))
            out[site] = {"tokens": int(n), "kl_divergence": kl,
                         "top_features": [[int(i), float(c[i] / max(n, 1.0))] for i in order if c[i] > 0]}
        return out

    def release(self, slot: int) -> None:
        """Free a slot (its request finished or was cancelled; a cancelled row is deactivated)."""
        self.state = self.state._replace(active=self.state.active.at[slot].set(False))
        self.requests.pop(slot, None)
        if slot not in self.free:
            self.free.append(slot)
            self.free.sort()

    def run(self, requests) -> list[dict]:
        """Serve `requests` to the end: every free slot filled, then one decode step, until all are
        done (the server's scheduler admits one prefill per step instead); returns per request
        {"tokens", "finish_reason", "features"} in request order."""
        queue = list(enumerate(requests))
        out: list[dict | None] = [None] * len(queue)
        by_slot: dict[int, tuple[int, dict]] = {}
        while queue or by_slot:
            if queue and self.free:
                i, r = queue.pop(0)
                pre = self.prefill(r)
                first = int(np.asarray(pre.first)[0])
                rec = {"tokens": [first], "finish_reason": None,
                       "features": {s: [(np.asarray(ids)[0].tolist(), np.asarray(v)[0].tolist())]
                                    for s, (v, ids) in pre.reads.items()} if r.read else {}}
                slot = self.insert(pre)
                stop = r.stop if r.stop is not None else self._default_stop()
                hit = bool(np.asarray(pre.aborted)[0])
                if first in stop or r.max_new_tokens <= 1 or hit:
                    rec["finish_reason"] = "abort" if hit else "stop" if first in stop else "length"
                    out[i] = rec
                    self.release(slot)
                else:
                    by_slot[slot] = (i, rec)
                if queue and self.free:
                    continue
            if not by_slot:
                continue
            res = self.step()
            for slot, (i, rec) in list(by_slot.items()):
                if not res.emitted[slot]:
                    continue
                t = int(res.tokens[slot])
                rec["tokens"].append(t)
                if self.requests[slot].read:
                    for s, (ids, vals) in res.reads.items():
                        rec["features"][s].append((ids[slot].tolist(), vals[slot].tolist()))
                if res.finished[slot]:
                    r = self.requests[slot]
                    stop = r.stop if r.stop is not None else self._default_stop()
                    rec["finish_reason"] = ("abort" if res.aborted[slot] else "stop" if t in stop else "length")
                    out[i] = rec
                    del by_slot[slot]
                    self.release(slot)
        return out


__all__ = ["Engine", "EngineConfig", "EngineError", "Request", "StepOutput", "NO_END"]
