"""The HTTP front: OpenAI-compatible completions and chat completions with steering and feature
reads, side-by-side steering, dictionaries, Prometheus metrics and health (FastAPI on uvicorn).

    POST /v1/completions         prompt (text or token ids), max_tokens, temperature, top_p, top_k,
                                 seed, stop, logprobs, stream, + steering, return_features
    POST /v1/chat/completions    messages (the model's chat template), the same fields (logprobs:
                                 bool, top_logprobs)
    POST /v1/steer               the steered and the default completion of one prompt, same seed
    GET  /v1/dictionaries        attached dictionaries; POST /v1/dictionaries/load, /unload
    GET  /v1/models, /metrics, /health

`steering` is a list of entries: `{"dictionary": NAME or "site": SITE, "feature": ID, "strength":
V, "mode": "add"|"clamp"|"scale"|"ablate", "positions": "all"|"prompt"|"generated"|[lo, hi]}` or
`{"site": SITE, "vector": [...], "scale": V, "mode": "add"|"add_normed"|"remove"|"cap"}`.
`return_features`: sites whose top features come back with every token. Every bad request gets a
4xx JSON error `{"error": {"message", "type", "param"}}` naming the field and what is allowed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import random
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from jaxinterp.errors import JaxinterpError
from jaxinterp.generation import AbortRule, Sampling
from jaxinterp.serving.engine import Engine, EngineConfig, EngineError, Request
from jaxinterp.serving.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from jaxinterp.steering.spec import DictionaryRegistry, SteeringError, SteeringVector

MAX_STEERING_ENTRIES = 16
MAX_VECTOR = 1 << 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SteeringEntry(_Strict):
    dictionary: str | None = None
    site: str | None = None
    feature: int | None = None
    strength: float = 0.0
    mode: str = "add"
    positions: Literal["all", "prompt", "generated"] | tuple[int, int] = "all"
    vector: list[float] | None = Field(default=None, max_length=MAX_VECTOR)
    scale: float = 1.0


class AbortEntry(_Strict):
    dictionary: str | None = None
    site: str | None = None
    feature: int
    threshold: float


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    steering: list[SteeringEntry] | None = Field(default=None, max_length=MAX_STEERING_ENTRIES)
    return_features: list[str] | None = None
    ignore_eos: bool = False
    """Generate max_tokens whatever the model says (load tests; vLLM's field)."""
    monitor: bool = False
    """Return this request's own statistics at the monitored sites (tokens, top features, KL to the
    baseline) with the completion."""
    abort: list[AbortEntry] | None = Field(default=None, max_length=8)
    """End the completion (finish_reason "content_filter") once a feature exceeds its threshold."""


class CompletionBody(_Common):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class SteerBody(_Common):
    prompt: str | list[int] | None = None
    messages: list[Message] | None = None


class LoadBody(_Strict):
    path: str
    name: str | None = None
    site: str | None = None


class UnloadBody(_Strict):
    name: str


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.error_type = status, message, param, error_type


def _error(status: int, message: str, param: str | None = None, error_type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": error_type, "param": param, "code": None}}, status_code=status)


@dataclasses.dataclass
class Attached:
    name: str
    path: str
    dictionary: Any


class Service:
    """The model, its tokenizer, the attached dictionaries, the engine and its scheduler."""

    def __init__(self, model, tokenizer, *, model_name: str, config: EngineConfig = EngineConfig(),
                 dictionaries: dict[str, Any] | None = None, max_queue: int = 64, default_max_tokens: int = 16,
                 warm_up: bool = False):
        from jaxinterp.serving.metrics import ServingMetrics

        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.base_config, self.default_max_tokens, self.warm = config, default_max_tokens, warm_up
        self.attached: dict[str, Attached] = {}
        for name, (path, d) in (dictionaries or {}).items():
            self.attached[name] = Attached(name, path, d)
        self.metrics = ServingMetrics(lambda: self.scheduler)
        self.engine = self._build_engine()
        self.scheduler = Scheduler(self.engine, max_queue=max_queue, metrics=self.metrics).start()

    def _registry(self) -> DictionaryRegistry:
        reg = DictionaryRegistry()
        for a in self.attached.values():
            reg.add_dictionary(a.dictionary)
        return reg

    def _build_engine(self) -> Engine:
        sites = tuple(dict.fromkeys(a.dictionary.site for a in self.attached.values()))
        c = dataclasses.replace(self.base_config, steer_sites=tuple(dict.fromkeys((*self.base_config.steer_sites, *sites))),
                                read_sites=tuple(dict.fromkeys((*self.base_config.read_sites, *sites))),
                                monitor_sites=tuple(s for s in self.base_config.monitor_sites if s in sites))
        engine = Engine(self.model, c, dictionaries=self._registry())
        if self.warm:  # compile every prompt bucket and step size before the first request
            engine.warm_up()
        return engine

    # ------------------------------------------------------------------ requests

    def tokens_of(self, prompt, param: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as a list of token ids", param)
            ids = self.tokenizer.encode_prompt(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty; send at least one token", param)
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", param)
        return ids

    def chat_tokens(self, messages: list[Message]) -> list[int]:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tok = self.tokenizer
        special = lambda i: tok.id_to_token(i) if i is not None else ""  # noqa: E731
        try:
            text = env.from_string(template).render(messages=[m.model_dump() for m in messages],
                                                    add_generation_prompt=True, bos_token=special(tok.bos_id),
                                                    eos_token=special(tok.eos_id))
        except jinja2.TemplateError as e:
            raise APIError(400, f"the chat template refused these messages: {e}", "messages") from None
        return tok.encode(text, add_bos=False)

    def steering_of(self, entries: list[SteeringEntry] | None) -> tuple[SteeringVector, ...]:
        out = []
        by_name = {a.name: a.dictionary for a in self.attached.values()}
        sites = set(self.engine.config.steer_sites)
        for i, e in enumerate(entries or []):
            p = f"steering[{i}]"
            if e.dictionary is not None:
                if e.dictionary not in by_name:
                    raise APIError(400, f"dictionary {e.dictionary!r} is not loaded; loaded: {sorted(by_name) or 'none'}",
                                   f"{p}.dictionary")
                site = by_name[e.dictionary].site
                if e.site is not None and e.site != site:
                    raise APIError(400, f"dictionary {e.dictionary!r} reads {site!r}, not {e.site!r}", f"{p}.site")
            elif e.site is not None:
                site = e.site
            else:
                raise APIError(400, "give dictionary (a loaded name) or site", p)
            if site not in sites:
                raise APIError(400, f"site {site!r} is not steerable here; steerable: {sorted(sites) or 'none'}",
                               f"{p}.site")
            if (e.feature is None) == (e.vector is None):
                raise APIError(400, "give exactly one of feature (an id) or vector (a list of numbers)", p)
            positions = e.positions if isinstance(e.positions, str) else tuple(e.positions)
            try:
                if e.feature is not None:
                    d = next((a.dictionary for a in self.attached.values() if a.dictionary.site == site), None)
                    if d is None:
                        raise APIError(400, f"no dictionary at {site!r}; feature steering needs one (vector steering "
                                       "does not)", f"{p}.feature")
                    if not 0 <= e.feature < d.d_sae:
                        raise APIError(400, f"feature {e.feature} out of range: the dictionary at {site!r} has "
                                       f"features 0 to {d.d_sae - 1}", f"{p}.feature")
                    modes = ("add", "clamp", "scale", "ablate")
                    if e.mode not in modes:
                        raise APIError(400, f"mode {e.mode!r} unknown for a feature; choose one of {list(modes)}",
                                       f"{p}.mode")
                    out.append(SteeringVector(site, features={e.feature: e.strength}, mode=e.mode, positions=positions))
                else:
                    modes = ("add", "add_normed", "remove", "cap")
                    if e.mode not in modes:
                        raise APIError(400, f"mode {e.mode!r} unknown for a vector; choose one of {list(modes)}",
                                       f"{p}.mode")
                    if len(e.vector) != self.model.cfg.d_model:
                        raise APIError(400, f"vector has {len(e.vector)} numbers; the model's width is "
                                       f"{self.model.cfg.d_model}", f"{p}.vector")
                    out.append(SteeringVector(site, vector=e.vector, mode=e.mode, scale=e.scale, positions=positions))
            except SteeringError as err:
                raise APIError(400, str(err), p) from None
        return tuple(out)

    def request_of(self, body: _Common, tokens: list[int], *, max_tokens: int | None) -> tuple[Request, tuple[str, ...]]:
        reads = tuple(body.return_features or ())
        allowed = set(self.engine.config.read_sites)
        for i, s in enumerate(reads):
            if s not in allowed:
                raise APIError(400, f"no features are read at {s!r}; sites with a dictionary: {sorted(allowed) or 'none'}",
                               f"return_features[{i}]")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        rules = []
        by_name = {a.name: a.dictionary for a in self.attached.values()}
        for i, a in enumerate(body.abort or ()):
            if a.dictionary is not None and a.dictionary not in by_name:
                raise APIError(400, f"dictionary {a.dictionary!r} is not loaded; loaded: {sorted(by_name) or 'none'}",
                               f"abort[{i}].dictionary")
            site = by_name[a.dictionary].site if a.dictionary is not None else a.site
            if site is None:
                raise APIError(400, "give dictionary (a loaded name) or site", f"abort[{i}]")
            rules.append(AbortRule(site, a.feature, a.threshold))
        req = Request(tuple(tokens), max_new_tokens=max_tokens or self.default_max_tokens,
                      sampling=Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=seed),
                      steering=self.steering_of(body.steering), read=bool(reads),
                      stop=() if body.ignore_eos else None, abort=tuple(rules), monitor=body.monitor)
        if body.monitor and not self.engine.config.monitor_sites:
            raise APIError(400, "this server monitors no site (start it with --monitor)", "monitor")
        try:
            self.engine.validate(req)
        except EngineError as e:
            msg = str(e)
            param = ("abort" if "abort rule" in msg else "steering" if "edits" in msg or "steerable" in msg else
                     "max_tokens" if "cache slots" in msg or "max_new_tokens" in msg else "prompt")
            raise APIError(400, msg, param) from None
        except SteeringError as e:
            raise APIError(400, str(e), "steering") from None
        return req, stops

    def submit(self, req: Request, stops, loop: asyncio.AbstractEventLoop) -> tuple[Job, asyncio.Event]:
        wake = asyncio.Event()
        job = Job(req, stop_strings=stops, tokenizer=self.tokenizer,
                  on_event=lambda: loop.call_soon_threadsafe(wake.set))
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_error") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), None, "server_error") from None
        return job, wake


async def _events(job: Job, wake: asyncio.Event, http: HTTPRequest | None, service: Service):
    """The job's events as they come; cancels the job when the client goes away."""
    done = False
    try:
        while not done:
            try:
                event, value = job.events.get_nowait()
            except queue.Empty:
                try:
                    await asyncio.wait_for(wake.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    if http is not None and await http.is_disconnected():
                        return
                wake.clear()
                continue
            done = event in ("done", "error")
            yield event, value
    finally:
        if not done:
            service.scheduler.cancel(job)


def _features_out(token: dict, reads: tuple[str, ...]) -> dict:
    return {s: [[int(i), float(v)] for i, v in zip(*token["features"][s])] for s in reads if s in token["features"]}


def make_app(service: Service) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.scheduler.shutdown, 60.0)

    app = FastAPI(title="jaxinterp", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        problem = err.get("type", "")
        if problem == "json_invalid":
            return _error(400, "the body is not valid JSON", None)
        if problem == "extra_forbidden":
            return _error(400, f"unknown field {param!r}; see the API's fields (OpenAI's plus steering, "
                               "return_features)", param)
        if problem == "missing":
            return _error(400, f"field {param!r} is required", param)
        return _error(400, f"field {param!r}: {err.get('msg', 'invalid')}", param)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.error_type)

    @app.exception_handler(JaxinterpError)
    async def jaxinterp_error(_, exc: JaxinterpError):
        return _error(400, str(exc), None)

    async def run(body: _Common, tokens: list[int], max_tokens, http: HTTPRequest | None):
        req, stops = service.request_of(body, tokens, max_tokens=max_tokens)
        job, wake = service.submit(req, stops, asyncio.get_running_loop())
        return req, job, wake

    async def collect(job, wake, http):
        tokens, reason = [], None
        async for event, value in _events(job, wake, http, service):
            if event == "token":
                tokens.append(value)
            elif event == "error":
                raise APIError(400, value, None)
            else:
                reason = value
        return tokens, reason

    def _completion_logprobs(tokens, n):
        tok = service.tokenizer
        name = (lambda i: tok.decode([i])) if tok is not None else str
        kept = [t for t in tokens if not t["stop"]]
        return {"tokens": [name(t["id"]) for t in kept], "token_logprobs": [t["logprob"] for t in kept],
                "top_logprobs": [{name(i): v for i, v in list(zip(*t["top"]))[:n]} for t in kept] if n else None,
                "text_offset": None}

    def _chat_logprobs(tokens, n):
        tok = service.tokenizer
        name = (lambda i: tok.decode([i])) if tok is not None else str
        out = []
        for t in tokens:
            if t["stop"]:
                continue
            s = name(t["id"])
            out.append({"token": s, "logprob": t["logprob"], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": name(i), "logprob": v, "bytes": list(name(i).encode())}
                                         for i, v in list(zip(*t["top"]))[: n or 0]]})
        return {"content": out}

    def _usage(req, tokens):
        n = sum(1 for t in tokens if not t["stop"])
        return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}

    async def _complete(body, tokens, max_tokens, http, *, chat: bool):
        req, job, wake = await run(body, tokens, max_tokens, http)
        reads = tuple(body.return_features or ())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            async def sse():
                if chat:
                    first = {"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": service.model_name,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                async for event, value in _events(job, wake, http, service):
                    if event == "error":
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'invalid_request_error'}})}\n\n"
                        break
                    if event == "token":
                        if value["stop"] and not value["text"]:
                            continue
                        choice = {"index": 0, "finish_reason": None}
                        if chat:
                            choice["delta"] = {"content": value["text"]}
                            if body.logprobs:
                                choice["logprobs"] = _chat_logprobs([value], body.top_logprobs)
                        else:
                            choice["text"] = value["text"]
                            choice["logprobs"] = (_completion_logprobs([value], body.logprobs)
                                                  if body.logprobs is not None else None)
                        if reads:
                            choice["features"] = [_features_out(value, reads)]
                        chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": service.model_name, "choices": [choice]}
                    else:
                        choice = {"index": 0, "finish_reason": "content_filter" if value == "abort" else value}
                        choice |= {"delta": {}} if chat else {"text": ""}
                        if body.monitor:
                            choice["monitor"] = job.monitor
                        chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": service.model_name, "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        tokens_out, reason = await collect(job, wake, http)
        reason = "content_filter" if reason == "abort" else reason
        if reason == "cancelled":
            return _error(499, "the request was cancelled", None)
        text = job.text
        choice = {"index": 0, "finish_reason": reason}
        if chat:
            choice |= {"message": {"role": "assistant", "content": text},
                       "logprobs": _chat_logprobs(tokens_out, body.top_logprobs) if body.logprobs else None}
        else:
            choice |= {"text": text, "logprobs": _completion_logprobs(tokens_out, body.logprobs)
                       if body.logprobs is not None else None}
        if reads:
            choice["features"] = [_features_out(t, reads) for t in tokens_out if not t["stop"]]
        if body.monitor:
            choice["monitor"] = job.monitor
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": service.model_name, "choices": [choice], "usage": _usage(req, tokens_out)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        return await _complete(body, service.tokens_of(body.prompt, "prompt"), body.max_tokens, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        return await _complete(body, service.chat_tokens(body.messages), body.max_completion_tokens or body.max_tokens,
                               http, chat=True)

    @app.post("/v1/steer")
    async def steer(body: SteerBody, http: HTTPRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if not body.steering:
            raise APIError(400, "give the steering to compare with the default", "steering")
        if body.stream:
            raise APIError(400, "/v1/steer does not stream; drop stream", "stream")
        tokens = service.tokens_of(body.prompt, "prompt") if body.prompt is not None else service.chat_tokens(body.messages)
        if body.seed is None:
            body = body.model_copy(update={"seed": random.randrange(2**31)})
        plain = body.model_copy(update={"steering": None})
        (req_s, job_s, wake_s), (req_d, job_d, wake_d) = (await run(body, tokens, body.max_tokens, http),
                                                          await run(plain, tokens, body.max_tokens, http))
        (tok_s, why_s), (tok_d, why_d) = await asyncio.gather(collect(job_s, wake_s, http), collect(job_d, wake_d, http))
        return {"model": service.model_name, "seed": body.seed,
                "steered": {"text": job_s.text, "finish_reason": why_s, "usage": _usage(req_s, tok_s)},
                "default": {"text": job_d.text, "finish_reason": why_d, "usage": _usage(req_d, tok_d)}}

    def _describe(a: Attached) -> dict:
        d = a.dictionary
        return {"name": a.name, "path": a.path, "site": d.site, "target_site": d.target_site, "d_sae": d.d_sae,
                "kind": f"{d.spec.activation} {d.spec.architecture}", "model": d.model}

    @app.get("/v1/dictionaries")
    async def dictionaries():
        return {"object": "list", "data": [_describe(a) for a in service.attached.values()]}

    async def _rebuild():
        loop = asyncio.get_running_loop()

        def build():
            service.engine = service._build_engine()
            service.scheduler.engine = service.engine
            return True

        fut = service.scheduler.call(build, when_idle=True)
        await loop.run_in_executor(None, fut.result, 600)

    @app.post("/v1/dictionaries/load")
    async def load(body: LoadBody):
        from jaxinterp.dictionaries.artifact import CLTDictionary, load_dictionary

        try:
            d = await asyncio.get_running_loop().run_in_executor(None, load_dictionary, body.path)
        except JaxinterpError as e:
            raise APIError(400, str(e), "path") from None
        if isinstance(d, CLTDictionary):
            raise APIError(400, "a cross-layer transcoder cannot be attached to one site; load an SAE or transcoder",
                           "path")
        if body.site is not None:
            d = dataclasses.replace(d, site=body.site)
        try:
            d.check_model(service.model.cfg.d_model, service.model.cfg.n_layers, model=service.model_name)
        except JaxinterpError as e:
            raise APIError(400, str(e), "path") from None
        name = body.name or body.path
        if any(a.dictionary.site == d.site and a.name != name for a in service.attached.values()):
            raise APIError(409, f"a dictionary is already attached at {d.site!r}; unload it first", "site")
        service.attached[name] = Attached(name, body.path, d)
        await _rebuild()
        return _describe(service.attached[name])

    @app.post("/v1/dictionaries/unload")
    async def unload(body: UnloadBody):
        if body.name not in service.attached:
            raise APIError(404, f"no dictionary named {body.name!r}; loaded: {sorted(service.attached) or 'none'}",
                           "name")
        del service.attached[body.name]
        await _rebuild()
        return {"name": body.name, "unloaded": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "jaxinterp"}]}

    @app.get("/metrics")
    async def metrics():
        if service.engine.config.monitor_sites:
            from jaxinterp.monitor.drift import drift_report
            from jaxinterp.monitor.metrics import fires_from_state

            def read():
                mon = service.engine.state.monitor
                return drift_report(mon), {s: fires_from_state(m) for s, m in mon.items()}

            report, fires = await asyncio.get_running_loop().run_in_executor(
                None, service.scheduler.call(read).result, 60)
            service.metrics.observe_report(report, fires)
        return PlainTextResponse(service.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "slots": service.engine.config.slots,
                "slots_in_use": service.scheduler.slots_in_use, "queue": service.scheduler.queue_length}

    return app
