"""`rgemma batch`: a file of requests through the batching `Engine`, answers as JSON lines.

Answers come out in input order. With an output file, each answer is appended the moment it is
finished (so a Ctrl-C or a crash keeps every finished one), and the file is rewritten in input
order at the end, atomically; running again with the same file skips the requests it already
answers (a request is known by its "id", or by its line number when it has none).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .engine import Engine, request_from_json
from .errors import RgemmaError


def _error_line(key, message: str, kind: str = "invalid_request") -> str:
    return json.dumps({"id": key, "error": {"message": " ".join(message.split()), "type": kind}},
                      ensure_ascii=False)


def _answer_line(key, seq) -> str:
    if seq.finish_reason == "error":
        return _error_line(key, seq.error or "internal error", "server_error")
    return json.dumps({"id": key, "text": seq.text, "finish_reason": seq.finish_reason,
                       "prompt_tokens": seq.prompt_tokens,
                       "completion_tokens": seq.completion_tokens, "seed": seq.settings.seed},
                      ensure_ascii=False)


def _previous_answers(output: Path | None) -> tuple[dict, list[str], bool]:
    """({id key: line} of the answers already in `output`, all its well-formed lines, whether
    the file ends in a newline). Malformed lines (a write cut short) are dropped."""
    if output is None or not output.exists():
        return {}, [], True
    try:
        data = output.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise RgemmaError(f"cannot read {output}: {e.strerror}") from None
    answered, kept = {}, []
    for line in data.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict) or "id" not in obj:
            continue
        kept.append(line)
        if "error" not in obj:
            answered[json.dumps(obj["id"])] = line
    return answered, kept, data.endswith("\n") or not data


def _write_atomic(path: Path, lines: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run_batch(model, tokenizer, lines: list[str], output: Path | None, *, batch_size: int,
              settings: dict, max_tokens: int, stop=(), chat: bool = True,
              system: str | None = None, progress: bool = True) -> bool:
    """Answer every request line (blank lines are skipped); returns False if interrupted.

    `settings`, `max_tokens`, `stop`, `chat` and `system` are the defaults of `generate`'s flags
    (see `request_from_json`)."""
    answered, kept, ends_in_newline = _previous_answers(output)
    engine = Engine(model, tokenizer, max_batch=batch_size)
    results: dict[int, str] = {}  # request index -> its output line
    keys, seqs, seen = [], {}, set()
    skipped = 0
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        i = len(keys)
        try:
            obj = json.loads(text)
        except ValueError as e:
            keys.append(lineno)
            seen.add(json.dumps(lineno))  # its label is taken: a later "id" equal to it is a duplicate
            results[i] = _error_line(lineno, f"line {lineno} is not JSON: {e}")
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
        sink = open(output, "a", encoding="utf-8")
        if not ends_in_newline:
            sink.write("\n")
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
        _write_atomic(output, [results[i] for i in range(len(keys))] + extra)
    if progress:
        elapsed = time.perf_counter() - t0
        errors = sum('"error"' in line and "error" in json.loads(line) for line in results.values())
        print(f"{len(keys)} requests ({skipped} already answered, {errors} errors): "
              f"{engine.tokens_decoded} tokens in {elapsed:.1f} s, "
              f"{engine.tokens_decoded / elapsed if elapsed else 0:.1f} tok/s", file=sys.stderr)
    return True


def _progress(total: int, enabled: bool):
    """A started Rich progress bar on stderr (requests done, aggregate tok/s), or None."""
    if not enabled:
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
