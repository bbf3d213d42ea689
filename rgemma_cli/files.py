"""Files rgemma reads and replaces: regular files only, reads bounded by the file's size, and
replacement by an atomic rename (docs/state-format.md, "What a save guarantees").

Reading: `open_regular` opens without blocking and checks the opened descriptor, so a FIFO (whose
open() waits for a writer forever), a device (/dev/zero never ends), a socket or a directory is
refused in one line, and a file swapped for one of them between a check and the open is caught
too. A symlink to a regular file is followed.

Writing: `write_atomic` writes a temp file beside the target under a name unique to this save
(pid + random), fsyncs it, renames it over the target and fsyncs the directory; a failure or a
Ctrl-C before the rename removes the temp file and leaves the target as it was. Temp files of
saves that died (SIGKILL, power loss) are removed by the next save into the same directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from .errors import RgemmaError

TEMP_PREFIX = ".rgemma-tmp-"  # + "<pid>-<random>.tmp"; short, so a long target name still fits
# temp files of our own saves, and the per-process names older versions used (".NAME.PID.tmp")
_TEMP = re.compile(r"^(?:\.rgemma-tmp-(\d+)-[0-9a-f]+|\..+\.(\d+))\.tmp$")


def kind_of(mode: int) -> str:
    """What a st_mode is, in words, for "X is a FIFO, not a state file"."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


@contextlib.contextmanager
def open_regular(path: str | Path, what: str = "file", missing: str | None = None):
    """Yield (binary file, size in bytes) for a regular file (or a symlink to one).

    Raises RgemmaError, one line, for a missing file (the message `missing` if given), a file
    that is not regular, or one that cannot be opened (permissions, name too long, ...). `what`
    names the file in messages ("state file", "config.json"). Read no more than `size` bytes."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise RgemmaError(missing or f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise RgemmaError(f"{path} is a directory, not a {what}") from None
    except OSError as e:
        raise RgemmaError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RgemmaError(f"{path} is a {kind_of(st.st_mode)}, not a {what}; rgemma reads "
                              f"only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            yield f, st.st_size
        except OSError as e:  # EIO and the like while reading
            raise RgemmaError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_regular(path: str | Path, what: str = "file", limit: int | None = None,
                 missing: str | None = None) -> bytes:
    """The bytes of a regular file (see `open_regular`), refused before reading if it holds
    more than `limit`."""
    with open_regular(path, what, missing) as (f, size):
        if limit is not None and size > limit:
            raise RgemmaError(f"{path} is too large for a {what} ({size:,} bytes; at most "
                              f"{limit:,})")
        data = f.read(size)
    if len(data) != size:
        raise RgemmaError(f"{path} changed while it was read")
    return data


def read_stream(stream, what: str, limit: int) -> bytes:
    """All bytes of a binary stream (stdin) up to `limit`: a stream that gives more (`cat
    /dev/zero |`) is refused once `limit` + 1 bytes have come, instead of read until memory
    runs out."""
    chunks, n = [], 0
    try:
        while n <= limit:
            chunk = stream.read(min(1 << 20, limit + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
    except OSError as e:
        raise RgemmaError(f"cannot read {what}: {e.strerror or e}") from None
    if n > limit:
        raise RgemmaError(f"{what} is too large (more than {limit:,} bytes)")
    return b"".join(chunks)


def check_writable(path: str | Path, what: str = "file") -> Path:
    """Refuse, before any work, a target that `write_atomic` could not replace: a directory, a
    FIFO or device (a rename would replace the node itself, e.g. /dev/null), a missing or
    unwritable directory, a name too long. Returns the path to write: a symlink to a regular
    file is followed, so the link stays and its target is replaced."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise RgemmaError(f"cannot save {what} to {path}: {e.strerror or e}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise RgemmaError(f"cannot save {what} to {path}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise RgemmaError(f"cannot save {what} to {path}: it is a {kind_of(st.st_mode)}; "
                              f"rgemma writes only regular files")
        path = Path(os.path.realpath(path))
    elif path.is_symlink():  # a dangling link: write where it points, as `>` would
        path = Path(os.path.realpath(path))
    parent = path.parent
    if not parent.is_dir():
        raise RgemmaError(f"cannot save {what} to {path}: directory {parent} does not exist")
    if len(os.fsencode(path.name)) > _name_max(parent):
        raise RgemmaError(f"cannot save {what} to {path}: the file name is too long "
                          f"({len(os.fsencode(path.name))} bytes; at most {_name_max(parent)})")
    try:  # the real test of a writable directory (permission bits, read-only mounts, quotas)
        fd, tmp = _create_temp(parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        kept = "; the previous file is unchanged" if st is not None else ""
        raise RgemmaError(f"cannot save {what} to {path}: {e.strerror or e} (directory "
                          f"{parent}){kept}") from None
    return path


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _create_temp(directory: Path) -> tuple[int, Path]:
    """A new, empty temp file in `directory` with a name no other save uses (O_EXCL)."""
    while True:
        tmp = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), tmp
        except FileExistsError:
            continue


def remove_orphans(directory: Path) -> int:
    """Remove temp files and temp directories (`make_temp_dir`) left in `directory` by saves
    whose process is gone (a SIGKILL between the temp's creation and the rename); returns how
    many. The temp of a live process (another save in progress) is never touched."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
            elif entry.is_dir(follow_symlinks=False) and entry.name.startswith(TEMP_PREFIX):
                shutil.rmtree(entry.path)  # only ours: never a user's ".x.123.tmp" directory
                removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: leave its file alone
    return True


class SaveInterrupted(KeyboardInterrupt):
    """Ctrl-C during `write_atomic`; `replaced` says whether the rename had already happened
    (the new file is in place) or not (the target is as it was, the temp file removed)."""

    def __init__(self, replaced: bool):
        super().__init__()
        self.replaced = replaced


def write_atomic(path: str | Path, parts) -> None:
    """Write the byte strings / buffers `parts` to `path` as one atomic replacement.

    A temp file beside `path` (see `_create_temp`), fsync, rename over `path`, fsync of the
    directory. An OSError before the rename removes the temp file, leaves `path` untouched and
    propagates; a Ctrl-C raises SaveInterrupted saying whether `path` was replaced. A new file
    gets mode 0o644 less the umask; a replaced one keeps its permission bits."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    remove_orphans(path.parent)
    try:
        old_mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        old_mode = None
    fd, tmp = _create_temp(path.parent)
    renaming = False
    try:
        with os.fdopen(fd, "wb") as f:
            if old_mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), old_mode)
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        renaming = True
        os.replace(tmp, path)
    except BaseException as e:
        # os.replace is atomic: the temp file is gone exactly when the target was replaced
        replaced = renaming and not os.path.lexists(tmp)
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, SaveInterrupted):
            raise SaveInterrupted(replaced) from None
        if replaced:
            return
        raise
    try:
        fsync_dir(path.parent)
    except KeyboardInterrupt:
        raise SaveInterrupted(True) from None


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (creations, renames) durable; a no-op where a directory
    cannot be opened or fsynced (some platforms and filesystems)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# -- directories replaced whole -------------------------------------------------------------------
# A target T is replaced by: build everything in a temp directory D beside it (same filesystem),
# fsync; rename T to its aside A; rename D to T; rename A to a temp name and delete it. A
# SIGKILL before the first rename leaves T as it was (D is an orphan temp); between the two
# renames T is missing and A holds the old directory, complete: `recover_dir` renames it back;
# after the second, T is the new directory and A, or its temp, is deleted by the next run.

def make_temp_dir(parent: Path) -> Path:
    """A new, empty directory in `parent` named like `_create_temp`'s files (removed by
    `remove_orphans` once this process is gone). Cleans the orphans of dead runs first."""
    remove_orphans(parent)
    while True:
        tmp = parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _aside_prefix(target: Path) -> str:
    """The name prefix of `target`'s aside, completed by the pid of the run that made it:
    ".NAME.rgemma-old-PID", or ".rgemma-old-HASH-PID" when NAME is too long for that."""
    prefix = f".{target.name}.rgemma-old-"
    if len(os.fsencode(prefix)) + 12 > _name_max(target.parent):
        prefix = f".rgemma-old-{hashlib.sha256(os.fsencode(target.name)).hexdigest()[:16]}-"
    return prefix


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` (in target's parent) in place of `target`, which may
    be missing; see the comment above for what a SIGKILL at any point leaves. OSError
    before the second rename leaves `target` as it was."""
    parent = target.parent
    fsync_dir(new)
    if not os.path.lexists(target):
        os.rename(new, target)
        fsync_dir(parent)
        return
    aside = parent / f"{_aside_prefix(target)}{os.getpid()}"
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    fsync_dir(parent)
    _discard(aside)


def _discard(directory: Path) -> None:
    # renamed to a temp name first, so that an aside is always a complete directory; a SIGKILL
    # inside rmtree leaves a temp that the next run removes
    doomed = directory.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.tmp"
    try:
        os.rename(directory, doomed)
    except OSError:
        doomed = directory
    shutil.rmtree(doomed, ignore_errors=True)


def recover_dir(target: Path) -> bool:
    """Finish a `replace_dir` of `target` whose process was killed: if `target` is missing and
    a dead run's aside of it exists, rename the aside (the previous directory, complete) back;
    asides left beside an existing `target` are deleted. Asides of live runs are not touched.
    Returns whether `target` was restored. Errors (a read-only directory) are ignored."""
    target = Path(target)
    prefix = _aside_prefix(target)
    try:
        asides = sorted((e.name for e in os.scandir(target.parent)
                         if e.name.startswith(prefix) and e.name[len(prefix):].isdigit()),
                        key=lambda n: int(n[len(prefix):]))
    except OSError:
        return False
    restored = False
    for name in asides:
        pid = int(name[len(prefix):])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if not os.path.lexists(target):
                os.rename(target.parent / name, target)
                fsync_dir(target.parent)
                restored = True
            else:
                _discard(target.parent / name)
        except OSError:
            pass
    return restored
