"""Train the tiny SentencePiece model the tests use: tests/fixtures/tokenizer/tokenizer.model.

It mimics the layout of the Gemma tokenizer where rgemma depends on it: `<pad>` 0, `<eos>` 1,
`<bos>` 2, `<unk>` 3, `<start_of_turn>` 106 and `<end_of_turn>` 107 as user-defined pieces,
"\\n" a piece of its own (108), byte fallback on, identity normalisation and no dummy prefix (so
spaces and newlines survive a round trip). The corpus is generated here, so the file is
reproducible: `python scripts/make_tokenizer.py [OUT]`.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 640
WORDS = """the a of and to in is was it that he she they we you for on with as at by this
from had not but be are his her their have were one all there which when who will would
what said so up out if about into than them then its only time could some other over
model user reply state token window recurrent gemma griffin laptop chat save resume
morning evening house garden letter sister brother mother father friend walk road river
happy quiet little great long small good old young first last never always often again
""".split()
SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
    " must be in want of a wife.",
    "Hello, how are you today?", "I am fine, thank you! And you?",
    "What is the capital of France?", "The capital of France is Paris.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 2048 3.14",
    "Café, naïve, résumé, déjà vu.",
    "Ünïcödé test: 日本語 中文 한국어 — “quotes” and emoji 🙂.",
]


def corpus(seed: int = 0, lines: int = 3000):
    """Deterministic pseudo-English lines plus a few fixed sentences."""
    rnd = random.Random(seed)
    for i in range(lines):
        n = rnd.randint(3, 14)
        words = [rnd.choice(WORDS) for _ in range(n)]
        line = " ".join(words).capitalize() + rnd.choice([".", ".", "?", "!", ","])
        if i % 7 == 0:
            line += "\n" + rnd.choice(SENTENCES)
        yield line
    yield from SENTENCES * 20


def train(out: Path) -> None:
    """Train and write the model file."""
    fillers = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(100)]  # ids 4..105
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(), model_writer=buf, vocab_size=VOCAB_SIZE, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=fillers + ["<start_of_turn>", "<end_of_turn>", "\n"],
        byte_fallback=True, character_coverage=0.995, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=100000,
        minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    want = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 106,
            "<end_of_turn>": 107, "\n": 108}
    got = {p: sp.piece_to_id(p) for p in want}
    if got != want:
        raise SystemExit(f"unexpected special ids: {got}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    print(f"wrote {out} ({out.stat().st_size} bytes, {sp.get_piece_size()} pieces)")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "tests/fixtures/tokenizer/tokenizer.model"
    train(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
