"""The cache of conversation states: longest proper prefix, LRU in bytes, aliases, disk."""

from rgemma_cli.state_cache import StateCache


def fed(model, ids):
    return model.forward(ids, model.initial_state())[1]


def test_lookup_finds_the_longest_proper_prefix(tiny):
    model, tok = tiny
    c = StateCache(1 << 20, model=model, tokenizer=tok)
    a, b = [2, 5, 6], [2, 5, 6, 7, 8]
    c.put(a, fed(model, a), a)
    c.put(b, fed(model, b), b)
    hit = c.lookup([2, 5, 6, 7, 8, 9])
    assert hit.length == 5 and hit.state == fed(model, b) and hit.recent == tuple(b)
    assert c.lookup([2, 5, 6, 7, 8]).length == 3  # a whole key leaves nothing to feed: shorter
    assert c.lookup([2, 5, 7, 1]) is None and c.lookup([3]) is None
    hit.state.layers[0].h[:] = 99  # a copy: the cached state is untouched
    assert c.lookup(b + [1]).state == fed(model, b)


def test_least_recently_used_goes_first_when_over_the_byte_bound(tiny):
    model, tok = tiny
    one = model.initial_state().nbytes
    c = StateCache(2 * one, model=model, tokenizer=tok)
    for k in ([2, 1], [2, 2], [2, 3]):
        c.put(k, fed(model, k), k)
        if k == [2, 2]:
            assert c.lookup([2, 1, 0])  # [2, 1] is now the most recent
    assert len(c) == 2 and c.nbytes <= 2 * one
    assert c.lookup([2, 1, 0]) and c.lookup([2, 3, 0]) and c.lookup([2, 2, 0]) is None


def test_an_alias_finds_the_same_state(tiny):
    model, tok = tiny
    c = StateCache(1 << 20, model=model, tokenizer=tok)
    c.put([2, 5, 6], fed(model, [2, 5, 6]), [2, 5, 6], aliases=[[2, 9]])
    hit = c.lookup([2, 9, 4])
    assert hit.length == 2 and hit.state == fed(model, [2, 5, 6])


def test_states_spill_to_disk_and_survive_a_restart(tiny, tmp_path):
    model, tok = tiny
    ids = list(range(2, 30))  # longer than the window (8): the rings wrapped
    c = StateCache(0, tmp_path, model=model, tokenizer=tok)  # nothing in memory: straight to disk
    c.put(ids, fed(model, ids), ids, aliases=[[2, 3]])
    c.close()
    files = list(tmp_path.rglob("*.rgs"))
    assert len(files) == 2
    again = StateCache(1 << 20, tmp_path, model=model, tokenizer=tok)  # a restarted server
    hit = again.lookup(ids + [40])
    assert hit.length == len(ids) and hit.state == fed(model, ids) and hit.recent == tuple(ids)
    assert again.lookup([2, 3, 4]).state == fed(model, ids)


def test_a_corrupt_file_is_a_miss_and_is_removed(tiny, tmp_path):
    model, tok = tiny
    c = StateCache(0, tmp_path, model=model, tokenizer=tok)
    c.put([2, 7], fed(model, [2, 7]), [2, 7])
    (f,) = tmp_path.rglob("*.rgs")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    again = StateCache(1 << 20, tmp_path, model=model, tokenizer=tok)
    assert again.lookup([2, 7, 1]) is None and not f.exists()


def test_another_models_files_are_not_seen(tiny, tiny_base_dir, tmp_path):
    from rgemma_cli import load
    model, tok = tiny
    StateCache(0, tmp_path, model=model, tokenizer=tok).put([2, 7], fed(model, [2, 7]), [2, 7])
    other, otok = load(str(tiny_base_dir))
    assert StateCache(1 << 20, tmp_path, model=other, tokenizer=otok).lookup([2, 7, 1]) is None


def test_the_disk_is_bounded_oldest_first(tiny, tmp_path):
    model, tok = tiny
    c = StateCache(0, tmp_path, model=model, tokenizer=tok, max_disk_bytes=1 << 40)
    c.put([2, 1], fed(model, [2, 1]), [2, 1])
    size = next(tmp_path.rglob("*.rgs")).stat().st_size
    c = StateCache(0, tmp_path, model=model, tokenizer=tok, max_disk_bytes=int(2.5 * size))
    for k in ([2, 2], [2, 3]):
        c.put(k, fed(model, k), k)
    assert len(list(tmp_path.rglob("*.rgs"))) == 2
    assert c.lookup([2, 1, 0]) is None and c.lookup([2, 3, 0]) is not None
