"""files.py: only regular files are read or replaced, and a save is atomic under any fault
(issue 11 items 2 and 3): FIFOs and devices refused before opening, unique temp names per save,
orphans of killed saves removed, messages that say what is on disk."""

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rgemma_cli import files, statefile
from rgemma_cli.errors import RgemmaError

from test_statefile import good_file, session


def one_line_error(fn, *args):
    with pytest.raises(RgemmaError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def read_with_timeout(fn, *args, timeout=10):
    """Run fn(*args) in a thread: a FIFO open that blocks must fail the test, not hang it."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (reported below)
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn.__name__}{args} hung"
    return out


@pytest.fixture
def fifo(tmp_path):
    p = tmp_path / "pipe.rgs"
    os.mkfifo(p)
    yield p
    # unblock a reader/writer the code under test may have left waiting (before the fix)
    fd = os.open(p, os.O_RDWR | os.O_NONBLOCK)
    os.close(fd)


@pytest.fixture
def device(tmp_path):
    """A private character device node (1, 3: what /dev/null is). Tests of saves never aim at
    the real /dev/null: code that replaces device nodes would replace the system's."""
    p = tmp_path / "null"
    try:
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        pytest.skip("cannot create a device node (not root)")
    return p


# -- item 2: only regular files ----------------------------------------------------------------

@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null", "dir"])
def test_state_load_refuses_what_is_not_a_regular_file(special, fifo, tmp_path):
    path = {"fifo": fifo, "dir": tmp_path}.get(special, Path(special))
    out = read_with_timeout(statefile.load, path)
    assert isinstance(out.get("error"), RgemmaError), out
    msg = str(out["error"])
    assert "\n" not in msg and str(path) in msg
    assert any(w in msg for w in ("FIFO", "device", "directory"))


def test_symlink_to_a_state_file_is_read_and_replaced_through(tiny, tmp_path):
    path, raw = good_file(tiny, tmp_path)
    link = tmp_path / "link.rgs"
    link.symlink_to(path.name)
    assert statefile.load(link).ctx.tokens_seen == statefile.load(path).ctx.tokens_seen
    statefile.save(link, session(tiny, n=3))
    assert link.is_symlink() and path.read_bytes() != raw  # the target was replaced, not the link


@pytest.mark.parametrize("special", ["fifo", "device", "dir"])
def test_save_refuses_what_is_not_a_regular_file(tiny, special, fifo, tmp_path, request):
    path = {"fifo": fifo, "dir": tmp_path}.get(special) or request.getfixturevalue("device")
    before = os.lstat(path)
    out = read_with_timeout(statefile.save, path, session(tiny, n=2))
    assert isinstance(out.get("error"), RgemmaError), out
    assert "\n" not in str(out["error"])
    after = os.lstat(path)  # the node itself is untouched (as root, --save-state /dev/null replaced it)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)


def test_reads_stop_at_what_the_header_says(tiny, tmp_path):
    """A valid state file followed by 4 GiB (sparse): refused as trailing bytes without reading
    them. In a process limited to 1.5 GiB of address space, so reading them all cannot pass."""
    path, raw = good_file(tiny, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(len(raw) + 4 * 2**30)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**29, 3 * 2**29))\n"
            "from rgemma_cli import statefile\n"
            "from rgemma_cli.errors import RgemmaError\n"
            "try:\n    statefile.load(sys.argv[1])\nexcept RgemmaError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "trailing bytes" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_long_file_name_is_one_line(tiny, tmp_path):
    msg = one_line_error(statefile.save, tmp_path / ("a" * 300), session(tiny, n=2))
    assert "too long" in msg
    msg = one_line_error(statefile.check_target, tmp_path / ("a" * 300 + "/s.rgs"))
    assert "too long" in msg
    assert os.listdir(tmp_path) == []


# -- item 3: atomic saves ---------------------------------------------------------------------------

def temps(directory):
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_save_at_position_zero_round_trips(tiny, tmp_path):
    from rgemma_cli.generation import Session
    from rgemma_cli.sampling import SamplerSettings
    s = Session(*tiny, SamplerSettings(seed=3))
    statefile.save(tmp_path / "empty.rgs", s)
    assert statefile.load(tmp_path / "empty.rgs").ctx.state == s.ctx.state
    s.feed(s.prompt_ids("Hello"))  # fed nothing yet: the prompt is pending (generate -n 0)
    statefile.save(tmp_path / "pending.rgs", s)
    back = statefile.restore(statefile.load(tmp_path / "pending.rgs"), *tiny)
    assert back.ctx.pending == s.ctx.pending and back.ctx.state.pos == 0


def test_two_threads_saving_one_path_never_mix(tmp_path):
    """Each save has its own temp name: concurrent saves leave one whole version, no temp file.
    With one temp name per process, one thread's rename published the other's half-written file."""
    path = tmp_path / "s.bin"
    payloads = [bytes([i]) * (3 * 2**20) for i in (1, 2)]
    errors = []

    def saver(data):
        try:
            for _ in range(15):
                files.write_atomic(path, [data[:2**20], data[2**20:]])
                got = path.read_bytes()
                assert got in payloads, "a torn or mixed file was published"
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=saver, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert path.read_bytes() in payloads and temps(tmp_path) == []


def test_orphans_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    """SIGKILL a process in the middle of a save (between writing the temp file and the rename),
    three times: each next save into the directory removes the temp files of the dead ones, so
    one is left at most; a live process's temp file is left alone."""
    code = ("import os, sys, time\n"
            "from rgemma_cli import files\n"
            "os.fsync = lambda fd: (print('writing', flush=True), time.sleep(60))\n"
            "files.write_atomic(__import__('pathlib').Path(sys.argv[1]), [b'x' * 2**20])\n")
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s.bin")],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "writing\n"
        p.kill()
        p.wait()
    assert len(temps(tmp_path)) == 1  # (before: one per kill, 12 kills left 216 MB)
    live = tmp_path / f"{files.TEMP_PREFIX}{os.getppid()}-abc123.tmp"  # a live process's save
    live.write_bytes(b"in progress")
    files.write_atomic(tmp_path / "other.bin", [b"new"])
    assert sorted(os.listdir(tmp_path)) == sorted(["other.bin", live.name])


def test_ctrl_c_after_the_rename_says_the_new_file_is_saved(tiny, tmp_path, monkeypatch):
    path, raw = good_file(tiny, tmp_path)
    real_replace = os.replace

    def replace_then_ctrl_c(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    with pytest.raises(RgemmaError) as e:
        statefile.save(path, session(tiny, n=4))
    monkeypatch.undo()
    msg = str(e.value)
    assert "unchanged" not in msg and "new state was saved" in msg and e.value.exit_code == 130
    assert path.read_bytes() != raw and statefile.load(path).ctx.tokens_seen > 0
    assert temps(tmp_path) == []


def test_ctrl_c_before_the_rename_says_nothing_was_written(tiny, tmp_path, monkeypatch):
    def ctrl_c(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", ctrl_c)
    with pytest.raises(RgemmaError, match="nothing was written") as e:
        statefile.save(tmp_path / "new.rgs", session(tiny, n=2))
    monkeypatch.undo()
    assert e.value.exit_code == 130 and os.listdir(tmp_path) == []


def test_replacing_keeps_the_permission_bits(tiny, tmp_path):
    path, _ = good_file(tiny, tmp_path)
    path.chmod(0o600)
    statefile.save(path, session(tiny, n=2))
    assert path.stat().st_mode & 0o777 == 0o600
