"""The HTTP server on loopback: the OpenAI client unchanged (steering through extra_body), streaming,
side-by-side steering, dictionaries, metrics; hostile requests answered 4xx while others complete."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from helpers import free_port, unit_row_dictionary, write_tiny_gguf

from jaxinterp.dictionaries.artifact import Dictionary
from jaxinterp.generation import Sampling, generate
from jaxinterp.models import load_model
from jaxinterp.serving.engine import EngineConfig
from jaxinterp.serving.server import Service, make_app
from jaxinterp.steering import DictionaryRegistry, SteeringVector

pytestmark = pytest.mark.isolated

SITE = "blocks.1.resid_post"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _dictionary(d_in=32, d_sae=64, seed=0):
    return Dictionary(*unit_row_dictionary(d_in, d_sae, seed), site=SITE, model="tiny")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    path = write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf")
    model, tok = load_model(path)
    tok.chat_template = TEMPLATE
    d = _dictionary()
    service = Service(model, tok, model_name="tiny", config=EngineConfig(slots=4, max_len=96, monitor_sites=(SITE,),
                                                                         monitor_window=16),
                      dictionaries={"tiny-sae": ("mem", d)}, max_queue=8)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", service, model, tok, d
    srv.should_exit = True
    thread.join(30)


def _alone(model, tok, d, prompt, n, steering=None, sampling=Sampling()):
    reg = DictionaryRegistry().add_dictionary(d)
    res = generate(model, [tok.encode_prompt(prompt)], max_new_tokens=n, sampling=sampling, steering=steering,
                   dictionaries=reg, tokenizer=tok)
    return res.text[0]


def test_the_openai_client_talks_to_the_server_unchanged(server):
    import openai

    url, service, model, tok, d = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0)
    assert r.choices[0].text == _alone(model, tok, d, "hello world", 8)
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    steer = [{"dictionary": "tiny-sae", "feature": 3, "strength": 40.0, "mode": "add"}]
    s = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0,
                                  extra_body={"steering": steer, "return_features": [SITE]})
    want = _alone(model, tok, d, "hello world", 8, SteeringVector(SITE, features={3: 40.0}))
    assert s.choices[0].text == want != r.choices[0].text
    feats = s.choices[0].model_extra["features"]  # a field the client does not know, kept as it came
    assert len(feats) == s.usage.completion_tokens and all(SITE in f for f in feats)
    sampled = client.completions.create(model="tiny", prompt="a b c", max_tokens=6, temperature=0.8, top_p=0.9, seed=7,
                                        extra_body={"top_k": 20})
    assert sampled.choices[0].text == _alone(model, tok, d, "a b c", 6,
                                             sampling=Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=7))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].logprobs.content[0].top_logprobs
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    lp = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) >= 1 and all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)


def test_steer_endpoint_and_dictionaries(server):
    url, service, model, tok, d = server
    body = {"prompt": "hello world", "max_tokens": 6, "temperature": 0,
            "steering": [{"site": SITE, "feature": 5, "strength": 60.0}]}
    r = httpx.post(url + "/v1/steer", json=body, timeout=60).json()
    assert r["default"]["text"] == _alone(model, tok, d, "hello world", 6)
    assert r["steered"]["text"] == _alone(model, tok, d, "hello world", 6, SteeringVector(SITE, features={5: 60.0}))
    own = httpx.post(url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 4, "temperature": 0,
                                                    "monitor": True}, timeout=60).json()["choices"][0]["monitor"][SITE]
    assert own["tokens"] >= 4 and own["top_features"] and own["kl_divergence"] is None  # no baseline given
    listed = httpx.get(url + "/v1/dictionaries").json()["data"]
    assert [x["name"] for x in listed] == ["tiny-sae"] and listed[0]["site"] == SITE and listed[0]["d_sae"] == 64


def test_hostile_requests_get_4xx_naming_the_field_while_others_complete(server):
    url, service, *_ = server
    good = []

    def run_good(i):
        r = httpx.post(url + "/v1/completions", json={"prompt": f"text {i}", "max_tokens": 12, "temperature": 0.5,
                                                       "seed": i}, timeout=120)
        good.append(r.status_code)

    threads = [threading.Thread(target=run_good, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    bad = [
        (b"{not json", "not valid JSON", None),
        ({"prompt": "x", "bogus": 1}, "unknown field 'bogus'", "bogus"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens", "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature", "temperature"),
        ({}, "field 'prompt' is required", "prompt"),
        ({"prompt": "x", "steering": [{"dictionary": "nope", "feature": 1}]}, "not loaded; loaded: ['tiny-sae']",
         "steering[0].dictionary"),
        ({"prompt": "x", "steering": [{"site": "blocks.0.resid_post", "feature": 1}]}, "not steerable",
         "steering[0].site"),
        ({"prompt": "x", "steering": [{"dictionary": "tiny-sae", "feature": 64}]}, "features 0 to 63",
         "steering[0].feature"),
        ({"prompt": "x", "steering": [{"dictionary": "tiny-sae", "feature": 1, "mode": "boost"}]}, "choose one of",
         "steering[0].mode"),
        ({"prompt": "x", "steering": [{"site": SITE, "vector": [1.0, 2.0]}]}, "width is 32", "steering[0].vector"),
        ({"prompt": "x", "steering": [{"dictionary": "tiny-sae", "feature": i} for i in range(5)]}, "at most 4",
         "steering"),
        ({"prompt": "x", "steering": [{"dictionary": "tiny-sae", "feature": 1}] * 17}, "steering", "steering"),
        ({"prompt": "word " * 200, "max_tokens": 8}, "exceeds", "max_tokens"),
        ({"prompt": [1, 2, 10**6]}, "token ids must be in", "prompt"),
        ({"prompt": "x", "return_features": ["blocks.0.mlp_out"]}, "no features are read", "return_features[0]"),
        ({"prompt": "x", "n": 3}, "n", "n"),
    ]
    for payload, match, param in bad:
        kw = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
            else {"json": payload}
        r = httpx.post(url + "/v1/completions", timeout=30, **kw)
        assert 400 <= r.status_code < 500, (payload, r.status_code, r.text)
        err = r.json()["error"]
        assert match in err["message"] and err["param"] == param, (payload, err)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    for t in threads:
        t.join(120)
    assert good == [200, 200, 200]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=60).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"jaxinterp_serve_time_to_first_token_seconds", "jaxinterp_serve_slots_in_use", "jaxinterp_drift_kl",
            "jaxinterp_serve_requests", "jaxinterp_serve_step_seconds"} <= names
    assert 'jaxinterp_drift_kl{site="blocks.1.resid_post"}' in text


def test_a_full_queue_answers_429_and_a_gone_client_frees_its_slot(server):
    url, service, *_ = server
    codes = []

    def fire():
        r = httpx.post(url + "/v1/completions", json={"prompt": "x y", "max_tokens": 60, "temperature": 0}, timeout=300)
        codes.append(r.status_code)

    threads = [threading.Thread(target=fire) for _ in range(16)]  # 4 slots + 8 waiting: some must be refused
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    # the queue holds 8 (slots fill one prefill per decode step meanwhile): every request is served or refused
    assert sorted(set(codes)) == [200, 429] and 9 <= codes.count(200) <= 12 and len(codes) == 16
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "x", "max_tokens": 80, "temperature": 0,
                                                             "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk read, then the client goes away
    deadline = time.time() + 30
    while httpx.get(url + "/health").json()["slots_in_use"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(url + "/health").json()["slots_in_use"] == 0


def test_dictionaries_load_and_unload_by_path(server, tmp_path):
    from jaxinterp.dictionaries import save

    url, service, model, tok, d = server
    other = Dictionary(d.spec, d.params, site="blocks.0.resid_post", model="tiny")
    save(tmp_path / "d0", other)
    r = httpx.post(url + "/v1/dictionaries/load", json={"path": str(tmp_path / "d0"), "name": "layer0"}, timeout=120)
    assert r.status_code == 200 and r.json()["site"] == "blocks.0.resid_post", r.text
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0,
            "steering": [{"dictionary": "layer0", "feature": 2, "strength": 30.0}], "return_features": ["blocks.0.resid_post"]}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    bad = httpx.post(url + "/v1/dictionaries/load", json={"path": str(tmp_path / "missing")}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path" and "not found" in bad.json()["error"]["message"]
    assert httpx.post(url + "/v1/dictionaries/unload", json={"name": "layer0"}, timeout=120).status_code == 200
    gone = httpx.post(url + "/v1/completions", json={k: v for k, v in body.items() if k != "return_features"}, timeout=60)
    assert gone.status_code == 400 and gone.json()["error"]["param"] == "steering[0].dictionary"
    assert httpx.post(url + "/v1/dictionaries/unload", json={"name": "layer0"}, timeout=60).status_code == 404


def test_launch_serve_answers_on_loopback(tmp_path):
    import subprocess
    import sys

    from helpers import subprocess_env

    from jaxinterp.dictionaries import save

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    save(tmp_path / "sae", _dictionary())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "launch/serve.py", "--model", gguf, "--dictionary", f"tiny={tmp_path / 'sae'}",
                             "--port", str(port), "--slots", "2", "--max-len", "64", "--no-warm-up"],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0,
                                                       "steering": [{"dictionary": "tiny", "feature": 1, "strength": 5}]},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        # shutdown drains: a stream in flight when the server is told to stop still ends with [DONE]
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "x", "max_tokens": 40, "temperature": 0,
                                                                 "ignore_eos": True, "stream": True}, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: {") and not lines:
                    proc.terminate()  # SIGTERM after the first token
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(lines)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert "serving" in out and proc.returncode in (0, -15), err[-2000:]


def test_an_abort_rule_ends_a_completion_as_content_filter(server):
    url, *_ = server
    body = {"prompt": "hello", "max_tokens": 8, "temperature": 0,
            "abort": [{"dictionary": "tiny-sae", "feature": 0, "threshold": -1.0}]}  # fires at the first token
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "content_filter" and r["usage"]["completion_tokens"] == 0
    bad = httpx.post(url + "/v1/completions", json=body | {"abort": [{"site": SITE, "feature": 99, "threshold": 1}]},
                     timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "abort" and "out of range" in bad.text


def test_hf_checkpoints_bring_their_chat_template(tmp_path):
    import json as _json

    from jaxinterp.models.hf import _chat_template

    (tmp_path / "tokenizer_config.json").write_text(_json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert _chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert _chat_template(tmp_path) == "J"
    assert _chat_template(tmp_path / "missing") is None
