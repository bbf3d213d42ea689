"""The plain decode step (issue 12 item 3): a value in, a token and a value out; the Decoder
owns one stream and alone writes its rings in place."""

from rgemma_cli.decode import Context, Decoder, prefill, step
from rgemma_cli.sampling import SamplerSettings

SAMPLED = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)


def test_step_is_a_function_of_its_context(tiny):
    model, tok = tiny
    ctx = Context.start(model, 7)
    ctx = Context(ctx.state, (), tuple(tok.raw_prompt("Once upon")), ctx.rng)
    before = ctx.state.copy()
    a, ca = step(model, ctx, SAMPLED)
    b, cb = step(model, ctx, SAMPLED)
    assert a == b and ca.state == cb.state and ca.rng == cb.rng  # the RNG lives in the context
    assert ctx.state == before and ca.pending == (a,) and ca.state.pos == len(ctx.pending)
    d = Decoder(model, SAMPLED)
    d.feed(ctx.pending)
    assert d.step() == a and d.ctx.state == ca.state


def test_decoder_steps_equal_plain_steps_and_roll_back(tiny):
    model, tok = tiny
    d = Decoder(model, SAMPLED)
    d.feed(tok.raw_prompt("It is"))
    ctx, tokens = d.ctx, []
    for _ in range(12):  # more than the window (8): every ring slot is written in place
        t, ctx = step(model, ctx, SAMPLED)
        tokens.append(t)
    mark = None
    got = []
    for i in range(12):
        got.append(d.step())
        if i == 3:
            mark = d.commit() if d._undo is not None else d.mark()
    assert got == tokens and d.ctx.state == ctx.state
    d2 = Decoder(model, SAMPLED)
    d2.feed(tok.raw_prompt("It is"))
    for _ in range(4):
        d2.step()
    mark = d2.mark()
    kept = mark.state.copy()
    for _ in range(9):
        d2.step()  # writes into the marked state's rings
    d2.rollback(mark)
    assert d2.ctx.state == kept


def test_prefill_feeds_without_sampling(tiny):
    model, tok = tiny
    ids = tuple(tok.raw_prompt("Hello there"))
    ctx = Context.start(model, 1)
    read = prefill(model, Context(ctx.state, (), ids, ctx.rng))
    assert read.pending == () and read.recent == ids and read.rng == ctx.rng
    _, want = model.forward(list(ids))
    assert read.state == want
