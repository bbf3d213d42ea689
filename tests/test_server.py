"""`rgemma serve` through real clients: the openai SDK, raw SSE over HTTP, simonw/llm; errors in
OpenAI's shape with the right status; a fuzzed body never kills the server; a bounded load test;
a client that leaves frees its place; SIGTERM writes the cache and exits 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rgemma_cli import server as srv

ROOT = Path(__file__).resolve().parent.parent
# waits on the server scale with this (scripts/check_arm64.sh runs the suite under emulation)
SLOW = float(os.environ.get("RGEMMA_TEST_TIMEOUT_SCALE", "1"))
MODEL = "demo"


def Running(**kw):
    return srv.Background(MODEL, **kw)


@pytest.fixture(scope="module")
def live():
    s = Running(max_batch=8, limits=srv.Limits(max_tokens=64, max_prompt_tokens=400,
                                               max_body_bytes=20_000))
    yield s
    assert s.stop() == 0


def post(live, path, body, **kw):
    return httpx.post(live.base + path, json=body, timeout=60 * SLOW, **kw)


def openai_client(live, key="none"):
    import openai
    return openai.OpenAI(base_url=live.base + "/v1", api_key=key, max_retries=0, timeout=60 * SLOW)


def sse_events(response):
    """The data payloads of a server-sent-event stream, parsed as curl users do."""
    out = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        out.append(line[len("data: "):])
    return out


# -- real clients --------------------------------------------------------------------------------

def test_openai_sdk_chat_and_completions_streaming_and_not(live):
    client = openai_client(live)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! Who are you?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=5,
                                       temperature=0.8)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant" and text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=5,
                                            temperature=0.8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason

    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert c.object == "text_completion" and c.choices[0].text and c.usage.completion_tokens == 10
    assert c.choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == c.choices[0].text
    assert [m.id for m in client.models.list()] == [MODEL]


def test_raw_sse_stream_is_openais_format(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}, "seed": 1}
    with httpx.stream("POST", live.base + "/v1/chat/completions", json=body, timeout=60 * SLOW) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert len({o["id"] for o in objs}) == 1 and all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-2]["choices"][0]["finish_reason"] == "length" and objs[-2]["choices"][0]["delta"] == {}
    assert all(o["usage"] is None for o in objs[:-1]) and objs[-1]["choices"] == []
    assert objs[-1]["usage"]["completion_tokens"] == 8
    # without stream_options there is no usage at all
    body.pop("stream_options")
    with httpx.stream("POST", live.base + "/v1/chat/completions", json=body, timeout=60 * SLOW) as r:
        objs = [json.loads(e) for e in sse_events(r)[:-1]]
    assert all("usage" not in o for o in objs) and objs[-1]["choices"][0]["finish_reason"]


def test_a_growing_conversation_reports_cached_tokens(live):
    client = openai_client(live)
    msgs = [{"role": "user", "content": "Hi, what do you like to do?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And what else?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert cached < r2.usage.prompt_tokens


def test_simonw_llm_as_an_openai_compatible_model(live, tmp_path):
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: rgemma-demo\n  model_name: {MODEL}\n  api_base: \"{live.base}/v1\"\n")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    llm = [str(Path(sys.executable).parent / "llm")]
    p = subprocess.run(llm + ["-m", "rgemma-demo", "-o", "max_tokens", "8", "-o", "temperature",
                              "0", "Hello there"], env=env, capture_output=True, text=True,
                       timeout=120 * SLOW)  # streamed
    assert p.returncode == 0 and p.stdout.strip(), p.stderr
    # a follow-up (-c) resends the conversation: the server reads only the new turn
    p = subprocess.run(llm + ["-c", "--no-stream", "-o", "max_tokens", "4", "And then?"], env=env,
                       capture_output=True, text=True, timeout=120 * SLOW)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr
    assert live.health()["state_cache"]["hits"] >= 1


# -- errors --------------------------------------------------------------------------------------

def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and "Traceback" not in r.text
    for w in words:
        assert w in err["message"], err["message"]
    return err


@pytest.mark.parametrize("body, words", [
    (b"{", ["not valid JSON"]),
    (b"[1]", ["JSON object"]),
    (b'{"messages": []}', ["messages"]),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', ["role"]),
    (b'{"messages": [{"role": "user", "content": 5}]}', ["content"]),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', ["text parts"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', ["temperature"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', ["max_tokens", "64"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', ["max_tokens"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', ["top_p"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', ["'n'"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', ["stop"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', ["stream"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1.5}', ["seed"]),
    (b'{"messages": [{"role": "user", "content": "' + b"word " * 600 + b'"}]}', ["400"]),
    # a JSON escape of half a surrogate pair is valid JSON but not a character: the message
    # names it (it once said "not valid UTF-8 (byte 0x00)")
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', ["lone surrogate U+D800"]),
    # a field of an unexpected JSON type is the client's error (these were 500s: an unhashable
    # role, an integer too large for math.isfinite)
    (b'{"messages": [{"role": ["user"], "content": "x"}]}', ["messages[0].role"]),
    (b'{"messages": [{"role": {"a": 1}, "content": "x"}]}', ["messages[0].role"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1' + b"0" * 400 + b"}",
     ["temperature"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "min_p": -1' + b"0" * 400 + b"}",
     ["min_p"]),
])
def test_bad_chat_requests_are_400_with_a_clear_message(live, body, words):
    assert_error(httpx.post(live.base + "/v1/chat/completions", content=body), 400, *words)


@pytest.mark.parametrize("body, words", [
    (b'{"prompt": "hi \\ud800", "max_tokens": 2}', ["lone surrogate U+D800"]),
    (b'{"prompt": "hi \\ud800", "max_tokens": 2, "stream": true}', ["lone surrogate U+D800"]),
    (b'{"prompt": ["\\udfff"], "max_tokens": 2}', ["lone surrogate U+DFFF"]),
    (b'{"prompt": "hi", "top_p": 1' + b"0" * 400 + b"}", ["top_p"]),
    (b'{"prompt": "hi", "echo": [1]}', ["echo"]),
    (b'{"prompt": {"text": "hi"}}', ["prompt"]),
])
def test_bad_completion_requests_are_400_before_any_stream(live, body, words):
    assert_error(httpx.post(live.base + "/v1/completions", content=body), 400, *words)


def test_limits_unknown_urls_and_methods(live):
    assert_error(httpx.post(live.base + "/v1/completions", content=b"x" * 30_000), 413, "too large")
    assert_error(post(live, "/v1/completions", {"prompt": 3}), 400, "prompt")
    assert_error(post(live, "/v1/completions", {"prompt": [1, 99999]}), 400, "token ids")
    assert assert_error(httpx.get(live.base + "/v1/nothing"), 404)["code"] == "unknown_url"
    assert_error(httpx.get(live.base + "/v1/chat/completions"), 405)


# A reply that cannot end by itself while a test holds it open: seeded, raw, near-uniform sampling
# runs all 5000 tokens on the demo (`rgemma generate -m demo --raw --seed 4 --temperature 50
# -n 5000 "Go on and on."` ends by length). A short chat reply (31 tokens) was over before the
# client read its second event on a quiet machine, and the test saw nothing running.
LONG = {"prompt": "Go on and on.", "max_tokens": 5000, "stream": True, "seed": 4, "temperature": 50}


def test_api_key_and_a_full_queue():
    s = Running(api_key="sekret", max_batch=1, max_queue=0, limits=srv.Limits(max_tokens=5000))
    try:
        body = LONG
        assert_error(httpx.post(s.base + "/v1/completions", json=body), 401, "API key")
        assert_error(httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert httpx.get(s.base + "/health").status_code == 200  # no key needed
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.get(s.base + "/v1/models", headers=auth).status_code == 200
        with httpx.stream("POST", s.base + "/v1/completions", json=body, headers=auth,
                          timeout=60 * SLOW) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # (kept: a dropped line iterator closes the connection)
            next(lines)  # the one place is taken and the queue holds none
            r2 = httpx.post(s.base + "/v1/completions", json=body, headers=auth)
            err = assert_error(r2, 429, "busy")
            assert r2.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
    finally:
        s.stop()


# leaves include lone surrogates (valid JSON escapes, not text) and integers no float holds
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                    | st.sampled_from(["hi \ud800", "\udfff", 10**400, -10**400]),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={
    "messages": st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", 3]) | JSON,
        "content": JSON}), max_size=3) | JSON,
    "prompt": JSON, "max_tokens": st.integers(-2, 3) | JSON, "temperature": JSON, "top_p": JSON,
    "top_k": JSON, "min_p": JSON, "seed": JSON, "stop": JSON, "stream": st.booleans() | JSON,
    "stream_options": JSON, "repeat_penalty": JSON, "n": JSON, "model": JSON})


@pytest.fixture(scope="module")
def small():
    """A server whose replies are at most 2 tokens: fuzzed bodies that are valid stay cheap."""
    s = Running(limits=srv.Limits(max_tokens=2, max_body_bytes=5000))
    yield s
    s.stop()


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=FIELDS | JSON, raw=st.none() | st.binary(max_size=60))
def test_fuzzed_bodies_get_openai_errors_or_answers_never_a_traceback(small, path, body, raw):
    content = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
    r = httpx.post(small.base + path, content=content, timeout=60 * SLOW)
    assert r.status_code in (200, 400, 413), r.text
    assert "Traceback" not in r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) >= {"message", "type"}
    assert httpx.get(small.base + "/health").status_code == 200


# -- load, disconnects, shutdown -----------------------------------------------------------------

def test_load_16_concurrent_streaming_clients(live):
    """A bounded load test: 16 clients, 32 streamed requests in all, every one completes."""
    requests, max_tokens = 32, 6
    client = openai_client(live)

    def one(i):
        s = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me about day {i}."}],
            max_tokens=max_tokens, seed=i, stream=True, stream_options={"include_usage": True})
        chunks = list(s)
        return chunks[-1].usage.completion_tokens, [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - t0
    assert len(results) == requests and all(f in ("stop", "length") and n > 0 for n, f in results)
    tokens = sum(n for n, _ in results)
    print(f"\nload: {requests} streamed requests from 16 clients, {tokens} tokens in {seconds:.1f} s, "
          f"{tokens / seconds:.1f} tok/s aggregate")


def test_a_client_that_leaves_mid_stream_frees_its_place():
    s = Running(max_batch=2, limits=srv.Limits(max_tokens=5000))
    try:
        with httpx.stream("POST", s.base + "/v1/completions", json=LONG, timeout=60 * SLOW) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
            assert s.health()["running"] == 1
            steps_at_close = s.health()["steps"]
        deadline = time.time() + 10 * SLOW
        while s.health()["running"] and time.time() < deadline:
            time.sleep(0.02)
        h = s.health()
        assert h["running"] == 0
        assert h["steps"] - steps_at_close < 1000  # it left long before its 5000 tokens
    finally:
        assert s.stop() == 0


def test_sigterm_stops_writes_the_cache_and_a_restart_knows_the_conversation(tmp_path):
    """The CLI as a user runs it: a turn, SIGTERM (exit 0, cache on disk), restart, next turn."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    base = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "rgemma"), "serve", "-m", MODEL, "--port", str(port),
           "--state-cache-dir", str(tmp_path)]

    def start():
        p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120 * SLOW
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    return p
            except httpx.TransportError:
                time.sleep(0.1)
        p.kill()
        raise AssertionError("server did not start")

    msgs = [{"role": "user", "content": "Hello, how was your day?"}]
    p = start()
    r1 = httpx.post(base + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 8,
                                                         "temperature": 0}, timeout=60 * SLOW).json()
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=60 * SLOW,
                      json={"messages": msgs, "max_tokens": 2000, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        p.send_signal(signal.SIGTERM)  # mid-stream: it is finished or cancelled, never hangs
        list(lines)
    assert p.wait(60) == 0, p.stderr.read()
    assert "Traceback" not in p.stderr.read()
    assert list(tmp_path.rglob("*.rgs"))
    p = start()
    try:
        msgs += [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Tell me more."}]
        r2 = httpx.post(base + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4},
                        timeout=60 * SLOW).json()
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= r1["usage"]["prompt_tokens"]
    finally:
        p.send_signal(signal.SIGINT)  # Ctrl-C: the same clean exit
        assert p.wait(60) == 0


def test_serve_without_the_extra_says_how_to_get_it(monkeypatch, capsys):
    from rgemma_cli.cli import main
    monkeypatch.setitem(sys.modules, "rgemma_cli.server", None)
    assert main(["serve", "-m", MODEL]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install 'rgemma-cli[serve]'" in err and "\n" not in err


def test_a_draining_server_answers_503(tiny):
    """After SIGTERM, a request that still reaches the app is told to go elsewhere."""
    from fastapi.testclient import TestClient

    from rgemma_cli.scheduler import Scheduler
    model, tok = tiny
    sched = Scheduler(model, tok)
    app = srv.create_app(sched, tok, model_name="tiny")
    sched.drain()
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert_error(r, 503, "shutting down")
        app.state.draining = True
        assert client.get("/health").status_code == 503
        assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 503)
