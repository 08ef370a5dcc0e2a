"""Load test of the server on loopback: N concurrent clients (1, 8, 32 by default) each sending a
bounded number of streamed completions, a mix of unsteered, feature-steered, vector-steered and
feature-reading requests of different lengths.

Per level: output tokens/s, p50 / p99 time to first token and time per output token (client-side,
from the SSE stream). In the same run: the steering overhead under load (the level's load with its
steering stripped, then as is: throughput ratio), served throughput against `jaxinterp.generate`'s
static batch of the same requests at the same batch size, and the device bytes of the
dictionaries, steering slots and monitoring state against the model and KV cache.
"""

from __future__ import annotations

import statistics
import threading
import time

import jax
import numpy as np


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(xs, q):
    return float(np.percentile(np.asarray(xs, np.float64), q)) if xs else float("nan")


def _requests(rng, n, site, d_sae, d_model, vocab, *, steer: bool = True, max_tokens: int = 32):
    out = []
    for i in range(n):
        kind = ("plain", "feature", "vector", "read")[i % 4]
        body = {"prompt": rng.integers(2, vocab, size=int(rng.integers(8, 48))).tolist(), "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "ignore_eos": True}
        if steer and kind == "feature":
            body["steering"] = [{"site": site, "feature": int(rng.integers(d_sae)), "strength": 4.0, "mode": "add"}]
        elif steer and kind == "vector":
            body["steering"] = [{"site": site, "vector": (rng.normal(size=d_model) * 0.5).tolist(), "scale": 1.0}]
        elif steer and kind == "read":
            body["return_features"] = [site]
        out.append(body)
    return out


def _load(url, bodies_per_client):
    """Run each client's bodies in turn, all clients at once; per request (ttft, per-token, tokens)."""
    import httpx

    results, lock = [], threading.Lock()

    def client(bodies):
        with httpx.Client(timeout=600) as c:
            for body in bodies:
                t0 = time.perf_counter()
                first, n, last = None, 0, t0
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"server answered {r.status_code}: {r.read()[:200]!r}")
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.perf_counter()
                        if '"finish_reason": null' in line:
                            n += 1
                            first = first or now
                            last = now
                with lock:
                    results.append((first - t0 if first else float("nan"),
                                    (last - first) / (n - 1) if first and n > 1 else float("nan"), n))

    threads = [threading.Thread(target=client, args=(b,)) for b in bodies_per_client]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    ttft = [r[0] for r in results if r[0] == r[0]]
    tpot = [r[1] for r in results if r[1] == r[1]]
    return {"requests": len(results), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
            "tpot_p50_s": _percentile(tpot, 50), "tpot_p99_s": _percentile(tpot, 99)}


def run(*, model: str = "smollm2-135m", site: str = "blocks.15.resid_post", d_sae: int = 4608, k: int = 32,
        clients: tuple[int, ...] = (1, 8, 32), requests_per_client: int = 2, max_tokens: int = 32,
        overhead_clients: int = 8, max_len: int = 128) -> dict:
    import uvicorn

    from jaxinterp.dictionaries import sae as dl
    from jaxinterp.dictionaries.artifact import Dictionary
    from jaxinterp.generation import generate
    from jaxinterp.models import load_model
    from jaxinterp.serving.engine import Engine, EngineConfig
    from jaxinterp.serving.server import Service, make_app

    lm, tok = load_model(model)
    cfg = lm.cfg
    spec = dl.DictionarySpec(activation="topk", d_in=cfg.d_model, d_sae=d_sae, k=k)
    d = Dictionary(spec, dict(dl.init(jax.random.key(0), spec)), site=site, model=model)
    slots = max(clients)
    service = Service(lm, tok, model_name=model, dictionaries={"bench": ("random", d)}, max_queue=4 * slots,
                      config=EngineConfig(slots=slots, max_len=max_len, monitor_sites=(site,)), warm_up=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    try:
        warm = _requests(rng, 8, site, d_sae, cfg.d_model, cfg.vocab_size, max_tokens=4)
        warm += [dict(warm[0], prompt=[5] * 60), dict(warm[0], prompt=[5] * 20), dict(warm[0], prompt=[5] * 6)]
        _load(url, [warm])  # compiles every prompt bucket and the step
        levels = {}
        for n in clients:
            bodies = _requests(rng, n * requests_per_client, site, d_sae, cfg.d_model, cfg.vocab_size,
                               max_tokens=max_tokens)
            levels[str(n)] = _load(url, [bodies[i::n] for i in range(n)])
        # steering overhead under load: the same requests without and with their steering, three rounds
        bodies = _requests(np.random.default_rng(1), overhead_clients * requests_per_client, site, d_sae, cfg.d_model,
                           cfg.vocab_size, max_tokens=max_tokens)
        plain = [{k2: v for k2, v in b.items() if k2 not in ("steering", "return_features")} for b in bodies]
        split = lambda bs: [bs[i::overhead_clients] for i in range(overhead_clients)]  # noqa: E731
        rounds = {"unsteered": [], "steered": []}
        for order in (("unsteered", "steered"), ("steered", "unsteered"), ("unsteered", "steered")):  # order alternates
            for name in order:
                rounds[name].append(_load(url, split(plain if name == "unsteered" else bodies))["tokens_per_s"])
        served_plain = statistics.median(rounds["unsteered"])
        served_steered = statistics.median(rounds["steered"])
    finally:
        server.should_exit = True
        thread.join(60)
    # static batching of the same unsteered requests, the same batch size
    prompts = [b["prompt"] for b in plain[:overhead_clients]]
    generate(lm, prompts, max_new_tokens=max_tokens, stop=())  # compile
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = generate(lm, prompts, max_new_tokens=max_tokens, stop=())
        times.append(time.perf_counter() - t0)
    static_tps = float(res.lengths.sum()) / statistics.median(times)
    # device bytes: the serving state with and without dictionaries, steering and monitoring
    with_all = service.engine.state_bytes()
    bare = Engine(lm, EngineConfig(slots=slots, max_len=max_len, steer_sites=(), vector_slots=0)).state_bytes()
    model_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(service.engine.weights)
                      if hasattr(a, "dtype"))
    extra = with_all["dictionaries"] + with_all["steering"] + with_all["monitor"]
    base = model_bytes + bare["kv_cache"] + bare["other"]
    return {"benchmark": "serve", "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "model": model, "site": site, "d_sae": d_sae, "slots": slots, "max_tokens": max_tokens,
            "requests_per_client": requests_per_client, "levels": levels,
            "steering_overhead": {"clients": overhead_clients, "unsteered_tokens_per_s": served_plain,
                                  "steered_tokens_per_s": served_steered,
                                  "overhead": served_plain / served_steered - 1.0, "rounds": rounds},
            "static_batch": {"batch": overhead_clients, "tokens_per_s": static_tps,
                             "served_over_static": served_plain / static_tps},
            "memory_bytes": {"model": model_bytes, "kv_cache": bare["kv_cache"], "dictionaries": with_all["dictionaries"],
                             "steering_slots": with_all["steering"], "monitoring": with_all["monitor"],
                             "overhead_ratio": extra / base}}


def format_human(r: dict) -> str:
    lines = [f"serve: {r['model']} on {r['platform']} ({r['device']}), {r['slots']} slots, dictionary d_sae {r['d_sae']} "
             f"at {r['site']}, {r['max_tokens']} tokens a request, {r['requests_per_client']} requests per client"]
    for n, lv in r["levels"].items():
        lines.append(f"  {n:>3} clients: {lv['tokens_per_s']:8.1f} tokens/s  ttft p50 {lv['ttft_p50_s'] * 1e3:7.1f} ms "
                     f"p99 {lv['ttft_p99_s'] * 1e3:7.1f} ms  per token p50 {lv['tpot_p50_s'] * 1e3:6.1f} ms "
                     f"p99 {lv['tpot_p99_s'] * 1e3:6.1f} ms  ({lv['requests']} requests)")
    so, sb, m = r["steering_overhead"], r["static_batch"], r["memory_bytes"]
    lines.append(f"  steering overhead under load ({so['clients']} clients, same requests with / without their "
                 f"steering): {so['overhead'] * 100:+.1f}% ({so['steered_tokens_per_s']:.1f} vs "
                 f"{so['unsteered_tokens_per_s']:.1f} tokens/s)")
    lines.append(f"  served / static batch of {sb['batch']} (jaxinterp.generate): {sb['served_over_static']:.2f} "
                 f"({sb['tokens_per_s']:.1f} tokens/s static)")
    lines.append(f"  device bytes: dictionaries {m['dictionaries'] / 2**20:.1f} MiB, steering slots "
                 f"{m['steering_slots'] / 2**20:.2f} MiB, monitoring {m['monitoring'] / 2**20:.2f} MiB over model "
                 f"{m['model'] / 2**20:.1f} MiB + KV cache {m['kv_cache'] / 2**20:.1f} MiB: "
                 f"{m['overhead_ratio'] * 100:.1f}%")
    return "\n".join(lines)
