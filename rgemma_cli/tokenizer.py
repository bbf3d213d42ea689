"""Text <-> token ids: the SentencePiece model, the Gemma chat template and streaming decode.

Control tokens come only from the template. Gemma reserves the ids up to `<end_of_turn>` (107):
`<pad>` `<eos>` `<bos>` (SentencePiece control pieces) and `<mask>`, `<unusedN>`,
`<start_of_turn>`, `<end_of_turn>` (user-defined pieces, which SentencePiece would happily
produce from text). Text a person wrote is encoded so that it never yields one of those ids, and
decoding never prints one, unless `special=True` (llama.cpp's `--special`) asks for both.
The template: docs/model.md#tokenizer-and-chat-template.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import sentencepiece as spm

from .errors import RgemmaError, not_utf8
from .files import read_regular

START_OF_TURN = 106
END_OF_TURN = 107
REPLACEMENT = "\ufffd"


class Tokenizer:
    """A SentencePiece `tokenizer.model` with Gemma's special ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = read_regular(self.path, "tokenizer", limit=256 * 2**20,
                            missing=f"missing tokenizer file {self.path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(data)
        except (RuntimeError, OSError):
            raise RgemmaError(f"{self.path} is not a SentencePiece model") from None
        self.sha256 = hashlib.sha256(data).hexdigest()  # part of a state file's model identity
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        for name, want in (("<start_of_turn>", START_OF_TURN), ("<end_of_turn>", END_OF_TURN)):
            if self.sp.piece_to_id(name) != want:
                raise RgemmaError(f"{self.path}: {name} is not id {want}; not a Gemma tokenizer")
        self.bos_id = self.bos_id if self.bos_id >= 0 else 2
        self.eos_id = self.eos_id if self.eos_id >= 0 else 1
        sp = self.sp
        # The reserved block (every id up to <end_of_turn> but <unk>) and any control or unused
        # piece elsewhere: never from typed text, never printed.
        self.special_ids = frozenset(
            i for i in range(self.vocab_size)
            if (i <= END_OF_TURN and not sp.is_unknown(i) and not sp.is_byte(i))
            or sp.is_control(i) or sp.is_unused(i))
        self._control = frozenset(i for i in self.special_ids if sp.is_control(i) or sp.is_unused(i))
        if not self._control:
            raise RgemmaError(f"{self.path}: no control pieces (<pad>, <eos>, <bos>); not a Gemma tokenizer")
        self._silent = min(self._control)  # decodes to nothing
        # their spellings, longest first (so "<unused10>" wins over a "<unused1>" prefix)
        self._special_re = re.compile("|".join(
            re.escape(p) for p in sorted({sp.id_to_piece(i) for i in self.special_ids}, key=len,
                                         reverse=True)))
        self.newline = self.encode("\n")

    # -- text -> ids ----------------------------------------------------------------------------

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`, no BOS (SentencePiece on the raw text, no dummy prefix added).

        special=False (the default, for anything a person typed): the result holds no id of
        `special_ids`; "<end_of_turn>" in the text is the characters `<`, `end_of_turn>`.
        special=True: the spelling of a special piece ("<eos>", "<start_of_turn>") is that id.
        Raises RgemmaError when `text` holds lone surrogates (bytes that were not UTF-8, PEP 383,
        or a JSON "\\ud800" escape): `errors.not_utf8` says which.
        """
        problem = not_utf8(text)
        if problem:
            raise RgemmaError(f"text {problem}")
        if special:
            ids, at = [], 0
            for m in self._special_re.finditer(text):
                ids += self.sp.encode(text[at:m.start()]) + [self.sp.piece_to_id(m.group())]
                at = m.end()
            return ids + self.sp.encode(text[at:])
        ids = []
        while True:
            chunk = self.sp.encode(text)
            if self.special_ids.isdisjoint(chunk):
                return ids + chunk
            # SentencePiece matched a user-defined special piece: encode up to and including its
            # first character on its own, so the rest can no longer spell it, and go on.
            m = self._special_re.search(text)
            cut = m.start() + 1 if m else 1  # (no match: the normaliser made one; go char by char)
            ids += self.sp.encode(text[:cut]) if m else [i for i in self.sp.encode(text[:1])
                                                         if i not in self.special_ids]
            text = text[cut:]

    def raw_prompt(self, text: str, *, bos: bool = True, special: bool = False) -> list[int]:
        """A plain-text prompt: BOS (when it starts a sequence) then the encoded text."""
        return ([self.bos_id] if bos else []) + self.encode(text, special=special)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, special: bool = False) -> list[int]:
        """The ids of a conversation in Gemma's chat template (as Hugging Face's
        `apply_chat_template(..., tokenize=True)`; the Gemma template's format):

            <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n
            <start_of_turn>model\\n{reply}<end_of_turn>\\n ...

        `messages`: [{"role": "system" | "user" | "model" | "assistant", "content": str}]; a
        system message is folded into the next user turn (Gemma has no system role). Every
        turn is closed, except the last one with `continue_final_message`; with
        `add_generation_prompt` the model's turn is opened at the end. User and system text is
        stripped (as the template's `| trim`), a reply is kept as generated. The markers are
        ids; the text between them never encodes to a special id unless `special`.
        """
        _check_text(messages)
        ids, system = [self.bos_id], None
        for n, m in enumerate(messages):
            role, content = m.get("role"), str(m.get("content", ""))
            if role == "system":
                system = content.strip() or None
                continue
            if role == "user":
                content = content.strip()
                if system:
                    content, system = f"{system}\n\n{content}", None
            elif role in ("model", "assistant"):
                role = "model"
            else:
                raise RgemmaError(f"unknown chat role {role!r} (expected system, user or model)")
            ids += [START_OF_TURN] + self.encode(f"{role}\n{content}", special=special)
            if not (continue_final_message and n == len(messages) - 1):
                ids += [END_OF_TURN] + self.newline
        if add_generation_prompt:
            ids += self.generation_prompt()
        return ids

    def generation_prompt(self) -> list[int]:
        """`<start_of_turn>model\\n`: opens the model's turn."""
        return [START_OF_TURN] + self.encode("model\n")

    def chat_prompt(self, user: str, *, system: str | None = None, special: bool = False) -> list[int]:
        """The ids of a one-message conversation, ready for the reply."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        return self.apply_chat_template(msgs, add_generation_prompt=True, special=special)

    def chat_messages(self, messages) -> list[int]:
        """The ids of a whole conversation, OpenAI-style `[{"role", "content"}]` with roles
        system, user and assistant, rendered as `chat_prompt` and the model's own replies
        would have fed it: BOS, one `<start_of_turn>role\\n...<end_of_turn>\\n` per turn, then
        `<start_of_turn>model\\n` to open the reply. As in Gemma's template, system text is
        folded into the next user turn and content is stripped; consecutive messages of one
        role are joined by a blank line. A last assistant message is left open: the model
        continues it. An assistant turn is `encode("model\\n") + encode(content)`, exactly the
        ids a reply generated after `chat_prompt` sits on.
        """
        _check_text(messages)
        turns: list[list] = []  # [role, text]
        system: list[str] = []
        for m in messages:
            role, text = m["role"], m["content"].strip()
            if role == "system":
                system.append(text)
                continue
            if role == "user" and system:
                text = "\n\n".join(s for s in system + [text] if s)
                system = []
            if turns and turns[-1][0] == role:
                turns[-1][1] = "\n\n".join(t for t in (turns[-1][1], text) if t)
            else:
                turns.append([role, text])
        if system:  # only system text (or a system message last): it is the user's turn
            turns.append(["user", "\n\n".join(s for s in system if s)])
        ids = [self.bos_id]
        for i, (role, text) in enumerate(turns):
            if role == "user":
                ids += [START_OF_TURN] + self.encode("user\n" + text) + [END_OF_TURN] + self.newline
            else:
                ids += [START_OF_TURN] + self.encode("model\n") + self.encode(text)
                if i == len(turns) - 1:
                    return ids  # continue this reply
                ids += [END_OF_TURN] + self.newline
        return ids + [START_OF_TURN] + self.encode("model\n")

    # -- ids -> text ----------------------------------------------------------------------------

    def decode(self, ids, *, special: bool = False) -> str:
        """Text of `ids`, exactly as SentencePiece decodes them, except that special ids (and
        ids past the vocabulary: a model may pad its embedding) print nothing, as control pieces
        do; with `special` every special piece prints its spelling."""
        ids = [int(i) for i in ids]
        if not special:  # a hidden id acts as a control piece: it ends a byte run, prints nothing
            return self.sp.decode([i if 0 <= i < self.vocab_size and i not in self.special_ids
                                   else self._silent for i in ids])
        out, run = [], []
        for i in ids:  # SentencePiece skips control pieces: print them between the runs
            if 0 <= i < self.vocab_size and i not in self._control:
                run.append(i)
                continue
            out.append(self.sp.decode(run))
            run = []
            if 0 <= i < self.vocab_size:
                out.append(self.sp.id_to_piece(i))
        return "".join(out) + self.sp.decode(run)

    def detokenizer(self, *, special: bool = False) -> "StreamDecoder":
        """A fresh streaming decoder for generated ids."""
        return StreamDecoder(self, special=special)


class StreamDecoder:
    """Turns ids into text one at a time; the pieces joined equal `Tokenizer.decode` of all ids.

    A piece's text is SentencePiece's decode of it after the previous piece. Byte-fallback
    pieces `<0xNN>` are gathered into a run, as SentencePiece does, and a character is released
    once its bytes are complete; an invalid byte becomes one U+FFFD, as in SentencePiece's
    decoder (not Python's, which gives one U+FFFD per maximal invalid subpart). A run ends at
    any other piece (its incomplete tail then becomes U+FFFD per byte) or at `flush`.
    """

    def __init__(self, tok: Tokenizer, *, special: bool = False):
        self.tok, self.special = tok, special
        self._bytes = bytearray()  # the undecided tail of the current byte run
        self._prev: int | None = None  # the last piece with text, for SentencePiece's spacing

    def add(self, token: int) -> str:
        """The text that token completes (possibly "")."""
        tok, sp, token = self.tok, self.tok.sp, int(token)
        if not 0 <= token < tok.vocab_size:
            return self.flush()
        if token in tok.special_ids and not (self.special and token not in tok._control):
            return self.flush() + (sp.id_to_piece(token) if self.special else "")
        if sp.is_byte(token):
            self._bytes.append(int(sp.id_to_piece(token)[3:5], 16))
            self._prev = token
            return self._settle(final=False)
        text = self.flush()
        if self._prev is None:
            text += sp.decode([token])
        else:
            text += sp.decode([self._prev, token])[len(sp.decode([self._prev])):]
        self._prev = token
        return text

    @property
    def holding(self) -> bool:
        """True while the bytes of an incomplete character are held back."""
        return bool(self._bytes)

    def flush(self) -> str:
        """End the byte run: whatever is held back (each byte of an incomplete character becomes
        U+FFFD)."""
        return self._settle(final=True)

    def _settle(self, final: bool) -> str:
        b, out, i = self._bytes, [], 0
        while i < len(b):
            c = b[i]
            n = 1 if c < 0x80 else 2 if c >> 5 == 6 else 3 if c >> 4 == 14 else 4 if c >> 3 == 30 else 0
            if n and i + n > len(b) and not final and all(x >> 6 == 2 for x in b[i + 1:]):
                break  # may still become a character
            try:
                out.append(bytes(b[i:i + n]).decode("utf-8") if n and i + n <= len(b) else None)
            except UnicodeDecodeError:
                out.append(None)
            if out[-1] is None:
                out[-1], n = REPLACEMENT, 1
            i += n
        del b[:i]
        return "".join(out)


def _check_text(messages) -> None:
    """Refuse a message that is not UTF-8 text before it is stripped and put in the template,
    so that the character the error names is the one in what the person wrote."""
    for i, m in enumerate(messages):
        problem = not_utf8(str(m.get("content", "")))
        if problem:
            where = "text" if len(messages) == 1 else f"message {i + 1} ({m.get('role')})"
            raise RgemmaError(f"{where} {problem}")
