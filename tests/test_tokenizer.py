"""Tokenizer: special ids, the chat template, and the streaming detokenizer."""

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from rgemma_cli.errors import RgemmaError
from rgemma_cli.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer

TOKENIZER = Path(__file__).parent / "fixtures/tokenizer/tokenizer.model"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


def stream(tok, ids):
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids]
    return pieces + [d.flush()]


def test_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.sp.piece_to_id("<start_of_turn>") == START_OF_TURN == 106
    assert tok.sp.piece_to_id("<end_of_turn>") == END_OF_TURN == 107
    assert len(tok.sha256) == 64


def test_round_trip_keeps_spaces_and_newlines(tok):
    for text in ["Hello world", " leading space", "two  spaces\n\nand\ttab", "Café 日本 🙂"]:
        assert tok.decode(tok.encode(text)) == text


def test_raw_prompt_has_exactly_one_bos(tok):
    ids = tok.raw_prompt("Hello")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.raw_prompt("Hello", bos=False) == tok.encode("Hello")


def test_chat_prompt_equals_whole_string_encoding(tok):
    # the markers are user-defined pieces here as in Gemma, so encoding the whole template text
    # must give the same ids as emitting 106/107 directly (docs/model.md#tokenizer-and-chat-template)
    ids = tok.chat_prompt("  What is 2+2?\n", system="Be brief.")
    text = "<start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    assert ids == [tok.bos_id] + tok.encode(text)
    assert ids.count(START_OF_TURN) == 2 and ids.count(END_OF_TURN) == 1


def test_second_turn_continues_after_pending_end_of_turn(tok):
    first = tok.chat_prompt("hi")
    reply = tok.encode("hello there") + [END_OF_TURN]
    second = tok.chat_prompt("again", system="ignored after the first turn", first=False)
    whole = ("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello there<end_of_turn>\n"
             "<start_of_turn>user\nagain<end_of_turn>\n<start_of_turn>model\n")
    assert first + reply + second == [tok.bos_id] + tok.encode(whole)
    cut = tok.chat_prompt("again", first=False, close_model_turn=True)
    assert cut == [END_OF_TURN] + second


@pytest.mark.parametrize("text", ["Hello world", "Café 日本 🙂 ok", "a\n\nb  c"])
def test_stream_matches_decode(tok, text):
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_stream_holds_back_partial_utf8(tok):
    ids = tok.encode("日")
    assert len(ids) == 3  # byte fallback: three byte pieces
    d = tok.detokenizer()
    assert [d.add(i) for i in ids] == ["", "", "日"]


def test_stream_skips_control_ids(tok):
    assert "".join(stream(tok, [tok.bos_id] + tok.encode("ok") + [tok.eos_id, tok.pad_id])) == "ok"


def test_a_control_id_ends_a_run_of_byte_pieces(tok):
    ids = [tok.sp.piece_to_id("<0xC2>"), tok.pad_id, tok.sp.piece_to_id("<0x80>")]  # C2 80 is U+0080
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "\ufffd\ufffd"


def test_ids_past_the_vocabulary_decode_to_nothing(tok):
    # a model whose embedding has more rows than the tokenizer has pieces can sample those ids
    ids = tok.encode("ok") + [tok.vocab_size + 5]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "ok"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 639), max_size=30))
def test_stream_equals_decode_for_any_ids(tok, ids):
    # invalid byte runs become U+FFFD; SentencePiece and Python may count those differently
    assert "".join(stream(tok, ids)).replace("\ufffd", "") == tok.decode(ids).replace("\ufffd", "")


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(RgemmaError, match="not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(RgemmaError, match="missing tokenizer"):
        Tokenizer(tmp_path / "nope.model")
