"""Jitted generation: a batched prefill, then a `lax.while_loop` decode over a preallocated KV cache,
with steering and feature reads at intercept sites.

Axes: `B` batch, `P` prompt slots (bucketed, left-padded), `N` new tokens, `S` = P + N cache slots,
`V` vocab, `R` features read per token.

One compiled program per (model structure, B, P bucket, N, sampling kind, steering structure,
reads); every value inside (prompts, steering ids, strengths, modes, vectors, windows, dictionary
weights, temperature, top-k, top-p, seed, stop ids) is data. The cache is allocated inside the
program and updated in place in the loop's carry. The loop ends when every row has produced a stop
token or N tokens.

Features read at a site for new token i are those at the position whose output it was sampled
from (the last prompt token for i = 0), after any steering at that site.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinterp.errors import UsageError
from jaxinterp.dictionaries import sae as dl
from jaxinterp.models.decoder import Decoder, positions_of
from jaxinterp.models.intercept import Plan, Recorder, parse_site
from jaxinterp.models.kvcache import CacheWriter, empty_cache
from jaxinterp.monitor import drift
from jaxinterp.monitor.stats import Stats
from jaxinterp.steering.spec import DictionaryRegistry, SteeringError, compile_steering


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; else temperature sampling restricted by top_k (0: off) and
    top_p (1: off), from `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UsageError(f"sampling {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@dataclasses.dataclass(frozen=True)
class AbortRule:
    """Stop a row once `feature` of the dictionary at `site` exceeds `threshold` at the position a
    new token is drawn from; that token and later ones are the pad id."""

    site: str
    feature: int
    threshold: float


@dataclasses.dataclass(frozen=True, eq=False)
class Monitor:
    """Drift monitoring inside generation: per site (each needs a dictionary in the registry), a
    `DriftState` carried through the decode loop on the device and returned. Every real token the
    model reads (prompt and generated, BOS excluded) is counted; a window is checked against the
    site's baseline every `window` tokens."""

    sites: tuple[str, ...] = ()
    window: int = 1024
    baselines: dict[str, Stats] | None = None
    abort_when: tuple[AbortRule, ...] = ()
    shift_threshold: float = 3.0


class GenerateResult(NamedTuple):
    tokens: np.ndarray
    """[B, N] new tokens; after a row's stop token, its pad id."""
    lengths: np.ndarray
    """[B] new tokens per row, its stop token included."""
    text: list[str] | None
    """Decoded new tokens per row (stop token excluded), when a tokenizer is known."""
    features: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per read site: (ids [B, N, R], activations [B, N, R]) of the strongest features."""
    logits: np.ndarray | None
    """[B, N, V] float32 logits each new token was drawn from (`return_logits=True`)."""
    prompt_tokens: np.ndarray
    """[B, P] the left-padded prompts."""
    monitor: dict[str, drift.DriftState]
    """Per monitored site, the drift state after generation (`drift_report` reads it)."""
    aborted: np.ndarray
    """[B] bool: the row was stopped by an `AbortRule`."""


def bucket(n: int, minimum: int = 16) -> int:
    """Prompt slots for an n-token prompt: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _sample(logits_bv, key, samp, greedy: bool):
    """Next tokens [B]: argmax, or a draw from the temperature-scaled logits restricted to the
    top_k largest and then to the smallest set whose probability reaches top_p."""
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    temperature, top_k, top_p = samp
    x = logits_bv / jnp.maximum(temperature, 1e-6)
    v = x.shape[-1]
    srt = jnp.sort(x, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    in_k = jnp.arange(v)[None, :] < k
    probs = jax.nn.softmax(jnp.where(in_k, srt, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the entries ranked above
    kept = in_k & (before < top_p)
    cutoff = jnp.min(jnp.where(kept, srt, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(x < cutoff, -jnp.inf, x), axis=-1).astype(jnp.int32)


def _encode_sites(enc, params, captured) -> dict[str, jax.Array]:
    """Dense feature activations [B, T, F] at each site that reads, monitors or aborts."""
    out = {}
    for site, spec in enc:
        x = captured[site]
        out[site] = dl.encode(spec, params[site], x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)
    return out


STATIC = ("graphdef", "plan", "n_new", "greedy", "enc", "reads", "monitors", "aborts", "return_logits")
"""The structure a compiled generate depends on; every other argument is data."""


def generate_program(graphdef, state, tokens_bp, mask_bp, edit_params, dict_params, mon_states, abort_ids, abort_thr, key,
              samp, stop_ids, pad_id, *, plan: Plan, n_new: int, greedy: bool, enc: tuple, reads: tuple,
              monitors: tuple, aborts: tuple, return_logits: bool):
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    b, p = tokens_bp.shape
    cache = empty_cache(cfg, b, p + n_new, model.embed[...].dtype)

    def step(cache, mon_states, tokens_bt, pos_bt, valid_bt):
        writer = CacheWriter(cache, pos_bt, valid_bt)
        rec = Recorder(plan, edit_params, pos_bt)
        logits = model(tokens_bt, pos_bt, writer.mask_bts, rec, writer)[:, -1]
        feats = _encode_sites(enc, dict_params, rec.captured)
        counted = (valid_bt & (pos_bt > 0)).reshape(-1)
        mon_states = {site: drift.observe(mon_states[site], feats[site].reshape(-1, feats[site].shape[-1]), counted,
                                          window=window, shift_threshold=thr)
                      for site, window, thr in monitors}
        read = {site: jax.lax.top_k(feats[site][:, -1], r) for site, r in reads}
        hit = jnp.zeros((b,), jnp.bool_)
        for j, site in enumerate(aborts):
            hit = hit | (feats[site][:, -1, abort_ids[j]] > abort_thr[j])
        return writer.result(), mon_states, logits, read, hit

    pos = positions_of(mask_bp)
    cache, mon_states, logits, read, hit = step(cache, mon_states, tokens_bp, pos, mask_bp.astype(jnp.bool_))
    last_pos = pos[:, -1]
    key, sub = jax.random.split(key)
    tok = jnp.where(hit, pad_id, _sample(logits, sub, samp, greedy))
    out = jnp.full((b, n_new), pad_id, jnp.int32).at[:, 0].set(tok)
    aborted = hit
    done = jnp.isin(tok, stop_ids) | hit
    feat_buf = {s: (jnp.zeros((b, n_new, r), jnp.int32).at[:, 0].set(read[s][1].astype(jnp.int32)),
                    jnp.zeros((b, n_new, r), jnp.float32).at[:, 0].set(read[s][0])) for s, r in reads}
    logit_buf = jnp.zeros((b, n_new if return_logits else 1, logits.shape[-1]), jnp.float32)
    logit_buf = logit_buf.at[:, 0].set(logits) if return_logits else logit_buf

    def cond(carry):
        i, _, done, *_ = carry
        return (i < n_new) & ~jnp.all(done)

    def body(carry):
        i, out, done, aborted, cache, mon_states, key, feat_buf, logit_buf = carry
        prev = out[:, i - 1][:, None]
        cache, mon_states, logits, read, hit = step(cache, mon_states, prev, (last_pos + i)[:, None], ~done[:, None])
        hit = hit & ~done
        key, sub = jax.random.split(key)
        tok = jnp.where(done | hit, pad_id, _sample(logits, sub, samp, greedy))
        out = out.at[:, i].set(tok)
        aborted = aborted | hit
        done = done | jnp.isin(tok, stop_ids) | hit
        feat_buf = {s: (ids.at[:, i].set(read[s][1].astype(jnp.int32)), vals.at[:, i].set(read[s][0]))
                    for s, (ids, vals) in feat_buf.items()}
        if return_logits:
            logit_buf = logit_buf.at[:, i].set(logits)
        return i + 1, out, done, aborted, cache, mon_states, key, feat_buf, logit_buf

    carry = (jnp.asarray(1, jnp.int32), out, done, aborted, cache, mon_states, key, feat_buf, logit_buf)
    _, out, _, aborted, _, mon_states, _, feat_buf, logit_buf = jax.lax.while_loop(cond, body, carry)
    return out, feat_buf, (logit_buf if return_logits else None), mon_states, aborted


_generate = jax.jit(generate_program, static_argnames=STATIC)


def _encode_prompts(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = []
    for pr in prompts:
        if isinstance(pr, str):
            if tokenizer is None:
                raise UsageError("text prompts need a tokenizer; pass tokenizer= or token id lists")
            ids = (tokenizer.encode_prompt(pr) if hasattr(tokenizer, "encode_prompt")
                   else tokenizer.encode(pr, add_bos=getattr(tokenizer, "add_bos_token", False)))
        else:
            ids = [int(t) for t in pr]
        if not ids:
            raise UsageError("an empty prompt; every prompt needs at least one token")
        rows.append(ids)
    return rows


def generate(
    model: Decoder,
    prompts,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    steering=None,
    dictionaries: DictionaryRegistry | None = None,
    read: tuple[str, ...] = (),
    read_k: int = 8,
    stop: tuple[int, ...] | None = None,
    tokenizer=None,
    encode: str = "full",
    monitor: Monitor | None = None,
    return_logits: bool = False,
    intercepts: tuple[Plan, dict] | None = None,
) -> GenerateResult:
    """Generate up to `max_new_tokens` per prompt (text or token ids), steered by `steering` (a
    `SteeringVector`, a list for every row, or one list per row) through `dictionaries`, reading the
    top `read_k` features at each `read` site and monitoring drift at `monitor.sites`. `stop`: token
    ids that end a row (default: EOS). `intercepts`: (plan, edit params) of further edits and
    derived values applied in every forward of the loop, e.g. a replacement model
    (`jaxinterp.circuits.replacement_intercepts`); its sites may not be steered as well."""
    cfg = model.cfg
    rows = _encode_prompts(prompts, tokenizer)
    b = len(rows)
    longest = max(len(r) for r in rows)
    p = bucket(longest)
    if cfg.max_positions is not None and longest + max_new_tokens > cfg.max_positions:
        raise UsageError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{cfg.max_positions} positions; shorten one")
    pad_id = cfg.pad_id if cfg.pad_id is not None else (cfg.eos_id if cfg.eos_id is not None else 0)
    if not 0 <= pad_id < cfg.vocab_size:  # an out-of-vocabulary id would embed as NaN and poison attention
        pad_id = 0
    tokens = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):], mask[i, p - len(r):] = r, 1
    lens = [len(r) for r in rows]
    edits, edit_params = compile_steering(steering, dictionaries, cfg, lens, encode=encode)
    monitor = monitor or Monitor()
    registry = dictionaries or DictionaryRegistry()
    need = list(dict.fromkeys([*read, *monitor.sites, *(r.site for r in monitor.abort_when)]))
    for site in need:
        parse_site(site, cfg.n_layers)
        registry.get(site)
    if need:
        registry.check(cfg)
    enc = tuple((site, registry.get(site).spec) for site in need)
    dict_params = {site: registry.get(site).params for site in need}
    reads = tuple((site, min(read_k, registry.get(site).spec.d_sae)) for site in read)
    monitors = tuple((site, int(monitor.window), float(monitor.shift_threshold)) for site in monitor.sites)
    baselines = monitor.baselines or {}
    mon_states = {site: drift.init(baselines.get(site), registry.get(site).spec.d_sae) for site in monitor.sites}
    for r in monitor.abort_when:
        if not 0 <= r.feature < registry.get(r.site).spec.d_sae:
            raise SteeringError(f"abort rule feature {r.feature} at {r.site!r} is out of range; the dictionary has "
                                f"d_sae={registry.get(r.site).spec.d_sae}")
    aborts = tuple(r.site for r in monitor.abort_when)
    abort_ids = np.asarray([r.feature for r in monitor.abort_when], np.int32)
    abort_thr = np.asarray([r.threshold for r in monitor.abort_when], np.float32)
    derive = ()
    if intercepts is not None:
        extra, extra_params = intercepts
        both = sorted({e[0] for e in edits} & {e[0] for e in extra.edits})
        if both:
            raise SteeringError(f"sites {both} are both steered and edited by `intercepts`; steer other sites "
                                "(a CLT's features: jaxinterp.steering.clt)")
        edits, derive = tuple(edits) + extra.edits, extra.derive
        edit_params = {**edit_params, **extra_params}
    plan = Plan(capture=tuple(need), edits=edits, derive=derive)
    stop_ids = np.asarray(stop if stop is not None else ([cfg.eos_id] if cfg.eos_id is not None else [-1]), np.int32)
    samp = (np.float32(sampling.temperature), np.int32(sampling.top_k), np.float32(sampling.top_p))
    graphdef, state = nnx.split(model)
    out, feats, logits, mon_states, aborted = _generate(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), edit_params, dict_params, mon_states,
        jnp.asarray(abort_ids), jnp.asarray(abort_thr), jax.random.key(sampling.seed), samp, jnp.asarray(stop_ids),
        jnp.int32(pad_id), plan=plan, n_new=max_new_tokens, greedy=sampling.temperature == 0, enc=enc,
        reads=reads, monitors=monitors, aborts=aborts, return_logits=return_logits)
    out = np.asarray(out)
    aborted = np.asarray(aborted)
    stopped = np.isin(out, stop_ids)
    lengths = np.where(stopped.any(1), stopped.argmax(1) + 1, max_new_tokens)
    first_pad = np.where((out == pad_id).any(1), (out == pad_id).argmax(1), max_new_tokens)
    lengths = np.where(aborted, np.minimum(lengths, first_pad), lengths)
    text = None
    if tokenizer is not None:
        stops = set(stop_ids.tolist())
        text = [tokenizer.decode([t for t in out[i, : lengths[i]] if t not in stops]) for i in range(b)]
    return GenerateResult(tokens=out, lengths=lengths, text=text,
                          features={s: (np.asarray(a), np.asarray(v)) for s, (a, v) in feats.items()},
                          logits=None if logits is None else np.asarray(logits), prompt_tokens=tokens,
                          monitor=mon_states, aborted=aborted)


__all__ = ["AbortRule", "GenerateResult", "Monitor", "Sampling", "bucket", "generate"]
