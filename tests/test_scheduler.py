"""Continuous batching: join/leave every step, chunked prompts, batch-independent output,
cancellation within one step, the state cache feeding only new tokens."""

import pytest

from rgemma_cli.generation import Session
from rgemma_cli.sampling import SamplerSettings
from rgemma_cli.scheduler import QueueFull, Request, Scheduler
from rgemma_cli.state_cache import StateCache
from rgemma_cli.tokenizer import END_OF_TURN


def run_all(sched, max_steps=2000):
    for _ in range(max_steps):
        if not (sched.waiting or sched.running):
            return
        sched.step()
    raise AssertionError("jobs did not finish")


def chat_request(tok, text, seed=1, max_tokens=12, **kw):
    ids = tok.chat_messages([{"role": "user", "content": text}])
    return Request(tuple(ids), SamplerSettings(temperature=0.9, seed=seed), max_tokens,
                   stop_ids=frozenset({tok.eos_id, END_OF_TURN}), **kw)


def submit(sched, req):
    events = []
    job = sched.submit(req, events.append)
    return job, events


def test_same_seeded_request_alone_and_among_eight_others_gives_the_same_text(tiny):
    model, tok = tiny
    req = chat_request(tok, "the same question", seed=7, max_tokens=16)
    alone = Scheduler(model, tok, max_batch=9, prefill_chunk=4)
    job, _ = submit(alone, req)
    run_all(alone)
    crowd = Scheduler(model, tok, max_batch=9, prefill_chunk=4)
    others = [submit(crowd, chat_request(tok, "other " * (i + 1), seed=i, max_tokens=5 + 3 * i))[0]
              for i in range(4)]
    crowd.step()  # the others are already running (and reading their prompts) when it joins
    again, _ = submit(crowd, req)
    others += [submit(crowd, chat_request(tok, f"later {i}", seed=100 + i))[0] for i in range(4)]
    run_all(crowd)
    assert job.tokens and again.tokens == job.tokens and again.text == job.text
    assert all(o.finish_reason in ("stop", "length") for o in others)


def test_output_equals_a_session_with_the_same_seed(tiny):
    """A seeded request gives what `rgemma generate --seed` gives for the same prompt."""
    model, tok = tiny
    req = chat_request(tok, "hello there", seed=3, max_tokens=10)
    sched = Scheduler(model, tok, prefill_chunk=5)
    job, events = submit(sched, req)
    run_all(sched)
    s = Session(model, tok, req.settings, mode="chat")
    g = s.generate(list(req.prompt_ids), 10, stop_ids=req.stop_ids)
    text = "".join(g)
    assert job.tokens == g.tokens and job.text == text
    assert "".join(v for k, v in events if k == "text") == text and events[-1][0] == "done"


def test_prompts_are_read_in_chunks_while_others_keep_decoding(tiny):
    model, tok = tiny
    sched = Scheduler(model, tok, max_batch=2, prefill_chunk=4)
    a, _ = submit(sched, Request(tuple(tok.raw_prompt("a")), SamplerSettings(seed=1), 50))
    sched.step()
    long_prompt = tuple(tok.raw_prompt("word " * 40))
    b, _ = submit(sched, Request(long_prompt, SamplerSettings(seed=2), 3))
    for _ in range(5):  # b reads 4 prompt tokens per step; a gets one token every step
        before = len(a.tokens)
        sched.step()
        assert len(a.tokens) == before + 1 and not b.tokens
    assert len(b.fed) == 20


def test_a_cancelled_job_leaves_the_batch_within_one_step(tiny):
    model, tok = tiny
    sched = Scheduler(model, tok, max_batch=1)
    a, events = submit(sched, Request(tuple(tok.raw_prompt("x")), SamplerSettings(seed=1), 500))
    b, _ = submit(sched, Request(tuple(tok.raw_prompt("y")), SamplerSettings(seed=2), 3))
    for _ in range(3):
        sched.step()
    assert sched.running == [a] and list(sched.waiting) == [b]
    a.cancel()
    sched.step()
    assert a not in sched.running and a.finish_reason == "cancelled" and events[-1] == ("done", "cancelled")
    assert sched.running == [b] and b.fed  # b took the place in that same step


def test_a_full_queue_is_refused(tiny):
    model, tok = tiny
    sched = Scheduler(model, tok, max_batch=1, max_queue=2)
    r = Request(tuple(tok.raw_prompt("x")), SamplerSettings(seed=1), 3)
    submit(sched, r), submit(sched, r), submit(sched, r)  # one place in the batch, two in the queue
    with pytest.raises(QueueFull):
        submit(sched, r)


def test_stop_strings_are_not_sent_and_end_with_stop(tiny):
    model, tok = tiny
    sched = Scheduler(model, tok)
    free, _ = submit(sched, Request(tuple(tok.raw_prompt("abc")), SamplerSettings(temperature=0), 30))
    run_all(sched)
    stop = free.text[5:8]
    assert len(stop) == 3
    job, _ = submit(sched, Request(tuple(tok.raw_prompt("abc")), SamplerSettings(temperature=0), 30,
                                   stop_strings=(stop,)))
    run_all(sched)
    assert job.finish_reason == "stop" and job.text == free.text[:free.text.index(stop)]


@pytest.fixture(scope="module")
def demo():
    from rgemma_cli import load
    return load("demo")


def test_a_growing_conversation_feeds_only_new_tokens_and_answers_the_same(demo):
    """(The demo model: its replies are text that tokenizes back to the ids it sampled, as a
    real model's do; a random model's byte soup does not.)"""
    model, tok = demo
    cache = StateCache(1 << 20, model=model, tokenizer=tok)
    with_cache = Scheduler(model, tok, cache=cache, prefill_chunk=8)
    without = Scheduler(model, tok, prefill_chunk=8)
    messages = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"question number {turn}"})
        ids = tuple(tok.chat_messages(messages))
        req = Request(ids, SamplerSettings(temperature=0), 8, stop_ids=frozenset({tok.eos_id, END_OF_TURN}),
                      render_reply=lambda text, m=list(messages): tok.chat_messages(
                          m + [{"role": "assistant", "content": text}]))
        a, _ = submit(with_cache, req)
        b, _ = submit(without, req)
        run_all(with_cache), run_all(without)
        assert a.tokens == b.tokens and b.cached_tokens == 0
        if turn:
            # everything up to the end of the previous reply came from the cache (a stop id
            # that ended it is sent back as the template's own end of turn): only the new turn
            # was read
            assert a.cached_tokens == len(prev) + prev_job.reply_tokens
        prev, prev_job = ids, a
        messages.append({"role": "assistant", "content": a.text})
    assert cache.hits == 3


def test_a_prompt_with_max_tokens_0_is_read_into_the_cache(demo):
    """Read a document once (max_tokens 0), then ask about it: only the question is read."""
    model, tok = demo
    cache = StateCache(1 << 20, model=model, tokenizer=tok)
    sched = Scheduler(model, tok, cache=cache, prefill_chunk=16)
    doc = [{"role": "user", "content": "a long document " * 20}]
    ids = tok.chat_messages(doc)
    job, events = submit(sched, Request(tuple(ids), SamplerSettings(seed=1), 0))
    run_all(sched)
    assert job.finish_reason == "length" and not job.tokens and events == [("done", "length")]
    ask = tuple(ids + [5, 6, 7])
    again, _ = submit(sched, Request(ask, SamplerSettings(seed=1), 2))
    run_all(sched)
    assert again.cached_tokens == len(ids)


def test_a_reply_cut_by_a_stop_string_still_saves_the_conversation(demo):
    """The client sends back only the text before the stop string, which the state read past:
    the next turn starts from the state at the end of the previous prompt instead, and reads
    the short reply and the new message, not the whole conversation."""
    model, tok = demo
    cache = StateCache(1 << 20, model=model, tokenizer=tok)
    sched = Scheduler(model, tok, cache=cache, prefill_chunk=16)
    messages = [{"role": "user", "content": "Tell me about the sea and the ships on it. " * 3}]
    ids = tuple(tok.chat_messages(messages))
    stops = frozenset({tok.eos_id, END_OF_TURN})
    free, _ = submit(sched, Request(ids, SamplerSettings(temperature=0), 24, stop_ids=stops))
    run_all(sched)
    stop = free.text[len(free.text) // 2:][:2]
    assert len(free.text) > 4 and len(stop) == 2
    cut, _ = submit(sched, Request(ids, SamplerSettings(temperature=0), 24, stop_ids=stops,
                                   stop_strings=(stop,)))
    run_all(sched)
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    messages += [{"role": "assistant", "content": cut.text}, {"role": "user", "content": "And?"}]
    nxt, _ = submit(sched, Request(tuple(tok.chat_messages(messages)), SamplerSettings(temperature=0),
                                   4, stop_ids=stops))
    run_all(sched)
    assert nxt.cached_tokens >= len(ids) and nxt.finish_reason in ("stop", "length")
