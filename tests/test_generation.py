"""The generation loop: stopping rules, streaming, resumability and Ctrl-C consistency."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rgemma_cli.errors import RgemmaError
from rgemma_cli.generation import Session
from rgemma_cli.sampling import SamplerSettings
from rgemma_cli.tokenizer import END_OF_TURN, START_OF_TURN

GREEDY = SamplerSettings(temperature=0)
SAMPLED = SamplerSettings(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=1234)


class Rigged:
    """Wraps a model: forces token `force[pos]` after `pos` tokens were fed; can raise
    KeyboardInterrupt on the n-th forward call (as a Ctrl-C would), before the model runs or
    (`interrupt_after`) after it wrote the new state (in place, when the session donated it)."""

    def __init__(self, model, force=None, interrupt_at=None, interrupt_after=None):
        self.model, self.force, self.calls = model, force or {}, 0
        self.interrupt_at, self.interrupt_after = interrupt_at, interrupt_after
        self.config, self.fingerprint = model.config, model.fingerprint
        self.donated = 0

    def initial_state(self):
        return self.model.initial_state()

    def forward(self, ids, state, *, last_only=False, donate=False):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        logits, new = self.model.forward(ids, state, last_only=last_only, donate=donate)
        self.donated += donate
        if self.calls == self.interrupt_after:
            raise KeyboardInterrupt
        if new.pos in self.force:
            logits = logits.copy()
            logits[-1, self.force[new.pos]] = 100.0
        return logits, new


def run(session, prompt=(), n=16, **kw):
    g = session.generate(prompt, n, **kw)
    pieces = list(g)
    assert "".join(pieces) == g.text
    return g


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_two_halves_equal_one_run(tiny, settings):
    model, tok = tiny
    prompt = tok.raw_prompt("It is a truth")
    whole = run(Session(model, tok, settings), prompt, 32)
    s = Session(model, tok, settings)
    first = run(s, prompt, 16)
    second = run(s, (), 16)
    assert first.tokens + second.tokens == whole.tokens
    assert first.text + second.text == whole.text  # also when a character spans the split
    assert len(set(whole.tokens)) > 3  # the tiny model does not just repeat one token
    assert first.finish_reason == second.finish_reason == "length"


def test_text_is_the_decoded_tokens(tiny):
    model, tok = tiny
    g = run(Session(model, tok, SAMPLED), tok.raw_prompt("Hello"), 40)
    # random weights emit stray bytes; SentencePiece and Python count U+FFFD differently there
    assert g.text.replace("\ufffd", "") == tok.decode(g.tokens).replace("\ufffd", "")


def test_stops_on_eos_and_keeps_it_pending(tiny):
    model, tok = tiny
    prompt = tok.raw_prompt("Hi")
    s = Session(Rigged(model, {len(prompt) + 3: tok.eos_id}), tok, GREEDY)
    g = run(s, prompt, 20)
    assert g.finish_reason == "stop" and len(g.tokens) == 4 and g.tokens[-1] == tok.eos_id
    assert s.ctx.pending == (tok.eos_id,) and s.ctx.state.pos == len(prompt) + 3


def test_end_of_turn_stops_chat_but_not_raw(tiny):
    model, tok = tiny
    chat = Session(model, tok, GREEDY, mode="chat")
    prompt = chat.prompt_ids("hello")
    rigged = Rigged(model, {len(prompt) + 2: END_OF_TURN})
    chat.model = rigged
    g = run(chat, prompt, 20)
    assert g.finish_reason == "stop" and g.tokens[-1] == END_OF_TURN and "<end_of_turn>" not in g.text
    raw = Session(rigged, tok, GREEDY, mode="raw")
    g = run(raw, prompt, 6)
    assert g.finish_reason == "length" and END_OF_TURN in g.tokens


def test_next_chat_turn_feeds_pending_end_of_turn(tiny):
    model, tok = tiny
    s = Session(model, tok, GREEDY, mode="chat")
    first = s.prompt_ids("hello")
    s.model = Rigged(model, {len(first) + 2: END_OF_TURN})
    run(s, first, 20)
    second = s.prompt_ids("more")
    assert second[0] != END_OF_TURN and second[:len(tok.newline)] == tok.newline
    s.model = model
    cut = Session(model, tok, GREEDY, mode="chat")
    run(cut, cut.prompt_ids("hello"), 2)  # cut short: no <end_of_turn> yet
    assert cut.prompt_ids("more")[0] == END_OF_TURN


def test_stop_strings_are_not_printed(tiny):
    model, tok = tiny
    prompt = tok.raw_prompt("Hello")
    full = run(Session(model, tok, SAMPLED), prompt, 40).text
    stop = full[10:13]
    g = run(Session(model, tok, SAMPLED), prompt, 40, stop_strings=[stop])
    assert g.finish_reason == "stop"
    assert g.text == full[:full.index(stop)]


def test_max_tokens_zero_queues_the_prompt(tiny):
    model, tok = tiny
    prompt = tok.raw_prompt("Hello")
    s = Session(model, tok, GREEDY)
    g = run(s, prompt, 0)
    assert g.tokens == [] and g.finish_reason == "length" and s.ctx.pending == tuple(prompt)
    assert run(s, (), 8).tokens == run(Session(model, tok, GREEDY), prompt, 8).tokens


def test_nothing_to_continue(tiny):
    model, tok = tiny
    with pytest.raises(RgemmaError, match="give a prompt"):
        run(Session(model, tok, GREEDY), (), 5)
    with pytest.raises(RgemmaError, match="max-tokens"):
        Session(model, tok, GREEDY).generate(tok.raw_prompt("x"), -1)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_ctrl_c_leaves_a_consistent_context(tiny, settings):
    model, tok = tiny
    prompt = tok.raw_prompt("Once upon")
    whole = run(Session(model, tok, settings), prompt, 20)
    rigged = Rigged(model, interrupt_at=8)
    s = Session(rigged, tok, settings)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in s.generate(prompt, 20):
            shown.append(piece)
    # 7 steps completed; the context keeps exactly the sampled tokens whose text was shown
    # (a token still held back as part of an incomplete character is forgotten)
    k = s.ctx.tokens_seen - len(prompt)
    assert 0 < k <= 7
    assert s.ctx.pending == (whole.tokens[k - 1],)
    assert s.ctx.state.pos == len(prompt) + k - 1
    assert list(s.ctx.recent[-(k - 1):]) == whole.tokens[:k - 1] or k == 1
    rigged.interrupt_at = None
    rest = run(s, (), 20 - k)
    assert rest.tokens == whole.tokens[k:]  # continuing after Ctrl-C loses nothing
    assert "".join(shown) + rest.text == whole.text


@pytest.mark.parametrize("after", [5, 6, 7, 8, 9])
def test_ctrl_c_undoes_in_place_steps_since_the_last_shown_text(tiny, after):
    # Decoding writes keys into the state's ring in place; a Ctrl-C while a character's bytes
    # are still held back must still leave exactly the state of the tokens shown.
    model, tok = tiny
    ids = tok.encode("x 日本語")  # 日本語: three byte pieces each, held back until complete
    prompt = tok.raw_prompt("ab")
    force = {len(prompt) + i: t for i, t in enumerate(ids)}
    whole = run(Session(Rigged(model, force), tok, GREEDY), prompt, len(ids) + 4)
    rigged = Rigged(model, force, interrupt_after=after)
    s = Session(rigged, tok, GREEDY)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in s.generate(prompt, len(ids) + 4):
            pieces.append(piece)
    assert rigged.donated >= 2  # the steps ran in place
    c = s.ctx
    k = c.tokens_seen - len(prompt)  # sampled tokens kept
    assert tok.decode(whole.tokens[:k]) == "".join(pieces)
    _, expect = model.forward(prompt)  # the same steps as the session, without writing in place
    for t in whole.tokens[:k - 1]:
        _, expect = model.forward([t], expect)
    assert c.state == expect and c.pending == (whole.tokens[k - 1],)
    rigged.interrupt_after = None
    rest = run(s, (), len(ids) + 4 - k)
    assert whole.tokens == whole.tokens[:k] + rest.tokens


def test_a_context_read_while_text_is_held_back_survives_a_ctrl_c(tiny):
    # Read the context right after a step that wrote in place while a character is still held
    # back (the rollback point is older); a later Ctrl-C must not change what was handed out.
    model, tok = tiny
    ids = tok.encode("x 日本語")
    prompt = tok.raw_prompt("ab")
    force = {len(prompt) + i: t for i, t in enumerate(ids)}
    plain = Session(Rigged(model, force, interrupt_after=8), tok, GREEDY)
    with pytest.raises(KeyboardInterrupt):
        list(plain.generate(prompt, len(ids) + 4))
    rigged = Rigged(model, force, interrupt_after=8)
    s = Session(rigged, tok, GREEDY)
    seen = []
    real_step = s.decoder.step

    def step_and_look():
        token = real_step()
        if rigged.calls == 6:  # 本's first byte was just sampled, after an in-place step
            assert rigged.donated >= 4
            seen.append((s.ctx, s.ctx.state.copy()))
        return token

    s.decoder.step = step_and_look
    with pytest.raises(KeyboardInterrupt):
        list(s.generate(prompt, len(ids) + 4))
    assert s.ctx.state == plain.ctx.state  # the same rollback as without the look
    (c, snapshot), = seen
    assert c.state == snapshot  # and it touched nothing handed out


def test_a_context_read_from_outside_is_never_written(tiny):
    model, tok = tiny
    s = Session(model, tok, GREEDY)
    run(s, tok.raw_prompt("Once upon a time"), 3)
    kept = s.ctx  # e.g. a chat snapshot for /undo
    before = kept.state.copy()
    run(s, (), 12)  # more steps than the window (8): every ring slot is rewritten
    assert kept.state == before


def test_repeat_penalty_window_spans_the_prompt(tiny):
    model, tok = tiny
    prompt = tok.raw_prompt("the the the the")
    s = Session(model, tok, GREEDY.replace(repeat_penalty=1e6, repeat_last_n=64))
    g = run(s, prompt, 12)
    assert not set(g.tokens) & set(prompt)


def test_timings(tiny):
    model, tok = tiny
    g = run(Session(model, tok, GREEDY), tok.raw_prompt("Hello"), 5)
    assert g.prompt_tokens == len(tok.raw_prompt("Hello"))
    assert g.prompt_tps > 0 and g.gen_tps > 0


def test_character_split_across_calls(tiny):
    model, tok = tiny
    ids = tok.encode("ab 日本")  # 日 and 本 are three byte-fallback pieces each
    s = Session(Rigged(model, {3 + i: t for i, t in enumerate(ids)}), tok, GREEDY)
    texts = [run(s, tok.raw_prompt("ab"), 5).text]  # stops after the first byte of 日
    texts += [run(s, (), 1).text, run(s, (), len(ids) - 6).text]
    assert texts[0] == "ab " and "".join(texts) == "ab 日本"


# -- the model sees exactly the chat template (issue 10 item 2) ----------------------------------

class Scripted:
    """Wraps a model; remembers, for every state it returns, the ids fed to reach it (so a
    test can ask what a context's state has seen), and can force the n-th sampled token of a
    generation or raise KeyboardInterrupt at its n-th forward call."""

    def __init__(self, model):
        self.model, self.config, self.fingerprint = model, model.config, model.fingerprint
        self.card = getattr(model, "card", None)
        self.seen = {}  # id(state) -> (state, ids fed since the start)
        self.calls, self.force, self.interrupt_at = 0, {}, None

    def initial_state(self):
        s = self.model.initial_state()
        self.seen[id(s)] = (s, ())
        return s

    def forward(self, ids, state, *, last_only=False, donate=False):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        before = self.history(state)
        logits, new = self.model.forward(ids, state, last_only=last_only, donate=donate)
        self.seen[id(new)] = (new, before + tuple(ids))
        if self.calls in self.force:
            logits = logits.copy()
            logits[-1, self.force[self.calls]] = 1e4
        return logits, new

    def history(self, state):
        kept, ids = self.seen[id(state)]
        assert kept is state
        return ids

    def script(self, force=None, interrupt_at=None):
        """Force tokens at / interrupt on the n-th forward call from now (1 = the prefill)."""
        self.calls, self.force, self.interrupt_at = 0, dict(force or {}), interrupt_at


TEXTS = st.sampled_from(["hi", "Tell me more", " x ", "a<end_of_turn>\n<start_of_turn>model\nb",
                         "<eos>?", "日本", "\n\nok"])
ENDINGS = st.sampled_from([END_OF_TURN, 106, 1, "length", "interrupt", "stop string"])
OPS = st.lists(st.tuples(st.sampled_from(["send", "send", "send", "resume", "undo", "regen",
                                          "reload", "read"]), TEXTS, ENDINGS,
                         st.integers(1, 5)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(OPS, st.integers(0, 2**32))
def test_fed_ids_are_the_transcript_in_the_chat_template(tiny, tmp_path_factory, ops, seed):
    from rgemma_cli import statefile
    model, tok = tiny
    m = Scripted(model)
    s = Session(m, tok, SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed),
                mode="chat")
    undo = []  # (context, transcript length, text) before each message, as the chat keeps them

    def check():
        c = s.ctx
        fed = m.history(c.state)
        want = tok.apply_chat_template(s.transcript, continue_final_message=not s.finished
                                       ) if s.transcript else []
        assert list(fed) + list(c.pending) == want, (s.transcript, fed, c.pending)
        assert tok.special_ids.isdisjoint(
            w for w in want if w not in (tok.bos_id, START_OF_TURN, END_OF_TURN))

    def reply(text, ending, n):
        force = {n: ending} if isinstance(ending, int) else {}
        m.script(force, interrupt_at=n if ending == "interrupt" else None)
        g = s.send(text, 5, stop_strings=["e"] if ending == "stop string" else ())
        try:
            list(g)
        except KeyboardInterrupt:
            pass

    for op, text, ending, n in ops:
        if op in ("send", "regen") or (op == "read" and not s.fresh and not s.finished):
            if op == "regen" and undo:
                ctx, k, text = undo.pop()
                s.restore(ctx, k)
            undo.append((s.ctx, len(s.transcript), text))
            reply(text, ending, n)
        elif op == "read":
            s.read(text)
        elif op == "resume":
            m.script({n: ending} if isinstance(ending, int) else {})
            if s.fresh or (s.finished and s.transcript[-1]["role"] == "model"):
                with pytest.raises(RgemmaError, match="nothing to continue"):
                    s.resume(5)
            else:
                list(s.resume(5))
        elif op == "undo" and undo:
            ctx, k, _ = undo.pop()
            s.restore(ctx, k)
        elif op == "reload" and not s.fresh:
            path = tmp_path_factory.mktemp("s") / "s.rgs"
            statefile.save(path, s)
            old = s.ctx.state
            s = statefile.restore(statefile.load(path), m, tok)
            m.seen[id(s.ctx.state)] = (s.ctx.state, m.history(old))
            assert s.ctx.state == old
        check()


def test_raw_mode_stops_at_every_eos_id_of_the_model():
    from rgemma_cli import load
    model, tok = load("demo")
    assert model.card.eos_ids == (1, 107)
    for stop in (1, 107):
        prompt = tok.raw_prompt("Once upon a time")
        rigged = Rigged(model, {len(prompt) + 2: stop})
        rigged.card = model.card
        g = run(Session(rigged, tok, GREEDY, mode="raw"), prompt, 20)
        assert g.finish_reason == "stop" and g.tokens[-1] == stop and len(g.tokens) == 3


def test_eos_ends_a_chat_reply_and_never_goes_in_front_of_the_next_turn(tiny):
    model, tok = tiny
    for stop in (tok.eos_id, START_OF_TURN, END_OF_TURN):
        s = Session(model, tok, GREEDY, mode="chat")
        first = s.prompt_ids("hello")
        s.model = Rigged(model, {len(first) + 2: stop})
        g = s.send("hello", 20)
        assert "".join(g) == g.text and g.finish_reason == "stop" and s.finished
        s.model = model
        nxt = s.prompt_ids("more")
        assert nxt[0] == START_OF_TURN and tok.eos_id not in nxt
        assert list(s.ctx.recent + s.ctx.pending)[-2:] == [END_OF_TURN] + tok.newline


# -- a long generation stays flat (issue 11, item 7) ---------------------------------------------

class _Stub:
    """A stand-in model (microseconds per token): what could grow with a run is the loop's, not
    the model's (its state is fixed in size)."""

    def __init__(self, model):
        self.config, self.fingerprint, self.vocab = model.config, model.fingerprint, model.config.vocab_size

    def initial_state(self):
        from rgemma_cli.state import State
        return State(0, ())

    def forward(self, ids, state, *, last_only=False, donate=False):
        from rgemma_cli.state import State
        row = np.sin(np.arange(self.vocab, dtype=np.float32) * np.float32(0.37 * (ids[-1] + 1))) * 4
        return row[None, :], State(state.pos + len(ids), ())


def test_long_generation_without_keep_holds_nothing_that_grows(tiny):
    """`rgemma generate` without --json / --save-state (keep=False) keeps no ids, no text and
    no transcript reply: measured with tracemalloc once the repeat-penalty history (4096 ids)
    is full, memory does not grow with the tokens generated (it grew ~74 bytes per token)."""
    import tracemalloc
    model, tok = tiny
    s = Session(_Stub(model), tok, SamplerSettings(temperature=1.0, seed=0), mode="raw")
    g = s.generate(s.user_turn("Once"), 7000, stop_ids=(), keep=False)  # as `send` does
    it = iter(g)
    tracemalloc.start()  # from the start: the ids leaving the history were traced too
    while g.generated < 4500:
        next(it)
    before = tracemalloc.get_traced_memory()[0]
    for _ in it:
        pass
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert g.finish_reason == "length" and g.generated == 7000, (g.finish_reason, g.generated)
    assert g.tokens == [] and g.text == "" and g.chars > 0
    assert s.transcript[-1]["content"] == ""  # raw mode: the reply is not recorded
    assert grown < 16_000, grown  # ~0 per token over 2500 tokens (keeping them: ~74 per token)


def test_keep_changes_nothing_but_what_is_kept(tiny):
    model, tok = tiny
    runs = []
    for keep in (True, False):
        s = Session(model, tok, SamplerSettings(temperature=1.0, seed=3), mode="raw")
        g = s.generate(s.user_turn("Once"), 300, stop_ids=(), keep=keep)
        runs.append((g, list(g), s))
    (g, pieces, s), (g2, pieces2, s2) = runs
    assert pieces == pieces2 and g.generated == g2.generated == 300  # keep changes no output
    assert s.ctx.state.pos == s2.ctx.state.pos and s.ctx.pending == s2.ctx.pending
    assert g.chars == g2.chars == len("".join(pieces)) and g.last_newline == g2.last_newline
    assert g.text == "".join(pieces) and s.transcript[-1]["content"] == g.text
    assert len(g.tokens) == 300 and g2.tokens == [] and g2.text == ""
