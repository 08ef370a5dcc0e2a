"""Jitted generation with a KV cache, steering as data, per-row specs, feature reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import generation
from jaxinterp.dictionaries import DictionaryError
from jaxinterp.dictionaries import sae as dl
from jaxinterp.generation import Sampling, generate
from jaxinterp.models import Plan, SiteError, forward
from jaxinterp.steering import DictionaryRegistry, SteeringError, SteeringVector, compile_steering
from helpers import TINY_DECODERS as CFGS  # noqa: E402
from helpers import tiny_model  # noqa: E402

SITE = "blocks.1.resid_post"


def tied_dictionary(d_in: int, d_sae: int, activation: str = "relu", seed: int = 0):
    """A dictionary whose encoder is its decoder's transpose (unit rows), so pre-activations move by
    exactly the amount a feature's decoder row is added."""
    spec = dl.DictionarySpec(activation=activation, d_in=d_in, d_sae=d_sae, k=4)
    params = dict(dl.init(jax.random.key(seed), spec))
    w = np.random.default_rng(seed).normal(size=(d_sae, d_in)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    params |= {"W_dec": jnp.asarray(w), "W_enc": jnp.asarray(w.T), "b_dec": jnp.zeros(d_in),
               "b_enc": jnp.full((d_sae,), -0.1)}
    return spec, params


@pytest.fixture(scope="module", params=list(CFGS))
def model(request):
    return tiny_model(CFGS[request.param])


@pytest.fixture(scope="module")
def gemma_like():
    """The family with the most moving parts (post-norms, soft-caps, sliding windows)."""
    return tiny_model(CFGS["gemma-like"])


PROMPTS = [[2, 7, 9, 4, 11], [3, 8, 5, 6, 12, 13, 14, 20, 21]]


def _recompute_logits(model, row, new):
    toks = list(row) + list(new)
    return np.asarray(forward(model, jnp.asarray([toks])).logits[0, len(row) - 1 :])


def test_kv_cache_decoding_equals_full_recomputation(model):
    res = generate(model, PROMPTS, max_new_tokens=8, stop=(), return_logits=True)
    for i, row in enumerate(PROMPTS):
        want = _recompute_logits(model, row, res.tokens[i, :-1])
        np.testing.assert_allclose(res.logits[i], want, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(res.tokens[i], want.argmax(-1))


def test_stop_token_ends_a_row_and_the_loop(model):
    free = generate(model, PROMPTS, max_new_tokens=6, stop=())
    stop = int(free.tokens[0, 1])
    res = generate(model, PROMPTS, max_new_tokens=6, stop=(stop,))
    first = int(np.argmax(free.tokens[0] == stop))
    assert res.lengths[0] == first + 1
    np.testing.assert_array_equal(res.tokens[0, : first + 1], free.tokens[0, : first + 1])
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else model.cfg.eos_id
    assert (res.tokens[0, first + 1 :] == pad).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=6, stop=())
    k1 = generate(model, PROMPTS, max_new_tokens=6, stop=(), sampling=Sampling(temperature=0.7, top_k=1, seed=3))
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)
    a = generate(model, PROMPTS, max_new_tokens=6, stop=(), sampling=Sampling(temperature=2.0, top_p=0.9, seed=1))
    b = generate(model, PROMPTS, max_new_tokens=6, stop=(), sampling=Sampling(temperature=2.0, top_p=0.9, seed=1))
    c = generate(model, PROMPTS, max_new_tokens=6, stop=(), sampling=Sampling(temperature=2.0, top_p=0.9, seed=2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(generation._sample(logits, jax.random.key(s), (jnp.float32(1), jnp.int32(0), jnp.float32(0.7)), False)[0])
             for s in range(200)}
    assert draws == {0, 1}


def _site_acts(model, spec, params, prompts, steering, registry):
    lens = [len(p) for p in prompts]
    edits, ep = compile_steering(steering, registry, model.cfg, lens)
    res = forward(model, jnp.asarray(prompts), plan=Plan(capture=(SITE,), edits=edits), edit_params=ep)
    x = np.asarray(res.captured[SITE])
    return np.asarray(dl.encode(spec, params, x.reshape(-1, x.shape[-1]))).reshape(*x.shape[:2], -1), x


def _pre(params, x):
    return (x - np.asarray(params["b_dec"])) @ np.asarray(params["W_enc"]) + np.asarray(params["b_enc"])


def test_feature_add_raises_the_feature_and_ablation_removes_it(model):
    spec, params = tied_dictionary(32, 64)
    reg = DictionaryRegistry().add(SITE, spec, params)
    prompt = [PROMPTS[1]]
    base, x0 = _site_acts(model, spec, params, prompt, None, reg)
    up, x1 = _site_acts(model, spec, params, prompt, SteeringVector(SITE, features={5: 3.0}), reg)
    np.testing.assert_allclose(_pre(params, x1)[..., 5], _pre(params, x0)[..., 5] + 3.0, atol=1e-4)
    assert (up[..., 5] >= base[..., 5] + 3.0 - 1e-4).any() and (up[..., 5] >= base[..., 5]).all()
    live = int(np.argmax(base[0].sum(0)))
    assert base[0, :, live].max() > 0
    gone, _ = _site_acts(model, spec, params, prompt, SteeringVector(SITE, features={live: 0.0}, mode="ablate"), reg)
    assert np.abs(gone[..., live]).max() < 1e-5
    clamp, x2 = _site_acts(model, spec, params, prompt, SteeringVector(SITE, features={live: 2.5}, mode="clamp"), reg)
    active = base[..., live] > 0  # where the feature was off, its pre-activation was below 0
    np.testing.assert_allclose(clamp[..., live][active], 2.5, atol=1e-4)
    # x' = x + decode(f') - decode(f): the change is the decoder row alone, the error term is kept
    want = x0 + (2.5 - base[..., live])[..., None] * np.asarray(params["W_dec"])[live]
    np.testing.assert_allclose(x2, want, atol=1e-4)


def test_generate_reads_the_steered_feature(gemma_like):
    model = gemma_like
    spec, params = tied_dictionary(32, 64)
    reg = DictionaryRegistry().add(SITE, spec, params)
    res = generate(model, PROMPTS, max_new_tokens=4, stop=(), dictionaries=reg, read=(SITE,), read_k=4,
                   steering=SteeringVector(SITE, features={17: 50.0}))
    plain = generate(model, PROMPTS, max_new_tokens=4, stop=(), dictionaries=reg, read=(SITE,), read_k=4)
    ids, vals = res.features[SITE]
    assert ids.shape == (2, 4, 4)
    assert (ids[:, :, 0] == 17).all() and (vals[:, :, 0] >= 40).all()
    assert not (plain.features[SITE][0][:, :, 0] == 17).all()


def test_selected_encoding_equals_full_for_relu_dictionaries(gemma_like):
    model = gemma_like
    spec, params = tied_dictionary(32, 64)
    reg = DictionaryRegistry().add(SITE, spec, params)
    st = [SteeringVector(SITE, features={3: 1.5, 9: 0.0}, mode="clamp"), SteeringVector(SITE, features={4: 0.5}, mode="scale")]
    full = generate(model, PROMPTS, max_new_tokens=5, stop=(), dictionaries=reg, steering=st, return_logits=True)
    sel = generate(model, PROMPTS, max_new_tokens=5, stop=(), dictionaries=reg, steering=st, return_logits=True,
                   encode="selected")
    np.testing.assert_allclose(sel.logits, full.logits, atol=1e-4)


def test_per_row_specs_equal_rows_run_one_by_one(gemma_like):
    model = gemma_like
    spec, params = tied_dictionary(32, 64)
    reg = DictionaryRegistry().add(SITE, spec, params)
    rng = np.random.default_rng(0)
    rows = [
        [SteeringVector(SITE, features={3: 4.0}), SteeringVector("blocks.0.resid_post", vector=rng.normal(size=32), scale=2.0)],
        [SteeringVector(SITE, features={40: 1.0}, mode="clamp", positions="generated")],
    ]
    batch = generate(model, PROMPTS, max_new_tokens=6, stop=(), dictionaries=reg, steering=rows, return_logits=True)
    for i in range(2):
        one = generate(model, [PROMPTS[i]], max_new_tokens=6, stop=(), dictionaries=reg, steering=[rows[i]],
                       return_logits=True)
        np.testing.assert_array_equal(batch.tokens[i], one.tokens[0])
        np.testing.assert_allclose(batch.logits[i], one.logits[0], atol=1e-4)
    plain = generate(model, PROMPTS, max_new_tokens=6, stop=(), return_logits=True)
    assert np.abs(plain.logits - batch.logits).max() > 1e-2


def test_vector_modes():
    model = tiny_model(CFGS["llama"])
    v = np.random.default_rng(1).normal(size=32).astype(np.float32)
    u = v / np.linalg.norm(v)

    def site(st):
        edits, ep = compile_steering(st, None, model.cfg, [len(PROMPTS[1])])
        res = forward(model, jnp.asarray([PROMPTS[1]]), plan=Plan(capture=(SITE,), edits=edits), edit_params=ep)
        return np.asarray(res.captured[SITE][0])

    x = site(None)
    np.testing.assert_allclose(site(SteeringVector(SITE, vector=v, scale=2.0)), x + 2 * v, atol=1e-4)
    normed = site(SteeringVector(SITE, vector=v, mode="add_normed", scale=0.5))
    np.testing.assert_allclose(normed, x + 0.5 * np.linalg.norm(x, axis=-1, keepdims=True) * u, atol=1e-4)
    assert np.abs(site(SteeringVector(SITE, vector=v, mode="remove")) @ u).max() < 1e-4
    capped = site(SteeringVector(SITE, vector=v, mode="cap", scale=0.0)) @ u
    np.testing.assert_allclose(capped, np.minimum(x @ u, 0.0), atol=1e-4)
    window = site(SteeringVector(SITE, vector=v, scale=1.0, positions=(2, 5)))
    np.testing.assert_allclose(window[2:5], x[2:5] + v, atol=1e-4)
    np.testing.assert_allclose(np.delete(window, [2, 3, 4], 0), np.delete(x, [2, 3, 4], 0), atol=1e-6)


def test_changing_values_never_recompiles():
    model = tiny_model(CFGS["llama"])
    spec, params = tied_dictionary(32, 64)
    reg = DictionaryRegistry().add(SITE, spec, params)
    rng = np.random.default_rng(2)
    specs = [
        [SteeringVector(SITE, features={3: 4.0}), SteeringVector(SITE, vector=rng.normal(size=32))],
        [SteeringVector(SITE, features={60: -2.0}, mode="clamp"), SteeringVector(SITE, vector=rng.normal(size=32), mode="remove")],
        [SteeringVector(SITE, features={1: 0.0, 2: 3.0}, mode="scale", positions="prompt"),
         SteeringVector(SITE, vector=rng.normal(size=32), mode="cap", scale=0.3)],
    ]
    generate(model, PROMPTS, max_new_tokens=4, dictionaries=reg, steering=specs[0], read=(SITE,))
    before = generation._generate._cache_size()
    for st in specs[1:]:
        generate(model, PROMPTS, max_new_tokens=4, dictionaries=reg, steering=st, read=(SITE,),
                 sampling=Sampling(temperature=0.0, seed=int(rng.integers(100))))
    assert generation._generate._cache_size() == before


def test_one_trace_for_new_values_under_chex(monkeypatch):
    """The compiled program traced at most once while ids, strengths, modes, vectors, windows and
    the seed change (chex.assert_max_traces around the program generate jits)."""
    import chex

    model = tiny_model(CFGS["llama"])
    spec, params = tied_dictionary(32, 64)
    reg = DictionaryRegistry().add(SITE, spec, params)
    chex.clear_trace_counter()
    counted = jax.jit(chex.assert_max_traces(generation.generate_program, n=1), static_argnames=generation.STATIC)
    monkeypatch.setattr(generation, "_generate", counted)
    rng = np.random.default_rng(4)
    for i, mode in enumerate(("add", "clamp", "scale", "ablate")):
        st = [SteeringVector(SITE, features={int(rng.integers(64)): float(rng.normal())}, mode=mode,
                             positions=("all", "prompt", "generated", (1, 6))[i]),
              SteeringVector(SITE, vector=rng.normal(size=32), mode=("add", "remove", "cap", "add_normed")[i])]
        generate(model, PROMPTS, max_new_tokens=4, dictionaries=reg, steering=st, read=(SITE,),
                 sampling=Sampling(temperature=0.5 * i + 0.5, top_k=i, top_p=0.9, seed=i))
    chex.clear_trace_counter()


def test_prompt_length_buckets_share_a_compile():
    model = tiny_model(CFGS["llama"])
    generate(model, [[2, 3, 4]], max_new_tokens=3)
    before = generation._generate._cache_size()
    generate(model, [[2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=3)
    generate(model, [list(range(2, 16))], max_new_tokens=3)
    assert generation._generate._cache_size() == before
    generate(model, [list(range(2, 30))], max_new_tokens=3)
    assert generation._generate._cache_size() == before + 1


def test_bad_specs_fail_before_compiling():
    model = tiny_model(CFGS["llama"])
    spec, params = tied_dictionary(32, 64)
    reg = DictionaryRegistry().add(SITE, spec, params)
    before = generation._generate._cache_size()
    with pytest.raises(SiteError, match="not found"):
        generate(model, PROMPTS, steering=SteeringVector("blocks.1.resid", vector=np.zeros(32)))
    with pytest.raises(SiteError, match="out of range"):
        generate(model, PROMPTS, steering=SteeringVector("blocks.7.resid_post", vector=np.zeros(32)))
    with pytest.raises(SteeringError, match="d_sae=64"):
        generate(model, PROMPTS, dictionaries=reg, steering=SteeringVector(SITE, features={64: 1.0}))
    with pytest.raises(SteeringError, match=r"must be \[32\]"):
        generate(model, PROMPTS, steering=SteeringVector(SITE, vector=np.zeros(31)))
    with pytest.raises(SteeringError, match="no dictionary attached at 'blocks.0.resid_post'"):
        generate(model, PROMPTS, dictionaries=reg, steering=SteeringVector("blocks.0.resid_post", features={1: 1.0}))
    wide = DictionaryRegistry().add(SITE, *tied_dictionary(48, 64))
    with pytest.raises(DictionaryError, match="d_in=48, d_out=48, but the model has width 32"):
        generate(model, PROMPTS, dictionaries=wide, steering=SteeringVector(SITE, features={1: 1.0}))
    with pytest.raises(SteeringError, match="mode 'boost' unknown"):
        SteeringVector(SITE, features={1: 1.0}, mode="boost")
    assert generation._generate._cache_size() == before


def test_generate_cli_prints_steered_and_unsteered(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import subprocess_env, write_tiny_gguf  # noqa: F811

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    vec = tmp_path / "v.npy"
    np.save(vec, np.random.default_rng(0).normal(size=32).astype(np.float32) * 50)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"site": "blocks.0.resid_post", "vector": str(vec), "scale": 1.0, "mode": "add"}]))
    cmd = [sys.executable, "launch/generate.py", "--model", gguf_path, "--prompt", "hello", "--prompt", "a b",
           "--steer", f"blocks.1.resid_post:vector={vec}:scale=2", "--spec", str(spec), "--max-new-tokens", "6", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "a b"]
    assert all(set(r) == {"prompt", "text", "unsteered", "steered"} and r["text"] == r["steered"] for r in rows)
    assert any(r["steered"] != r["unsteered"] for r in rows)
    bad = subprocess.run(cmd[:6] + ["--steer", "blocks.1.resid_post:feature=3:boost=2"], capture_output=True,
                         text=True, env=subprocess_env(), timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "expected SITE:feature" in bad.stderr


def test_generate_cli_without_steering_prints_the_continuation(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import subprocess_env, write_tiny_gguf  # noqa: F811

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    base = [sys.executable, "launch/generate.py", "--model", gguf_path, "--prompt", "hello", "--prompt", "a b",
            "--max-new-tokens", "6"]
    out = subprocess.run(base + ["--json"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "a b"]
    assert all(set(r) == {"prompt", "text", "unsteered"} and r["text"] == r["unsteered"] for r in rows)
    # the same continuation as a zero steering vector, which leaves the forward unchanged
    zero = tmp_path / "zero.npy"
    np.save(zero, np.zeros(32, np.float32))
    steered = subprocess.run(base + ["--json", "--steer", f"blocks.0.resid_post:vector={zero}"], capture_output=True,
                             text=True, env=subprocess_env(), timeout=300)
    assert steered.returncode == 0, steered.stderr
    assert [json.loads(line)["steered"] for line in steered.stdout.splitlines()] == [r["text"] for r in rows]
    plain = subprocess.run(base, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert rows[0]["text"] in plain.stdout and rows[1]["text"] in plain.stdout


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"not an array at all", "not a .npy"),
])
def test_generate_cli_names_a_bad_vector_file_in_one_line(tmp_path, content, match):
    import subprocess
    import sys

    from helpers import subprocess_env, write_tiny_gguf  # noqa: F811

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    vec = tmp_path / "v.npy"
    vec.write_bytes(content)
    out = subprocess.run([sys.executable, "launch/generate.py", "--model", gguf_path, "--prompt", "hello",
                          "--steer", f"blocks.0.resid_post:vector={vec}"], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert str(vec) in lines[0] and match in lines[0], lines[0]


def test_max_activation_units_scale_by_the_features_largest_activation(gemma_like):
    from jaxinterp.steering import feature_max_acts

    model = gemma_like
    spec, params = tied_dictionary(32, 64)
    contexts = np.asarray([[1, *PROMPTS[1]], [1, 4, 4, 9, 30, 31, 2, 7, 8, 5]], np.int32)
    max_acts = feature_max_acts(model, spec, params, SITE, contexts)
    dense = []
    for row in contexts:
        x = np.asarray(forward(model, jnp.asarray([row]), plan=Plan(capture=(SITE,))).captured[SITE][0, 1:])
        dense.append(np.asarray(dl.encode(spec, params, jnp.asarray(x))))
    want = np.concatenate(dense).max(0)
    np.testing.assert_allclose(max_acts, np.where(want > 0, want, 1.0), rtol=1e-5)
    reg = DictionaryRegistry().add(SITE, spec, params, max_acts=max_acts)
    f = int(np.argmax(want))
    _, ep_units = compile_steering(SteeringVector(SITE, features={f: 2.0}, units="max_activation"), reg, model.cfg, [5])
    _, ep_raw = compile_steering(SteeringVector(SITE, features={f: 2.0 * float(want[f])}), reg, model.cfg, [5])
    np.testing.assert_allclose(ep_units[SITE].features.values, ep_raw[SITE].features.values, rtol=1e-6)
    with pytest.raises(SteeringError, match="max_acts"):
        compile_steering(SteeringVector(SITE, features={f: 2.0}, units="max_activation"),
                         DictionaryRegistry().add(SITE, spec, params), model.cfg, [5])
