"""`rgemma batch`: a file of requests through the batching `Engine`, answers as JSON lines.

Answers come out in input order. With an output file, each answer is appended the moment it is
finished (so a Ctrl-C or a crash keeps every finished one), and the file is rewritten in input
order at the end, atomically; running again with the same file skips the requests it already
answers (a request is known by its "id", or by its line number when it has none).

Both files are untrusted (docs/file-formats.md, "rgemma batch files"): the requests are read
from a regular file or stdin, at most MAX_BATCH_BYTES; the output must be a regular file (or a
link to one, whose target is written) that is empty or holds only answer lines of this command,
so a file that is something else (notes, a device, a FIFO) is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

from .engine import Engine, request_from_json
from .errors import RgemmaError
from .files import check_writable, kind_of, read_regular, read_stream, write_atomic
from .schema import parse_json, plural

MAX_BATCH_BYTES = 1 << 30  # a requests file or an output file read back to resume
_ANSWER_START = b'{"id": '  # how every line `_answer_line` / `_error_line` writes begins


def read_requests(path: str | Path) -> list[str]:
    """The lines of a UTF-8 requests file ('-': stdin), a regular file of at most
    MAX_BATCH_BYTES (a FIFO or /dev/zero is refused, not waited on or read forever).
    Raises RgemmaError (one line)."""
    if str(path) == "-":
        data = read_stream(sys.stdin.buffer, "stdin", MAX_BATCH_BYTES)
    else:
        data = read_regular(path, "requests file (JSONL)", limit=MAX_BATCH_BYTES,
                            missing=f"no such file: {path}")
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RgemmaError(f"{path} is not valid UTF-8 (byte {e.start})") from None


def check_output(output: str | Path) -> Path:
    """Refuse, before any work, an output `rgemma batch` must not write: not a regular file
    (see `files.check_writable`), or an existing file that is not this command's output. Returns
    the path to write (a symlink's target)."""
    path = check_writable(output, "batch output")
    _previous_answers(path)
    return path


def _dumps(obj) -> str:
    """One output line: UTF-8 as is, but a lone surrogate (a JSON \\ud800 escape in a request's
    "id") stays escaped, since no UTF-8 file or terminal can hold it; it reads back the same."""
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(obj)
    return line


def _error_line(key, message: str, kind: str = "invalid_request") -> str:
    return _dumps({"id": key, "error": {"message": " ".join(message.split()), "type": kind}})


def _answer_line(key, seq) -> str:
    if seq.finish_reason == "error":
        return _error_line(key, seq.error or "internal error", "server_error")
    return _dumps({"id": key, "text": seq.text, "finish_reason": seq.finish_reason,
                   "prompt_tokens": seq.prompt_tokens,
                   "completion_tokens": seq.completion_tokens, "seed": seq.settings.seed})


def _is_answer(obj) -> bool:
    """One of the lines this command writes: {"id", "text", "finish_reason", ...} or
    {"id", "error": {"message", "type"}}."""
    if not isinstance(obj, dict) or "id" not in obj:
        return False
    err = obj.get("error")
    if isinstance(err, dict):
        return isinstance(err.get("message"), str)
    return isinstance(obj.get("text"), str) and isinstance(obj.get("finish_reason"), str)


def _previous_answers(output: Path | None) -> tuple[dict, list[str], bool]:
    """({id key: line} of the answers already in `output`, all its answer lines, whether its
    tail is clean). A last line cut short (a crash mid-write: an answer's start, no newline) is
    dropped, and the tail is then not clean; any other line that is not an answer means the
    file is not ours: RgemmaError, and it is left alone."""
    if output is None or not output.exists():
        return {}, [], True
    data = read_regular(output, "batch output", limit=MAX_BATCH_BYTES)
    rows = data.split(b"\n")
    tail = rows.pop()  # b"" when the file ends in a newline
    answered, kept = {}, []
    if tail:
        rows.append(tail)
    for n, row in enumerate(rows, 1):
        if not row.strip():  # (`touch`ed or `echo >`ed: nothing to lose)
            continue
        try:
            obj = parse_json(row, "not JSON")
            line = row.decode("utf-8")
        except (RgemmaError, UnicodeDecodeError):
            obj = line = None
        if not _is_answer(obj):
            if tail and n == len(rows) and tail.startswith(_ANSWER_START):
                return answered, kept, False
            raise RgemmaError(f"{output} is not an output of rgemma batch (line {n} is not an "
                              f"answer object); refusing to overwrite it: choose another -o")
        kept.append(line)
        if "error" not in obj:
            answered[json.dumps(obj["id"])] = line
    return answered, kept, not tail


def _open_append(path: Path):
    """`path` opened to append, created 0o644 less the umask; a FIFO or device put there since
    `check_output` is refused (O_NONBLOCK: opening a FIFO without a reader fails, not waits)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0),
                     0o644)
    except OSError as e:
        raise RgemmaError(f"cannot save batch output to {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RgemmaError(f"cannot save batch output to {path}: it is a {kind_of(mode)}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "w", encoding="utf-8")


def _write_lines(path: Path, lines: list[str]) -> None:
    write_atomic(path, ["".join(line + "\n" for line in lines).encode("utf-8")])


def run_batch(model, tokenizer, lines: list[str], output: Path | None, *, batch_size: int,
              settings: dict, max_tokens: int, stop=(), chat: bool = True,
              system: str | None = None, progress: bool = True) -> bool:
    """Answer every request line (blank lines are skipped); returns False if interrupted.

    `settings`, `max_tokens`, `stop`, `chat` and `system` are the defaults of `generate`'s flags
    (see `request_from_json`). `output` is checked by `check_output` (RgemmaError)."""
    if output is not None:
        output = check_writable(output, "batch output")
    answered, kept, clean = _previous_answers(output)  # (refuses a file that is not ours)
    if not clean:  # drop a line cut short, so what is appended stays one answer per line
        _write_lines(output, kept)
    engine = Engine(model, tokenizer, max_batch=batch_size)
    results: dict[int, str] = {}  # request index -> its output line
    keys, seqs, seen = [], {}, set()
    skipped = 0
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        i = len(keys)
        try:  # (parse_json: deep nesting is an error line too, not a RecursionError)
            obj = parse_json(text, f"line {lineno} is not JSON")
        except RgemmaError as e:
            keys.append(lineno)
            seen.add(json.dumps(lineno))  # its label is taken: a later "id" equal to it is a duplicate
            results[i] = _error_line(lineno, str(e))
            continue
        key = obj["id"] if isinstance(obj, dict) and "id" in obj else lineno
        keys.append(key)
        k = json.dumps(key)
        if k in seen:
            results[i] = _error_line(key, f"line {lineno}: duplicate id {k}")
            continue
        seen.add(k)
        if k in answered:
            results[i], skipped = answered[k], skipped + 1
            continue
        try:
            request = request_from_json(obj, tokenizer, settings=settings, max_tokens=max_tokens,
                                        stop=stop, chat=chat, system=system)
            seq = engine.submit(request)
            if seq.done:  # max_tokens 0: nothing to run
                results[i] = _answer_line(key, seq)
            else:
                seqs[seq] = i
        except RgemmaError as e:
            results[i] = _error_line(key, f"line {lineno}: {e}")

    sink = None
    if output is not None:
        sink = _open_append(output)
    printed = 0  # stdout: requests printed so far, in order

    def emit(i: int) -> None:
        nonlocal printed
        if sink is not None:
            sink.write(results[i] + "\n")
            sink.flush()
        else:
            while printed in results:
                print(results[printed], flush=True)
                printed += 1

    for i in list(results):
        if sink is None or json.dumps(keys[i]) not in answered:
            emit(i)
    bar = _progress(len(keys), progress)
    t0 = time.perf_counter()
    try:
        while engine.busy:
            for seq, _ in engine.step():
                if seq.done and seq in seqs:
                    i = seqs.pop(seq)
                    results[i] = _answer_line(keys[i], seq)
                    emit(i)
            if bar is not None:
                elapsed = time.perf_counter() - t0
                bar.update(bar.task_ids[0], completed=len(results),
                           tps=f"{engine.tokens_decoded / elapsed if elapsed else 0:.1f}")
    except KeyboardInterrupt:
        if sink is None:  # whatever is finished, even out of order
            for i in sorted(results):
                if i >= printed:
                    print(results[i], flush=True)
        return False
    finally:
        if bar is not None:
            bar.stop()
        if sink is not None:
            sink.close()
    if output is not None:  # every answer is in: put them in input order
        mine = {json.dumps(keys[i]) for i in results}
        extra = [line for line in kept if json.dumps(json.loads(line)["id"]) not in mine]
        _write_lines(output, [results[i] for i in range(len(keys))] + extra)
    if progress:
        elapsed = time.perf_counter() - t0
        errors = sum('"error"' in line and "error" in json.loads(line) for line in results.values())
        print(f"{plural(len(keys), 'request')} ({skipped} already answered, {plural(errors, 'error')}): "
              f"{plural(engine.tokens_decoded, 'token')} in {elapsed:.1f} s, "
              f"{engine.tokens_decoded / elapsed if elapsed else 0:.1f} tok/s", file=sys.stderr)
    return True


def _progress(total: int, enabled: bool):
    """A started Rich progress bar on stderr (requests done, aggregate tok/s), or None. Only
    on a terminal: elsewhere Rich draws nothing but still leaves an empty line."""
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    bar = Progress(TextColumn("requests"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    bar.add_task("requests", total=total, tps="0.0")
    bar.start()
    return bar
