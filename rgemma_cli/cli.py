"""The `rgemma` command line: a thin layer over `load`, `Session` and state files.

stdout carries only generated text (or one JSON object with --json); everything else — stats,
progress, errors — goes to stderr. A user's mistake is one line `error: ...` and exit status 1
(2 for a malformed command line); Ctrl-C exits with 130.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import startup
from .errors import RgemmaError, not_utf8
from .sampling import SamplerSettings
from .schema import plural

DEFAULT_MODEL = "google/recurrentgemma-2b-it"
_D = SamplerSettings()  # the defaults shown in --help

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run RecurrentGemma (Griffin) on a laptop CPU: chat, generate, resumable state.")


def _show_version(value: bool) -> None:
    if value:
        from . import __version__
        print(f"rgemma {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False):
    """Run RecurrentGemma (Griffin) on a laptop CPU: chat, generate, resumable state."""


def _utf8(value, what: str):
    """A text argument must be valid UTF-8: the OS hands undecodable bytes to Python as lone
    surrogates (PEP 383), which no tokenizer can encode. Refuse them as a usage error."""
    for v in ([] if value is None else value if isinstance(value, list) else [value]):
        problem = not_utf8(v)
        if problem:
            raise typer.BadParameter(f"{problem}; pass UTF-8 text")
    return value

# -- options shared by `generate` and `chat` ----------------------------------------------------

Model = Annotated[Optional[str], typer.Option(
    "-m", "--model", envvar="RGEMMA_MODEL", show_envvar=True, metavar="MODEL",
    help=f"Local model directory, Hugging Face repo id, or 'demo'. [default: {DEFAULT_MODEL}; "
    f"for generate and chat with --resume, the model the state file names if it is found locally]",
    show_default=False)]
Temperature = Annotated[Optional[float], typer.Option(
    "-t", "--temperature", metavar="T", help=f"0 = greedy (argmax). [default: {_D.temperature}]",
    show_default=False)]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", metavar="K", help=f"Keep the k most likely tokens; 0 = off. [default: {_D.top_k}]",
    show_default=False)]
TopP = Annotated[Optional[float], typer.Option(
    "--top-p", metavar="P", help="Keep the smallest set of tokens whose probability reaches p, in "
    f"(0, 1]; 1 = off. [default: {_D.top_p}]", show_default=False)]
MinP = Annotated[Optional[float], typer.Option(
    "--min-p", metavar="P", help="Drop tokens less likely than min-p x the most likely one; "
    f"0 = off. [default: {_D.min_p}]", show_default=False)]
RepeatPenalty = Annotated[Optional[float], typer.Option(
    "--repeat-penalty", metavar="X",
    help=f"Penalise recently seen tokens; 1 = off. [default: {_D.repeat_penalty}]",
    show_default=False)]
RepeatLastN = Annotated[Optional[int], typer.Option(
    "--repeat-last-n", metavar="N",
    help=f"How many recent tokens the penalty looks at. [default: {_D.repeat_last_n}]",
    show_default=False)]
Seed = Annotated[Optional[int], typer.Option(
    "-s", "--seed", metavar="SEED", help="Random seed (omitted or -1: a random one, chosen and saved with the state).",
    show_default=False)]
System = Annotated[Optional[str], typer.Option(
    "--system", metavar="TEXT", help="System prompt (folded into the first user turn).", show_default=False,
    callback=lambda v: _utf8(v, "--system"))]
SaveState = Annotated[Optional[Path], typer.Option(
    "--save-state", metavar="PATH", help="Save the conversation state to PATH when done.",
    show_default=False)]
Resume = Annotated[Optional[Path], typer.Option(
    "--resume", metavar="PATH", help="Continue from a saved state file.", show_default=False)]
Stop = Annotated[Optional[list[str]], typer.Option(
    "--stop", metavar="TEXT", help="Stop when this text appears (not printed); repeatable.",
    show_default=False, callback=lambda v: _utf8(v, "--stop"))]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No stats or progress on stderr.")]
Special = Annotated[bool, typer.Option(
    "--special", help="Let text spell control tokens (<start_of_turn>, <eos>, ...) and print the "
    "control tokens the model generates; by default typed text never becomes one and none is "
    "printed.")]


def _sampler_overrides(max_tokens: int, **flags) -> dict:
    """The sampling flags the user actually gave (None means: from the state file or default),
    checked before any weights load."""
    if max_tokens < 0:
        raise RgemmaError(f"--max-tokens must be >= 0, got {max_tokens}")
    given = {k: v for k, v in flags.items() if v is not None}
    SamplerSettings(**given)
    return given


def _user_errors(fn):
    """Turn RgemmaError into one line on stderr and exit status 1; Ctrl-C into status 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        startup.started()  # the arguments are parsed: Ctrl-C now stops what the command does
        try:
            return fn(*args, **kwargs)
        except RgemmaError as e:
            _error(str(e))
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130)
    return wrapper


def _error(msg: str) -> None:
    # plain print, not Rich: a long message must stay one line, never wrapped
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)


# -- helpers ------------------------------------------------------------------------------------

def load_model(name: str, quiet: bool = False):
    """(model, tokenizer) for a model argument; a tokenizer is required to work with text."""
    from . import load
    from .checkpoint import resolve

    if not quiet and sys.stderr.isatty():
        from rich.console import Console
        with Console(stderr=True).status(f"loading {name}"):
            model, tok = load(name)
    else:
        model, tok = load(name)
    if tok is None:
        raise RgemmaError(f"no tokenizer.model in {resolve(name)}; rgemma needs it to read and "
                          f"write text")
    return model, tok


def model_of_state(saved, path: Path, quiet: bool = False) -> str:
    """The model a state file names, when it can be found locally (a directory, "demo", or a
    repo id in the Hugging Face cache); said on stderr. Else an RgemmaError asking for -m."""
    from .checkpoint import DEMO_DIR
    name = str(saved.model.get("name") or "")
    found = None
    if name == "demo" or (name and Path(name).expanduser().is_dir()):
        found = name
    elif name and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            from .checkpoint import NEEDED_FILES
            snapshot_download(name, allow_patterns=NEEDED_FILES, local_files_only=True)
            found = name
        except Exception:  # not a repo id, or not in the cache: never a download here
            found = None
    if found is None:
        raise RgemmaError(f"{path} was saved with model {name or '(unnamed)'}, which is not found "
                          f"locally; pass -m MODEL")
    if not quiet:
        shown = "demo" if Path(found).expanduser().resolve() == DEMO_DIR.resolve() else found
        print(f"using model {shown} (named by {path})", file=sys.stderr)
    return found


def start_session(model_name: str | None, resume: Path | None, chat: bool | None, overrides: dict,
                  quiet: bool = False, special: bool = False):
    """(Session, model name): restored from `resume` (flags given override its settings and
    mode) or a fresh one, in chat mode if the model is a chat model (`model.card`)."""
    from . import statefile
    from .generation import Session

    saved = statefile.load(resume) if resume else None  # fail on a bad file before loading weights
    if model_name is None:
        model_name = model_of_state(saved, resume, quiet) if saved else DEFAULT_MODEL
    model, tok = load_model(model_name, quiet)
    if saved is None:
        mode = "chat" if (chat if chat is not None else model.card.chat) else "raw"
        return Session(model, tok, SamplerSettings(**overrides), mode=mode, special=special), model_name
    statefile.check_model(saved, model, tok, resume)
    session = statefile.restore(saved, model, tok)
    session.settings = session.settings.replace(**overrides)
    session.special = special
    if chat is not None:
        session.mode = "chat" if chat else "raw"
    return session, model_name


def state_name(model_name: str) -> str:
    """The model name a state file records: a local directory as an absolute path, so that
    `--resume` finds it from anywhere."""
    if model_name != "demo" and Path(model_name).expanduser().is_dir():
        return str(Path(model_name).expanduser().resolve())
    return model_name


def save_state(path: Path | None, session, model_name: str, quiet: bool = False) -> None:
    """Save if asked; report the size on stderr."""
    if path is None:
        return
    from . import statefile
    size = statefile.save(path, session, name=state_name(model_name))
    if not quiet:
        _say(f"saved state to {path} ({size / 2**20:.2f} MiB, "
             f"{plural(session.ctx.tokens_seen, 'token')})")


def _check_save_path(path: Path | None) -> Path | None:
    """Refuse an impossible --save-state path before any work is done, not after: a directory,
    a FIFO or device, a directory that does not exist or cannot be written, a name too long, a
    file that is not a state file."""
    if path is None:
        return None
    from . import statefile
    return statefile.check_target(path)


def _read_prompt(prompt: str | None, allow_empty: bool) -> str:
    """Piped stdin, then the prompt argument after one space (simonw/llm's convention); stdin
    alone when the argument is omitted or '-'; from the terminal (until Ctrl-D) when there is
    neither and something is needed."""
    arg = "" if prompt in (None, "-") else prompt
    stdin = ""
    piped = sys.stdin is not None and not sys.stdin.isatty()
    if piped or (not arg.strip() and not allow_empty and sys.stdin is not None):
        if not piped:
            print("reading the prompt from the terminal; end it with Ctrl-D", file=sys.stderr)
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            stdin = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RgemmaError(f"stdin is not valid UTF-8 (byte {e.start}); pass UTF-8 text") from None
    text = " ".join(t for t in (stdin, arg) if t)
    if not text.strip():
        if not allow_empty:
            raise RgemmaError("empty prompt: pass PROMPT or pipe text on stdin")
        return ""
    return text


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _stats(g, seed: int | None = None) -> str:
    return (f"prompt: {plural(g.prompt_tokens, 'token')}, {g.prompt_tps:.1f} tok/s | "
            f"generated: {plural(g.generated, 'token')}, {g.gen_tps:.1f} tok/s | "
            + (f"seed: {seed} | " if seed is not None else "")
            + f"peak RSS: {_peak_rss() / 2**20:.0f} MiB")


def _shares_a_screen(broken: bool) -> bool:
    """Whether stderr lands where stdout's text does: a terminal (stdout piped through `cat` or
    `tee` most likely ends there too), or the very same pipe or file (`2>&1 | less`)."""
    try:
        if broken or sys.stderr.isatty():
            return True
        a, b = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    except (OSError, ValueError, AttributeError):
        return False


def _wait_for_the_reader(limit: float = 0.25) -> None:
    """stdout is a pipe to a reader (`| cat`) that prints to the terminal stderr writes to: wait
    (at most `limit` s) until the reader has taken every byte of the text, so that the stats
    line written straight to the terminal does not overtake the end of the text. Linux and
    macOS report a pipe's unread bytes through FIONREAD on either end."""
    import fcntl
    import stat
    import struct
    import termios
    import time
    try:
        if not (sys.stderr.isatty() and stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)):
            return
        end = time.monotonic() + limit
        while time.monotonic() < end:
            unread = struct.unpack("i", fcntl.ioctl(sys.stdout.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            if unread == 0:
                time.sleep(0.01)  # the reader has read the text; let it write it
                return
            time.sleep(0.005)
    except KeyboardInterrupt:  # the text is out: stop waiting, still print the stats and save
        startup.handled()
    except (OSError, ValueError, AttributeError):
        pass


def _say(line: str) -> None:
    """A status line on stderr; a closed stderr (`2>&1 | head`) is no reason to stop."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError, OSError):
        pass


# -- commands -----------------------------------------------------------------------------------

@app.command()
@_user_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(
        metavar="PROMPT", help="The prompt. Text piped on stdin comes first, then PROMPT after a "
        "space (`cat doc.txt | rgemma generate 'Summarize:'`); stdin alone when PROMPT is "
        "omitted or '-'.", show_default=False, callback=lambda v: _utf8(v, "PROMPT"))] = None,
    model: Model = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", metavar="N",
                                            help="Tokens to generate at most. 0: read the prompt "
                                            "into the state and generate nothing (with "
                                            "--save-state: read a document once, ask about it "
                                            "many times with --resume).")] = 512,
    temperature: Temperature = None, top_k: TopK = None, top_p: TopP = None, min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None, repeat_last_n: RepeatLastN = None, seed: Seed = None,
    stop: Stop = None,
    chat: Annotated[Optional[bool], typer.Option(
        "--chat/--raw", help="Wrap the prompt in the chat template, or not. [default: chat for "
        "chat models (see `rgemma info`), raw otherwise; a resumed state keeps its mode]",
        show_default=False)] = None,
    system: System = None, save_state_path: SaveState = None, resume: Resume = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, token ids, "
                                          "finish reason, timings) instead of the text.")] = False,
    special: Special = False,
    quiet: Quiet = False,
):
    """Generate text from a prompt (argument and/or stdin); only the text goes to stdout."""
    overrides = _sampler_overrides(max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repeat_penalty=repeat_penalty,
                                   repeat_last_n=repeat_last_n, seed=seed)
    _check_save_path(save_state_path)
    text = _read_prompt(prompt, allow_empty=resume is not None)
    session, model = start_session(model, resume, chat, overrides, quiet, special)
    if max_tokens == 0:  # read only: the state holds the prompt, nothing is generated
        if text:
            session.read(text, system)
        save_state(save_state_path, session, model, quiet)
        return
    # Keep the ids and text only where they are used (--json prints them, --save-state records
    # the reply), so a long run printing as it goes stays flat in memory and time (issue 11.7)
    keep = as_json or save_state_path is not None
    if text:
        g = session.send(text, max_tokens, system=system, stop_strings=stop or (), keep=keep)
    else:
        g = session.resume(max_tokens, stop_strings=stop or (), keep=keep)
    tty = sys.stdout.isatty()
    broken = False  # the reader of stdout left (`| head`): a normal end, exit 141
    try:
        startup.raise_if_swallowed()  # (a Ctrl-C while the model loaded)
        for piece in g:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
            startup.raise_if_swallowed()
    except KeyboardInterrupt:
        startup.handled()
        session.interrupt(g)
    except BrokenPipeError:
        session.interrupt(g)  # keep the state as of the text handed to stdout
        g.finish_reason, broken = "broken_pipe", True
    if not broken:
        try:
            if as_json:
                print(json.dumps({
                    "text": g.text, "tokens": g.tokens, "finish_reason": g.finish_reason,
                    "prompt_tokens": g.prompt_tokens, "generated_tokens": g.generated,
                    "seed": session.settings.seed,
                    "prompt_seconds": round(g.prompt_seconds, 6),
                    "generation_seconds": round(g.gen_seconds, 6),
                    "prompt_tokens_per_second": round(g.prompt_tps, 3),
                    "generation_tokens_per_second": round(g.gen_tps, 3),
                    "peak_rss_bytes": _peak_rss()}, ensure_ascii=False))
            elif tty and g.chars:
                sys.stdout.write("\n")
            sys.stdout.flush()
        except BrokenPipeError:
            broken = True
    if broken:
        _broken_pipe()
    if not quiet and not as_json:
        # text not ending in a newline would share its last line with the stats when both reach
        # one terminal (stdout piped through `cat`, or 2>&1): start the stats on a line of their own
        glued = not tty and g.chars and not g.last_newline and _shares_a_screen(broken)
        if not tty and not broken:
            _wait_for_the_reader()
        _say(("\n" if glued else "") + _stats(g, session.settings.seed))
    save_state(save_state_path, session, model, quiet)
    if broken:
        raise typer.Exit(141)
    if g.finish_reason == "interrupted":
        raise typer.Exit(130)


@app.command()
@_user_errors
def batch(
    input_path: Annotated[Path, typer.Argument(
        metavar="INPUT.jsonl", help="One request per line: a JSON object with \"prompt\" or "
        "\"messages\", optionally \"id\", \"max_tokens\", \"temperature\", \"top_k\", "
        "\"top_p\", \"min_p\", \"repeat_penalty\", \"seed\", \"stop\", \"raw\"; '-' "
        "reads stdin.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", metavar="OUT.jsonl", help="Write the answers here (default: stdout). "
        "Requests already answered in it are skipped, so an interrupted run can be resumed.",
        show_default=False)] = None,
    model: Model = DEFAULT_MODEL,
    batch_size: Annotated[int, typer.Option(
        "-b", "--batch-size", metavar="B", help="Sequences decoded together (each holds one "
        "model state: ~34 MB for the 2B).")] = 16,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", metavar="N",
                                            help="Tokens to generate at most per request.")] = 512,
    temperature: Temperature = None, top_k: TopK = None, top_p: TopP = None, min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None, repeat_last_n: RepeatLastN = None, seed: Seed = None,
    stop: Stop = None,
    chat: Annotated[Optional[bool], typer.Option(
        "--chat/--raw", help="Wrap prompts in the chat template, or not (a request's \"raw\" "
        "decides for it). [default: chat for chat models (see `rgemma info`), raw otherwise]",
        show_default=False)] = None,
    system: System = None,
    quiet: Quiet = False,
):
    """Answer a file of requests, many decoded together; one JSON line out per request, in
    input order: id, text, finish_reason, prompt_tokens, completion_tokens, seed (or error).
    Each answer equals `rgemma generate` on that request alone with the same settings."""
    from .batchrun import check_output, read_requests, run_batch

    overrides = _sampler_overrides(max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repeat_penalty=repeat_penalty,
                                   repeat_last_n=repeat_last_n, seed=seed)
    if batch_size < 1:
        raise RgemmaError(f"--batch-size must be >= 1, got {batch_size}")
    lines = read_requests(input_path)
    if output is not None:  # refused before the model loads: a device, FIFO, someone's notes
        output = check_output(output)
    m, tok = load_model(model, quiet)
    use_chat = chat if chat is not None else m.card.chat
    done = run_batch(m, tok, lines, output, batch_size=batch_size, settings=overrides,
                     max_tokens=max_tokens, stop=tuple(stop or ()), chat=use_chat, system=system,
                     progress=not quiet)
    if not done:
        _say("interrupted")
        raise typer.Exit(130)


@app.command()
@_user_errors
def chat(
    model: Model = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", metavar="N",
                                            help="Tokens per reply at most.")] = 1024,
    temperature: Temperature = None, top_k: TopK = None, top_p: TopP = None, min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None, repeat_last_n: RepeatLastN = None, seed: Seed = None,
    system: System = None,
    save_state_path: Annotated[Optional[Path], typer.Option(
        "--save-state", metavar="PATH", help="Save the conversation to PATH after every turn "
        "(and after /undo, /regen).", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", metavar="PATH", help="Continue a saved chat (its transcript is shown again); "
        "sampling options given here win over the file's.", show_default=False)] = None,
    special: Special = False,
):
    """Chat in the terminal. Type /help for commands; Ctrl-C stops a reply or clears the line,
    Ctrl-C on an empty line or Ctrl-D exits."""
    overrides = _sampler_overrides(max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repeat_penalty=repeat_penalty,
                                   repeat_last_n=repeat_last_n, seed=seed)
    _check_save_path(save_state_path)
    from .chat import ChatUI
    session, model = start_session(model, resume, True, overrides, special=special)
    ChatUI(session, model_name=state_name(model), max_tokens=max_tokens, system=system,
           save_path=save_state_path, overrides=overrides).run()


@app.command()
@_user_errors
def download(model: Annotated[str, typer.Argument(metavar="MODEL", help="Hugging Face repo id, e.g. "
                                                  "google/recurrentgemma-2b-it.")]):
    """Download a model's files (only those rgemma needs) into the Hugging Face cache."""
    import warnings

    from .checkpoint import resolve
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.rich is marked experimental
        from tqdm.rich import tqdm_rich
        path = resolve(model, tqdm_class=tqdm_rich)
    print(path)


@app.command()
@_user_errors
def info(model: Annotated[str, typer.Argument(metavar="MODEL",
                                              help="Local directory, repo id, or 'demo'.")],
         check: Annotated[bool, typer.Option(
             "--check", help="Also scan every tensor for NaN / Inf (reads the whole checkpoint); "
             "exit status 1 naming the tensors if any.")] = False):
    """Describe a model: parameters, weight bytes, state size, chat or raw (and why), config."""
    from rich.console import Console
    from rich.table import Table

    from . import load
    from .checkpoint import resolve
    from .info import describe

    path = resolve(model)
    if check:  # before loading: a NaN norm would stop the load with only the first bad tensor
        from .checkpoint import check_finite
        bad = check_finite(path)
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise RgemmaError(f"{path}: {len(bad)} tensor(s) hold NaN or Inf: "
                              f"{', '.join(bad[:3])}{more}")
    m, tok = load(path)  # (not `model`: a repo id would be looked up on the Hub twice)
    t = Table(show_header=False, box=None)
    for k, v in describe(m, tok, model, path):
        t.add_row(k, v)
    if check:
        t.add_row("check", "every tensor finite (no NaN / Inf)")
    Console().print(t)


@app.command()
@_user_errors
def quantize(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Local directory, repo id, or 'demo'.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Directory to write the quantized model to.")],
    bits: Annotated[int, typer.Option("--bits", help="8: int8 per output channel; 4: groups of 64 "
                                      "with bf16 scales.")] = 8,
    embedding_bits: Annotated[Optional[int], typer.Option(
        "--embedding-bits", metavar="N", help="The tied embedding / output head: 16 (keep), 8 or 4. With --bits 4, 8 "
        "reads ~20% more per token and stays closer to the unquantized model (docs/benchmarks.md). "
        "[default: the same as --bits]", show_default=False)] = None,
    quiet: Quiet = False,
):
    """Write an int8 or 4-bit copy of a model (HF layout; RG-LRU, conv, norms, biases stay exact)."""
    from .checkpoint import resolve
    from .quantize import quantize_checkpoint

    src = resolve(model)
    if not quiet and sys.stderr.isatty():
        from rich.progress import Progress
        with Progress(transient=True, console=None) as bar:
            task = bar.add_task(f"quantizing to {bits} bits", total=None)
            quantize_checkpoint(src, out, bits, embedding_bits=embedding_bits,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    else:
        quantize_checkpoint(src, out, bits, embedding_bits=embedding_bits)
    if not quiet:
        print(f"wrote {out}", file=sys.stderr)


@app.command()
@_user_errors
def perplexity(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A UTF-8 text file, any length.")],
    model: Model = DEFAULT_MODEL,
    chunk_size: Annotated[int, typer.Option(
        "-c", "--chunk-size", metavar="N", help="Tokens per forward pass; the state is carried "
        "across chunks, so the result does not depend on it.")] = 512,
    max_tokens: Annotated[Optional[int], typer.Option(
        "-n", "--max-tokens", metavar="N", help="Score at most the first N tokens. [default: all]",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
    quiet: Quiet = False,
):
    """Perplexity of a text file: teacher-forced NLL of every token after BOS, in one sequence."""
    from .perplexity import perplexity as score
    from .perplexity import read_text

    if chunk_size < 1:
        raise RgemmaError(f"--chunk-size must be >= 1, got {chunk_size}")
    if max_tokens is not None and max_tokens < 1:
        raise RgemmaError(f"--max-tokens must be >= 1, got {max_tokens}")
    text = read_text(file)  # fail on a bad file before loading weights
    m, tok = load_model(model, quiet)
    ids = tok.raw_prompt(text)
    tty = not quiet and sys.stderr.isatty()

    def progress(done, total, nll):
        print(f"\r{done}/{plural(total, 'token')}, perplexity so far {math.exp(nll):.4f}", end="",
              file=sys.stderr, flush=True)

    r = score(m, ids, chunk_size=chunk_size, max_tokens=max_tokens,
              progress=progress if tty else None)
    if tty:
        print(file=sys.stderr)
    if as_json:
        print(json.dumps({"file": str(file), **r.to_dict(), "chunk_size": chunk_size}))
        return
    print(f"perplexity {r.perplexity:.4f} (mean NLL {r.nll:.4f} nats over {plural(r.tokens, 'token')})")
    if not quiet:
        print(f"{plural(r.tokens, 'token')} in {r.seconds:.2f} s: {r.tokens_per_second:.1f} tok/s, "
              f"{plural(r.chunks, 'chunk')} of <= {chunk_size}", file=sys.stderr)


@app.command()
@_user_errors
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Fewer rounds and a 256 MiB probe "
                                        "(~10 s); without it, 20 rounds and a 1 GiB probe.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
):
    """Self-check of this CPU: each weight format's decode kernel variant and its GB/s against
    a read-bandwidth probe in the same process (the full benchmark is `make bench`)."""
    from . import selfcheck
    r = selfcheck.run(quick=quick)
    if as_json:
        print(json.dumps({**r, "rates": {f"{f}/{t}": v for (f, t), v in r["rates"].items()}}))
    else:
        print(selfcheck.render(r))


@app.command()
@_user_errors
def serve(
    model: Model = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on (0.0.0.0: every "
                                      "interface; set --api-key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="TCP port.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", metavar="KEY", envvar="RGEMMA_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1/ requests.", show_default=False)] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", metavar="N",
                                           help="Requests generated together at most.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", metavar="N", help="Requests waiting "
                                           "for a place at most; past it, 429.")] = 64,
    state_cache_mb: Annotated[float, typer.Option(
        "--state-cache-mb", metavar="MB", help="Memory for conversation states (0 = none in "
        "memory).")] = 1024,
    state_cache_dir: Annotated[Optional[Path], typer.Option(
        "--state-cache-dir", metavar="DIR", help="Keep conversation states on disk here too "
        "(they survive a restart).", show_default=False)] = None,
    state_cache_disk_mb: Annotated[float, typer.Option(
        "--state-cache-disk-mb", metavar="MB", help="Disk for --state-cache-dir at most.")] = 8192,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", metavar="N", help="Tokens per reply at most (and the default).")] = 2048,
    max_prompt_tokens: Annotated[int, typer.Option(
        "--max-prompt-tokens", metavar="N", help="Prompt tokens per request at most.")] = 32768,
    max_body_mb: Annotated[float, typer.Option(
        "--max-body-mb", metavar="MB", help="Request body size at most.")] = 4,
):
    """Serve the model over an OpenAI-compatible HTTP API (docs/server.md); Ctrl-C stops it."""
    for name, v, lo in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                        ("--max-tokens", max_tokens, 0), ("--max-prompt-tokens", max_prompt_tokens, 1),
                        ("--port", port, 0), ("--state-cache-mb", state_cache_mb, 0),
                        ("--state-cache-disk-mb", state_cache_disk_mb, 0), ("--max-body-mb", max_body_mb, 0)):
        if not (v >= lo) or v != v:
            raise RgemmaError(f"{name} must be >= {lo}, got {v}")
    if port > 65535:
        raise RgemmaError(f"--port must be <= 65535, got {port}")
    try:
        from .server import Limits, serve as run_server
    except ImportError:
        raise RgemmaError("rgemma serve needs FastAPI and uvicorn: pip install 'rgemma-cli[serve]' "
                          "(make install includes them)") from None
    raise typer.Exit(run_server(
        model, host=host, port=port, api_key=api_key or None, max_batch=max_batch,
        max_queue=max_queue, state_cache_mb=state_cache_mb, state_cache_dir=state_cache_dir,
        state_cache_disk_mb=state_cache_disk_mb,
        limits=Limits(max_body_bytes=int(max_body_mb * 2**20), max_prompt_tokens=max_prompt_tokens,
                      max_tokens=max_tokens)))


@app.command("state")
@_user_errors
def state_cmd(file: Annotated[Path, typer.Argument(metavar="FILE", help="A state file.")]):
    """Show what a state file holds: model, tokens seen, size, transcript summary."""
    from . import statefile
    s = statefile.load(file)
    cfg = s.config
    lines = [
        f"file: {file} ({plural(s.size, 'byte')}, format v{s.version}, saved {s.created})",
        f"model: {s.model.get('name') or '?'} (digest {s.model.get('digest', '')[:16]}, "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})",
        f"tokens seen: {s.ctx.tokens_seen} ({s.ctx.state.pos} fed, {len(s.ctx.pending)} pending)",
        f"mode: {s.mode}",
        "sampler: " + ", ".join(f"{k}={v}" for k, v in s.settings.to_dict().items()),
        f"transcript: {plural(sum(m['role'] == 'user' for m in s.transcript), 'user turn')}, "
        f"{plural(len(s.transcript), 'message')}",
    ]
    for m in s.transcript[-6:]:
        text = " ".join(str(m.get("content", "")).split())
        lines.append(f"  {m.get('role', '?')}: {text[:70] + ('…' if len(text) > 70 else '')}")
    print("\n".join(lines))


# -- entry point --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The `rgemma` console script. Every failure is one line `error: ...` on stderr and a
    non-zero status: 1 for a user's mistake or bad input, 2 for a malformed command line, 130
    for Ctrl-C, 141 when the reader of stdout went away (`| head`), as for other Unix tools."""
    _lenient_stdio()
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _broken_pipe()
    except RgemmaError as e:
        _error(str(e))
        return e.exit_code
    except OSError as e:  # the environment, not rgemma: a permission, a full disk, a dead device
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
        return 1
    except MemoryError:
        _error("out of memory")
        return 1
    except Exception as e:  # a bug; still one line, and the traceback on request
        if startup.interrupted:  # a library made the Ctrl-C into another error (an import's
            print("interrupted", file=sys.stderr)  # "initialization failed")
            return 130
        if os.environ.get("RGEMMA_DEBUG"):
            raise
        _error(f"internal error ({type(e).__name__}: {e}); please report it with the command "
               f"line (RGEMMA_DEBUG=1 shows the traceback)")
        return 1


def _dispatch(argv) -> int:
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="rgemma", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return 130
    except typer.exceptions.TyperException as e:  # the parser's usage errors
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.ctx.get_help())
            return 0
        _error(e.format_message() if hasattr(e, "format_message") else str(e))
        return getattr(e, "exit_code", 2)
    return rv if isinstance(rv, int) else 0


def _lenient_stdio() -> None:
    """Bytes that are not UTF-8 must reach our checks, not kill a read: stdin decodes them to
    lone surrogates (PEP 383, as argv does), which the tokenizer refuses in one line; stdout
    writes such characters (a file name given on the command line) back as the bytes they were."""
    for stream in (sys.stdin, sys.stdout):
        try:
            stream.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError, OSError):
            pass  # not a text file (a test's stand-in), or already closed


def _broken_pipe() -> int:
    # `rgemma generate ... | head`: the reader left. Point stdout at /dev/null so the final
    # flush at exit cannot fail again, and exit 141 (128 + SIGPIPE) like other Unix tools.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
