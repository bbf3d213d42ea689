"""Text <-> token ids: the SentencePiece model, the Gemma chat template and streaming decode.

The turn markers `<start_of_turn>` (106) and `<end_of_turn>` (107) are emitted as ids and only
the text between them is encoded, so a user typing "<end_of_turn>" cannot forge a turn boundary
through the template itself; exactly one BOS starts a sequence
(docs/model.md#tokenizer-and-chat-template).
"""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path

import sentencepiece as spm

from .errors import RgemmaError

START_OF_TURN = 106
END_OF_TURN = 107


class Tokenizer:
    """A SentencePiece `tokenizer.model` with Gemma's special ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise RgemmaError(f"missing tokenizer file {self.path}") from None
        except OSError as e:
            raise RgemmaError(f"cannot read tokenizer {self.path}: {e.strerror}") from None
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
        self.newline = self.encode("\n")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS (SentencePiece on the raw text, no dummy prefix added)."""
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids`; control ids (pad, bos, eos) and ids past the vocabulary (a model may
        pad its embedding) decode to nothing."""
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def raw_prompt(self, text: str, *, bos: bool = True) -> list[int]:
        """A plain-text prompt: BOS (when it starts a sequence) then the encoded text."""
        return ([self.bos_id] if bos else []) + self.encode(text)

    def chat_prompt(self, user: str, *, system: str | None = None, first: bool = True,
                    close_model_turn: bool = False) -> list[int]:
        """The ids that add one user turn and open the model's reply (docs/model.md#chat-template,
        docs/model.md#turns-on-a-kept-state).

        `first`: the conversation starts here (BOS, and `system` is folded into this turn, as
        Gemma has no system role). Otherwise the previous reply's `<end_of_turn>` is normally
        still pending (sampled, not fed) and the turn starts with "\\n"; `close_model_turn` adds
        the 107 when the reply was cut short (Ctrl-C, token limit) and never produced one.
        """
        text = user.strip()
        if first and system and system.strip():
            text = f"{system.strip()}\n\n{text}"
        ids = [self.bos_id] if first else []
        if not first:
            ids += ([END_OF_TURN] if close_model_turn else []) + self.newline
        ids += [START_OF_TURN] + self.encode("user\n" + text) + [END_OF_TURN] + self.newline
        ids += [START_OF_TURN] + self.encode("model\n")
        return ids

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

    def detokenizer(self) -> "StreamDecoder":
        """A fresh streaming decoder for generated ids."""
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text one at a time, never splitting a UTF-8 character.

    Works on pieces rather than re-decoding the whole sequence: "▁" becomes a space, byte-fallback
    pieces `<0xNN>` go through an incremental UTF-8 decoder that holds an incomplete character
    back until its last byte arrives; the concatenation of the pieces equals `Tokenizer.decode`.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text that token completes (possibly "")."""
        sp = self.tok.sp
        if not 0 <= token < self.tok.vocab_size:
            return ""
        if sp.is_control(token):  # ends a run of byte pieces, as in SentencePiece's decode
            return self._utf8.decode(b"", final=True)
        if sp.is_byte(token):
            return self._utf8.decode(bytes([int(sp.id_to_piece(token)[3:5], 16)]))
        text = " \u2047 " if sp.is_unknown(token) else sp.id_to_piece(token).replace("\u2581", " ")
        return self._utf8.decode(text.encode("utf-8"))

    @property
    def holding(self) -> bool:
        """True while the bytes of an incomplete character are held back."""
        return bool(self._utf8.getstate()[0])

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
