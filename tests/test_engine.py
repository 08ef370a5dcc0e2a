"""The continuous-batching engine: requests that join and leave decode slots give the tokens and
feature reads `jaxinterp.generate` gives each of them alone, steered or not, greedy or sampled, and
nothing recompiles after warm-up."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY_DECODERS, tiny_model, unit_row_dictionary

from jaxinterp.generation import AbortRule, Monitor, Sampling, generate
from jaxinterp.serving import Engine, EngineConfig, EngineError, Request
from jaxinterp.serving import engine as engine_mod
from jaxinterp.steering import DictionaryRegistry, SteeringVector

pytestmark = pytest.mark.isolated

SITE = "blocks.1.resid_post"


def _dictionary(d_in=32, d_sae=64, seed=0):
    return unit_row_dictionary(d_in, d_sae, seed)


def _requests(rng, n, vec):
    out = []
    for i in range(n):
        length = int(rng.integers(2, 16) if rng.random() < 0.8 else rng.integers(17, 30))
        prompt = tuple(int(t) for t in rng.integers(2, 50, size=length))
        kind = i % 4
        steering = ()
        if kind == 1:
            steering = (SteeringVector(SITE, features={int(rng.integers(64)): float(rng.uniform(2, 8))}, mode="add"),)
        elif kind == 2:
            steering = (SteeringVector(SITE, vector=vec, scale=float(rng.uniform(1, 4))),)
        elif kind == 3:
            steering = (SteeringVector(SITE, features={3: 0.0}, mode="ablate", positions="generated"),
                        SteeringVector(SITE, features={5: 2.0}, mode="clamp"))
        sampling = Sampling() if i % 3 == 0 else Sampling(temperature=float(rng.uniform(0.5, 1.5)),
                                                          top_k=int(rng.integers(0, 20)), top_p=float(rng.uniform(0.5, 1)),
                                                          seed=int(rng.integers(1000)))
        abort = ()
        if i % 5 == 4:  # fires at once (threshold below any activation), or somewhere or never
            abort = (AbortRule(SITE, int(rng.integers(64)), -1.0 if i % 10 == 4 else float(rng.uniform(0.0, 0.3))),)
        out.append(Request(prompt, max_new_tokens=int(rng.choice([4, 9]) if i % 7 else 1), sampling=sampling, steering=steering,
                           read=i % 2 == 0, abort=abort))
    return out


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma-like", marks=pytest.mark.slow)])
def test_concurrent_requests_equal_each_generated_alone(family):
    model = tiny_model(TINY_DECODERS[family])
    spec, params = _dictionary()
    reg = DictionaryRegistry().add(SITE, spec, params)
    vec = np.random.default_rng(1).normal(size=32).astype(np.float32)
    eng = Engine(model, EngineConfig(slots=3, max_len=64, steer_sites=(SITE,), read_sites=(SITE,), read_k=4),
                 dictionaries=reg)
    reqs = _requests(np.random.default_rng(0), 7, vec)
    served = eng.run(reqs)
    for r, got in zip(reqs, served):
        alone = generate(model, [list(r.prompt)], max_new_tokens=r.max_new_tokens, sampling=r.sampling,
                         steering=list(r.steering) or None, dictionaries=reg, read=(SITE,), read_k=4,
                         monitor=Monitor(abort_when=r.abort))
        n = int(alone.lengths[0])
        if alone.aborted[0]:  # generate's row ends at its pad token; the engine's with it
            n = int(np.argmax(alone.tokens[0] == 0)) + 1
        assert got["tokens"] == alone.tokens[0, :n].tolist(), r
        assert got["finish_reason"] == ("abort" if alone.aborted[0] else "stop" if alone.tokens[0, n - 1] == 1
                                        else "length")
        if r.read:
            ids, vals = alone.features[SITE]
            assert [f[0] for f in got["features"][SITE]] == ids[0, :n].tolist()
            np.testing.assert_allclose([f[1] for f in got["features"][SITE]], vals[0, :n], rtol=1e-4, atol=1e-5)


def test_no_recompiles_after_warm_up_across_100_requests():
    model = tiny_model(TINY_DECODERS["llama"])
    spec, params = _dictionary()
    reg = DictionaryRegistry().add(SITE, spec, params)
    vec = np.random.default_rng(1).normal(size=32).astype(np.float32)
    eng = Engine(model, EngineConfig(slots=4, max_len=64, steer_sites=(SITE,), read_sites=(SITE,), read_k=4),
                 dictionaries=reg)
    rng = np.random.default_rng(5)
    eng.warm_up()  # every prompt bucket, every step size
    sizes = (engine_mod._prefill._cache_size(), engine_mod._insert._cache_size(), engine_mod._step._cache_size())
    eng.run(_requests(rng, 100, vec))
    assert (engine_mod._prefill._cache_size(), engine_mod._insert._cache_size(),
            engine_mod._step._cache_size()) == sizes


def test_bad_requests_are_refused_in_one_line_and_leave_the_engine_serving():
    model = tiny_model(TINY_DECODERS["llama"])
    spec, params = _dictionary()
    reg = DictionaryRegistry().add(SITE, spec, params)
    eng = Engine(model, EngineConfig(slots=2, max_len=48, steer_sites=(SITE,), feature_slots=2), dictionaries=reg)
    bad = [(Request((), 4), "empty prompt"), (Request((3,) * 40, 20), "exceeds the engine's 48 cache slots"),
           (Request((3, 4), 2, steering=(SteeringVector("blocks.0.resid_post", vector=np.ones(32)),)), "not steerable"),
           (Request((3, 4), 2, steering=(SteeringVector(SITE, features={1: 1.0, 2: 1.0, 3: 1.0}),)), "at most 2"),
           (Request((3, 4), 2, steering=(SteeringVector(SITE, features={64: 1.0}),)), "out of range"),
           (Request((3, 99), 2), r"token ids must be in \[0, 50\)")]
    for req, match in bad:
        with pytest.raises(Exception, match=match) as e:
            eng.prefill(req)
        assert "\n" not in str(e.value)
    assert eng.free == [0, 1]
    good = eng.run([Request((3, 4, 5), 3)])
    assert len(good[0]["tokens"]) >= 1


def test_state_is_allocated_once_and_reports_its_bytes():
    model = tiny_model(TINY_DECODERS["llama"])
    spec, params = _dictionary()
    reg = DictionaryRegistry().add(SITE, spec, params)
    eng = Engine(model, EngineConfig(slots=4, max_len=64, steer_sites=(SITE,), read_sites=(SITE,),
                                     monitor_sites=(SITE,)), dictionaries=reg)
    b = eng.state_bytes()
    cfg = model.cfg
    assert b["kv_cache"] == 2 * cfg.n_layers * 4 * 64 * cfg.n_kv_heads * cfg.head_dim * 4 + 4 * 64 * (4 + 1)
    assert b["steering"] > 0 and b["monitor"] > 0 and b["dictionaries"] == sum(np.asarray(v).nbytes for v in params.values())
    with pytest.raises(EngineError, match="no free decode slot"):
        for _ in range(5):
            eng.insert(eng.prefill(Request((3, 4), 8)))


def test_a_requests_own_monitor_counts_what_generate_monitors_for_it_alone():
    model = tiny_model(TINY_DECODERS["llama"])
    spec, params = _dictionary()
    reg = DictionaryRegistry().add(SITE, spec, params)
    eng = Engine(model, EngineConfig(slots=2, max_len=48, monitor_sites=(SITE,)), dictionaries=reg)
    other = eng.insert(eng.prefill(Request((7, 8, 9, 10), max_new_tokens=9, stop=())))  # a neighbour in the batch
    req = Request((3, 4, 5, 6, 7), max_new_tokens=6, stop=(), monitor=True)
    slot = eng.insert(eng.prefill(req))
    for _ in range(5):
        eng.step()
    mine = eng.request_monitor(slot)[SITE]
    eng.release(slot), eng.release(other)
    alone = generate(model, [list(req.prompt)], max_new_tokens=6, stop=(), dictionaries=reg,
                     monitor=Monitor(sites=(SITE,))).monitor[SITE].total
    assert mine["tokens"] == int(alone.tokens) == 4 + 5  # prompt without its first position, 5 fed tokens
    counts = np.asarray(alone.count, np.float64)
    want = [(int(i), counts[i] / float(alone.tokens)) for i in np.argsort(-counts, kind="stable")[:10] if counts[i] > 0]
    assert [i for i, _ in mine["top_features"]] == [i for i, _ in want]
    np.testing.assert_allclose([r for _, r in mine["top_features"]], [r for _, r in want], rtol=1e-6)
