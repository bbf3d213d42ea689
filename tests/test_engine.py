"""The batched decode step and the engine (issue 14): batch invariance bit for bit, across
weight formats and batch compositions, and `Engine` == `Session.generate` request by request."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rgemma_cli import linear as L
from rgemma_cli import formats as F
from rgemma_cli import quantize as Q
from rgemma_cli.engine import Engine, Request, request_from_json
from rgemma_cli.errors import RgemmaError
from rgemma_cli.generation import Session
from rgemma_cli.model import CHUNK, Griffin
from rgemma_cli.safetensors import f32_to_bf16
from rgemma_cli.sampling import SamplerSettings

from conftest import write_tiny_model

FORMATS = ["f32", "bf16", "int8", "q4"]


def stored(w: np.ndarray, fmt: str):
    """A float32 matrix in a stored format, as the loader holds it."""
    if fmt == "bf16":
        return f32_to_bf16(w)
    if fmt == "int8":
        return F.Int8Weight(*Q.quantize_int8(w))
    if fmt == "q4":
        return F.Int4Weight(*Q.quantize_int4(w))
    return np.ascontiguousarray(w, np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny64 model (widths in whole 4-bit groups) with its matrices in each format."""
    from rgemma_cli import load
    d = write_tiny_model(tmp_path_factory.mktemp("batch") / "tiny64-it", hidden_size=64,
                         intermediate_size=128, lru_width=64, head_dim=32, vocab_size=640)
    base, tok = load(str(d))
    out = {}
    for fmt in FORMATS:
        w = {}
        for name, a in base.weights.items():
            a = np.asarray(a, np.float32)
            if name == Q.EMBEDDING or any(name.endswith(p + ".weight") for p in Q.QUANTIZED_LAYERS):
                # fan-in scaling keeps activations O(1), so the tokens are not one repeated id
                a = a if name == Q.EMBEDDING else a / np.sqrt(a.shape[1])
                w[name] = stored(a, fmt)
            elif fmt == "bf16" and name.endswith("gate_weight"):
                w[name] = f32_to_bf16(a)
            else:
                w[name] = a
        out[fmt] = Griffin(base.config, w)
    return out, tok


def _states(model, lengths, rng):
    return [model.forward(rng.integers(0, model.config.vocab_size, n), None)[1] if n else
            model.initial_state() for n in lengths]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("fmt", FORMATS)
def test_batched_step_is_bit_identical_to_one_sequence(models, fmt, data):
    """A sequence's logits and state after a batched step equal its own one-token forward,
    whoever else is in the batch (up to 64 sequences, each at its own position: before,
    inside and past the attention window of 8)."""
    model = models[0][fmt]
    lengths = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=64))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    states = _states(model, lengths, rng)
    tokens = rng.integers(0, model.config.vocab_size, len(states))
    logits, new = model.forward_batch(tokens, [s.copy() for s in states], donate=True)
    for i in data.draw(st.sets(st.integers(0, len(states) - 1), min_size=1, max_size=4)):
        want, want_state = model.forward([tokens[i]], states[i], last_only=True)
        assert np.array_equal(logits[i], want[0]), (fmt, i, lengths)
        assert new[i] == want_state


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(37, 64), (9, 4160), (130, 256), (30, 7680)])  # 4160, 7680: wide inputs
def test_batched_linear_rows_equal_matvec(fmt, shape):
    rng = np.random.default_rng(sum(shape))
    w = stored(rng.standard_normal(shape).astype(np.float32), fmt)
    b = rng.standard_normal(shape[0]).astype(np.float32)
    x = rng.standard_normal((23, shape[1])).astype(np.float32) * rng.uniform(0.01, 100, (23, 1)).astype(np.float32)
    y = L.batched_linear(x, w, b)
    for i in range(len(x)):
        assert np.array_equal(y[i], L.matvec(w, x[i], b))
    assert np.array_equal(L.batched_linear(x[:1], w), L.matvec(w, x[0])[None])


def test_batched_block_diagonal_rows_equal_one_row():
    rng = np.random.default_rng(3)
    for w in (rng.standard_normal((4, 16, 16)).astype(np.float32),
              f32_to_bf16(rng.standard_normal((4, 16, 16)).astype(np.float32))):
        b = rng.standard_normal((4, 16)).astype(np.float32)
        x = rng.standard_normal((5, 64)).astype(np.float32)
        y = L.batched_block_diagonal(x, w, b)
        for i in range(5):
            assert np.array_equal(y[i], L.block_diagonal(x[i:i + 1], w, b)[0])


def test_forward_batch_refuses_bad_input(models):
    model = models[0]["f32"]
    with pytest.raises(RgemmaError):
        model.forward_batch([1, 2], [model.initial_state()])
    with pytest.raises(RgemmaError):
        model.forward_batch([10**6], [model.initial_state()])


# -- the engine == Session.generate ----------------------------------------------------------

def _alone(model, tok, req: Request):
    s = Session(model, tok, req.settings, mode="chat" if req.chat else "raw")
    g = s.generate(req.prompt_ids, req.max_tokens, stop_strings=req.stop_strings)
    text = "".join(g)
    return g.tokens, text, g.finish_reason, g.prompt_tokens


def _requests(tok, rng, n):
    out = []
    for i in range(n):
        chat = bool(rng.integers(2))
        words = " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "éé", "日本"],
                                    int(rng.integers(1, 12))))
        ids = tok.chat_prompt(words) if chat else tok.raw_prompt(words)
        greedy = i % 3 == 0
        s = SamplerSettings(temperature=0.0 if greedy else float(rng.uniform(0.5, 1.5)),
                            top_k=int(rng.integers(0, 50)), top_p=float(rng.uniform(0.5, 1)),
                            min_p=float(rng.uniform(0, 0.1)),
                            repeat_penalty=float(rng.choice([1.0, 1.3])), seed=int(rng.integers(1 << 40)))
        stops = tuple(rng.choice(["e", "at", "zz", ""], int(rng.integers(0, 3))))
        out.append(Request(ids, s, int(rng.integers(0, 16)), stops, chat=chat, id=i))
    return out


@pytest.mark.parametrize("fmt", ["f32", "q4"])
def test_engine_equals_generate_alone(models, fmt):
    """Sequences joining and leaving a batch of 3 get exactly the tokens, text, finish reason
    they get alone; one prompt is longer than a prefill chunk."""
    model, tok = models[0][fmt], models[1]
    rng = np.random.default_rng(7)
    reqs = _requests(tok, rng, 7)
    reqs.append(Request(tok.raw_prompt("the cat " * (CHUNK // 2 + 20)), SamplerSettings(seed=9), 6,
                        id="long"))
    engine = Engine(model, tok, max_batch=3)
    seqs = [engine.submit(r) for r in reqs]
    streamed = {id(s): "" for s in seqs}
    while engine.busy:
        for s, piece in engine.step():
            streamed[id(s)] += piece
    assert engine.tokens_decoded == sum(len(s.tokens) for s in seqs)
    for r, s in zip(reqs, seqs):
        tokens, text, reason, n_prompt = _alone(model, tok, r)
        assert (s.tokens, s.text, s.finish_reason, s.prompt_tokens) == (tokens, text, reason, n_prompt), r.id
        assert streamed[id(s)] == s.text


def test_engine_cancel_and_refusals(models):
    model, tok = models[0]["f32"], models[1]
    engine = Engine(model, tok, max_batch=2)
    a = engine.submit(Request(tok.raw_prompt("the cat"), SamplerSettings(seed=1), 50))
    b = engine.submit(Request(tok.raw_prompt("a mat"), SamplerSettings(seed=2), 4))
    engine.step()
    engine.cancel(a)
    while engine.busy:
        engine.step()
    assert a.finish_reason == "cancelled" and b.finish_reason in ("stop", "length")
    with pytest.raises(RgemmaError):
        engine.submit(Request([], SamplerSettings()))
    with pytest.raises(RgemmaError):
        engine.submit(Request([10**6], SamplerSettings()))
    with pytest.raises(RgemmaError):
        Engine(model, tok, max_batch=0)


@pytest.mark.parametrize("obj, message", [
    ({"prompt": "x", "temperature": -1}, '"temperature" must be'),
    ({"prompt": "x", "top_k": 1.5}, '"top_k" must be an integer'),
    ({"prompt": "x", "max_tokens": True}, '"max_tokens" must be an integer'),
    ({"prompt": "x", "stop": [1]}, '"stop" must be a string'),
    ({"prompt": "x", "messages": []}, "exactly one of"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"prompt": "  "}, "empty"),
    ({"prompt": "x", "tempreature": 1}, "unknown field"),
    ([1], "JSON object"),
])
def test_request_from_json_names_the_bad_field(models, obj, message):
    with pytest.raises(RgemmaError, match=message):
        request_from_json(obj, models[1], settings={}, max_tokens=5)


def test_messages_are_the_chat_template(models):
    """A [system, user] conversation is the ids `chat_prompt` (what `generate` feeds) gives."""
    tok = models[1]
    r = request_from_json({"messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "the cat"}]}, tok,
                          settings={}, max_tokens=5)
    assert r.prompt_ids == tok.chat_prompt("the cat", system="be brief") and r.chat
    r = request_from_json({"messages": [{"role": "user", "content": "the cat"}]}, tok,
                          settings={}, max_tokens=5, system="be brief")
    assert r.prompt_ids == tok.chat_prompt("the cat", system="be brief")
    for bad in ([], [{"role": "user"}], [{"role": "robot", "content": "x"}], "hi"):
        with pytest.raises(RgemmaError, match="messages"):
            request_from_json({"messages": bad}, tok, settings={}, max_tokens=5)
