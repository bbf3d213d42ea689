"""`rgemma serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra).

    POST /v1/chat/completions   messages -> a reply (streamed as server-sent events or not)
    POST /v1/completions        prompt -> a continuation (raw text, no chat template)
    GET  /v1/models             the one model served
    GET  /health                liveness and load (no API key needed)

The shapes follow OpenAI's API (docs/server.md), with llama.cpp's server's extra sampling
fields `top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`. This module only reads and checks
requests and writes responses: prompts are rendered by `Tokenizer.chat_messages` /
`raw_prompt`, generation runs on the `Scheduler` (continuous batching) with the `StateCache`.
Every failure is an OpenAI-shaped JSON error `{"error": {"message", "type", "param", "code"}}`;
no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import RgemmaError
from .sampling import SamplerSettings
from .scheduler import QueueFull, Request, Scheduler, ShuttingDown
from .tokenizer import END_OF_TURN, START_OF_TURN

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's options; docs/server.md)."""

    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int = 32768
    max_tokens: int = 2048  # the most a reply may have, and what it gets when it does not say
    max_stop_strings: int = MAX_STOP_STRINGS


class APIError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- reading a request ---------------------------------------------------------------------------

async def read_json(request: HTTPRequest, limit: int) -> dict:
    """The body as a JSON object, read at most `limit` bytes (413 past it)."""
    too_big = APIError(413, f"request body too large: the limit is {limit} bytes "
                       f"(rgemma serve --max-body-mb)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        detail = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise _bad(f"the request body is not valid JSON{detail}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _number(body: dict, name: str, *, integer: bool = False, lo=None, hi=None, lo_open=False):
    """body[name] if given and not null: a JSON number (an integer if `integer`) in range."""
    v = body.get(name)
    if v is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(f"'{name}' must be {kind}, got {json.dumps(v)[:40]}", name)
    if isinstance(v, float) and not math.isfinite(v):  # (an int too large for a float is
        # still compared exactly below: math.isfinite(10**400) would raise OverflowError)
        raise _bad(f"'{name}' must be a finite number", name)
    below = v <= lo if lo_open else v < lo if lo is not None else False
    if below or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise _bad(f"'{name}' must be in {rng}, got {v}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be true or false", name)
    return v


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else None
                raise _bad(f"{where}.content[{i}]: only text parts are supported"
                           + (f", not {json.dumps(kind)[:30]}" if kind else ""), "messages")
            parts.append(p["text"])
        return "\n".join(parts)
    raise _bad(f"{where}.content must be a string or a list of text parts", "messages")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or object is unhashable
            raise _bad(f"{where}.role must be one of system, user, assistant, got "
                       f"{json.dumps(role)[:30]}", "messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": ROLES[role], "content": _text(content, where)})
    return out


def parse_prompt(body: dict, tokenizer) -> list[int]:
    """/v1/completions' prompt: a string, a list of one string, or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        try:  # a lone surrogate (a JSON \ud800 escape) is not text: refused naming it
            return tokenizer.raw_prompt(p)
        except RgemmaError as e:
            raise _bad(str(e), "prompt") from None
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if min(p) < 0 or max(p) >= tokenizer.vocab_size:
            raise _bad(f"'prompt' token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        return list(p)
    raise _bad("'prompt' must be a string (or a list of one string, or of token ids)", "prompt")


def parse_settings(body: dict, limits: Limits) -> tuple[SamplerSettings, int, tuple, bool, bool]:
    """(sampler settings with a seed, max_tokens, stop strings, stream, include_usage)."""
    for name in ("n", "best_of"):
        if _number(body, name, integer=True, lo=1) not in (None, 1):
            raise _bad(f"'{name}' must be 1: one choice per request", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, lo=-2, hi=2) not in (None, 0):
            raise _bad(f"'{name}' is not supported; use 'repeat_penalty' (llama.cpp's)", name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") is not None:
        raise _bad("'logprobs' is not supported", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools and functions are not supported", "tools")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _bad("'model' must be a string", "model")
    given = {k: v for k, v in {
        "temperature": _number(body, "temperature", lo=0, hi=100),
        "top_p": _number(body, "top_p", lo=0, hi=1, lo_open=True),
        "top_k": _number(body, "top_k", integer=True, lo=0),
        "min_p": _number(body, "min_p", lo=0, hi=1),
        "repeat_penalty": _number(body, "repeat_penalty", lo=0.01, hi=100),
        "repeat_last_n": _number(body, "repeat_last_n", integer=True, lo=0, hi=4096),
    }.items() if v is not None}
    seed = _number(body, "seed", integer=True, lo=-1, hi=2**64 - 1)
    given["seed"] = seed if seed is not None and seed >= 0 else secrets.randbits(63)
    try:
        settings = SamplerSettings(**given)
    except RgemmaError as e:  # names the flag; say the field
        raise _bad(str(e).replace("--", "").replace("-", "_", 1)) from None
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        v = _number(body, name, integer=True, lo=0)
        if v is not None:
            if v > limits.max_tokens:
                raise _bad(f"'{name}' is {v}; this server allows at most {limits.max_tokens} "
                           f"(rgemma serve --max-tokens)", name)
            max_tokens = v if max_tokens is None else max_tokens
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > limits.max_stop_strings:
        raise _bad(f"'stop' may hold at most {limits.max_stop_strings} strings", "stop")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = _bool(opts or {}, "include_usage")
    return (settings, limits.max_tokens if max_tokens is None else max_tokens,
            tuple(s for s in stop if s), stream, include_usage)


# -- the app -------------------------------------------------------------------------------------

def create_app(scheduler: Scheduler, tokenizer, *, model_name: str, api_key: str | None = None,
               limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app over a started scheduler."""
    app = FastAPI(title="rgemma", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    app.state.draining = False

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        if e.status_code == 404:
            return APIError(404, f"unknown URL: {request.method} {request.url.path}",
                            type="not_found_error", code="unknown_url").response()
        if e.status_code == 405:
            return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request, e):  # a bug: one line in the log, a generic error to the client
        print(f"rgemma serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return APIError(500, "internal server error", type="server_error").response()

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        ok = not app.state.draining
        cache = scheduler.cache
        return JSONResponse({
            "status": "ok" if ok else "shutting down", "model": model_name,
            "running": len(scheduler.running), "waiting": len(scheduler.waiting),
            "max_batch": scheduler.max_batch, "steps": scheduler.steps,
            "state_cache": None if cache is None else {
                "entries": len(cache), "bytes": cache.nbytes, "hits": cache.hits,
                "misses": cache.misses}},
            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "rgemma"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        check_key(request)
        body = await read_json(request, limits.max_body_bytes)
        messages = parse_messages(body)
        settings, max_tokens, stop, stream, usage = parse_settings(body, limits)
        try:
            ids = tokenizer.chat_messages(messages)
        except RgemmaError as e:
            raise _bad(str(e), "messages") from None
        stop_ids = frozenset({tokenizer.eos_id, END_OF_TURN, START_OF_TURN})

        def render_reply(text):  # how the next request will show this reply (state cache)
            return tokenizer.chat_messages(messages + [{"role": "assistant", "content": text}])
        return await run(request, ids, settings, max_tokens, stop, stop_ids, stream, usage,
                         chat=True, render_reply=render_reply)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        check_key(request)
        body = await read_json(request, limits.max_body_bytes)
        if _bool(body, "echo"):
            raise _bad("'echo' is not supported", "echo")
        settings, max_tokens, stop, stream, usage = parse_settings(body, limits)
        ids = parse_prompt(body, tokenizer)
        stop_ids = frozenset({tokenizer.eos_id, END_OF_TURN})
        return await run(request, ids, settings, max_tokens, stop, stop_ids, stream, usage,
                         chat=False)

    async def run(request, ids, settings, max_tokens, stop, stop_ids, stream, include_usage, chat,
                  render_reply=None):
        if len(ids) > limits.max_prompt_tokens:
            raise _bad(f"the prompt is {len(ids)} tokens; this server reads at most "
                       f"{limits.max_prompt_tokens} (rgemma serve --max-prompt-tokens)",
                       "messages" if chat else "prompt", "context_length_exceeded")
        if app.state.draining:
            raise APIError(503, "the server is shutting down", type="server_error",
                           code="unavailable")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):  # from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass

        req = Request(tuple(ids), settings, max_tokens, stop_strings=stop, stop_ids=stop_ids,
                      chat=chat, render_reply=render_reply)
        try:
            job = scheduler.submit(req, on_event)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except RgemmaError as e:
            raise _bad(str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        meta = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name,
                "system_fingerprint": f"rgemma-{settings.seed}"}

        def usage():
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.reply_tokens,
                    "total_tokens": job.prompt_tokens + job.reply_tokens,
                    "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

        def choice(text, finish, delta=None):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"delta": delta if delta is not None else ({"content": text} if text else {})} \
                if stream else {"message": {"role": "assistant", "content": text}}
            return {"index": 0, **body, "logprobs": None, "finish_reason": finish}

        if not stream:
            text = []
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), 1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel()
                            return JSONResponse({}, status_code=499)
                        continue
                    if kind == "text":
                        text.append(value)
                    elif kind == "error":
                        raise APIError(500, value, type="server_error")
                    else:
                        break
            finally:
                job.cancel()  # no-op once finished; frees the slot if the handler was cancelled
            if value == "cancelled":
                raise APIError(503, "the server is shutting down", type="server_error",
                               code="unavailable")
            return {**meta, "choices": [choice("".join(text), value)], "usage": usage()}

        chunk_meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}

        def sse(choices, **extra):
            obj = {**chunk_meta, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                obj["usage"] = None
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events_stream():
            try:
                if chat:
                    yield sse([choice("", None, {"role": "assistant", "content": ""})])
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield sse([choice(value, None)])
                    elif kind == "error":
                        err = {"message": value, "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        return
                    elif value == "cancelled":
                        return  # shutting down: end the stream without [DONE]
                    else:
                        yield sse([choice("", value)])
                        break
                if include_usage:
                    yield sse([], usage=usage())
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client went away (or we are done): free the slot

        return StreamingResponse(events_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# -- running it ----------------------------------------------------------------------------------

def serve(model_name: str, *, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
          state_cache_mb: float = 1024, state_cache_dir=None, state_cache_disk_mb: float = 8192,
          limits: Limits = Limits(), shutdown_grace: float = 5.0, sock=None, ready=None) -> int:
    """Load the model, serve until SIGTERM / Ctrl-C, then stop accepting, let running streams
    finish for up to `shutdown_grace` seconds (then cancel them), write the state cache to
    its directory and return 0. `sock` (a bound socket) and `ready` (called with the server
    once listening) are for tests."""
    import uvicorn

    from . import load
    from .state_cache import StateCache

    model, tokenizer = load(model_name)
    if tokenizer is None:
        raise RgemmaError(f"{model_name} has no tokenizer.model; the server needs it")
    cache = StateCache(int(state_cache_mb * 2**20), state_cache_dir, model=model,
                       tokenizer=tokenizer, model_name=model_name,
                       max_disk_bytes=int(state_cache_disk_mb * 2**20))
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue, cache=cache)
    app = create_app(scheduler, tokenizer, model_name=model_name, api_key=api_key, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_grace)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True
            scheduler.drain()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # exit 0 after a clean shutdown, not by the signal

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
                if sock is not None:
                    where = "http://%s:%d" % sock.getsockname()[:2]
                print(f"rgemma serve: {model_name} on {where}/v1 (max batch {max_batch}, state "
                      f"cache {state_cache_mb:g} MB{f' + {cache.directory}' if cache.directory else ''})",
                      file=sys.stderr, flush=True)
                if ready is not None:
                    ready(self)

    server = Server(config)
    scheduler.start()
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except SystemExit:
        pass
    finally:
        scheduler.stop()
        cache.close()
    if not server.started:
        raise RgemmaError(f"cannot listen on {host}:{port} (in use, or not an address of this "
                          f"machine)")
    if cache.directory is not None:
        print(f"rgemma serve: state cache written to {cache.directory}", file=sys.stderr)
    return 0


class Background:
    """`serve` on a free port of 127.0.0.1 in a thread of this process (tests, benchmarks,
    embedding): `.base` is its URL, `.health()` its /health, `.stop()` shuts it down as
    SIGTERM would and returns serve's exit status."""

    def __init__(self, model_name: str, timeout: float = 600, **kw):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.base = "http://127.0.0.1:%d" % sock.getsockname()[1]
        started = threading.Event()
        self._server, self._result = None, {}

        def ready(server):
            self._server = server
            started.set()

        def run():
            try:
                self._result["rc"] = serve(model_name, sock=sock, ready=ready, **kw)
            except BaseException as e:  # reported by the constructor or stop()
                self._result["error"] = e
                started.set()
        self._thread = threading.Thread(target=run, name="rgemma-serve", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or "error" in self._result:
            raise RgemmaError(f"the server did not start: {self._result.get('error', 'timeout')}")

    def health(self) -> dict:
        import httpx
        return httpx.get(self.base + "/health").json()

    def stop(self, timeout: float = 60) -> int | None:
        self._server.should_exit = True
        self._thread.join(timeout)
        return self._result.get("rc")
