"""Runs as any user, installed any way (issue 11 item 6): a wheel built from the tree carries the
demo model inside the package and runs from a fresh venv outside the checkout, as a user who
cannot write the installed package nor has a home (Numba's cache falls back, one warning line at
most); unreadable model files and unwritable save directories are one line.

CI runs as root, who can write and read anything: these tests drop to `nobody` in the child
process. Run by another user, they run as that user with the package directory made read-only.
"""

import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def as_other_user(cmd, cwd, env=None, input=None, timeout=300):
    """Run cmd as `nobody` when we are root (setpriv, else os.setuid before exec), else as is;
    with no writable home."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LANG": "C.UTF-8",
           **(env or {})}
    cmd, preexec = [str(c) for c in cmd], None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        if shutil.which("setpriv"):
            cmd = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                   *cmd]
        else:
            def preexec():
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
    return subprocess.run(cmd, cwd=cwd, env=env, input=input, capture_output=True, timeout=timeout,
                          preexec_fn=preexec)


@pytest.fixture(scope="module")
def public_dir():
    """A directory `nobody` can read (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="rgemma-pkg-"))
    d.chmod(0o755)
    probe = as_other_user([sys.executable, "-c", "import numpy, numba, typer"], cwd=d)
    if probe.returncode != 0:
        shutil.rmtree(d)
        pytest.skip(f"the unprivileged user cannot run this Python: {probe.stderr[-300:]!r}")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def stderr_lines(r):
    return [line for line in r.stderr.decode(errors="replace").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wheel(public_dir):
    out = public_dir / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--no-build-isolation", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = out.glob("rgemma_cli-*.whl")
    return path


def test_wheel_carries_the_demo_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rgemma_cli"}  # no top-level weights/
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model"):
        assert f"rgemma_cli/demo/{f}" in names


def test_wheel_in_a_fresh_venv_runs_the_demo_as_an_unprivileged_user(wheel, public_dir):
    """Installed from the wheel into a venv outside the checkout; run by a user who can write
    neither the package directory nor a home: Numba's cache falls back, one warning line at most,
    and the demo's greedy text is the checkout's."""
    from test_cli import run_main
    venv = public_dir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install",
                        "--quiet", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    site = Path(subprocess.check_output([str(venv / "bin/python"), "-c",
                                         "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["rgemma_cli"]
    # the dependencies come from this environment (offline, fast): a path line, not its .pth files
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pkg = site / "rgemma_cli"
    if os.geteuid() != 0:  # another user: make the install read-only instead of switching users
        for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
            d.chmod(0o555)
    for p in [public_dir, venv, *venv.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() or p.stat().st_mode & 0o100 else 0))
    want = run_main("generate", "-m", "demo", "-n", "6", "-t", "0", "-q", "Hello")[1]
    r = as_other_user([venv / "bin/rgemma", "generate", "-m", "demo", "-n", "6", "-t", "0", "-q", "Hello"],
                      cwd=public_dir)
    err = stderr_lines(r)
    assert r.returncode == 0, err
    assert "Traceback" not in r.stderr.decode(errors="replace")
    assert len(err) <= 1 and all(line.startswith("warning: ") for line in err), err
    assert r.stdout.decode() == want
    where = as_other_user([venv / "bin/python", "-c", "import rgemma_cli; print(rgemma_cli.__file__)"],
                          cwd=public_dir)
    assert where.stdout.decode().startswith(str(site))  # the installed copy, not the checkout


def test_unreadable_model_files_and_unwritable_directory_are_one_line(public_dir, tiny_model_dir):
    rgemma = Path(sys.executable).parent / "rgemma"
    (public_dir / "cache").mkdir(mode=0o777, exist_ok=True)
    (public_dir / "cache").chmod(0o777)
    cache = {"NUMBA_CACHE_DIR": str(public_dir / "cache")}  # (else: one warning line, tested above)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        d = public_dir / f"model-{name}"
        shutil.copytree(tiny_model_dir, d)
        d.chmod(0o755)
        for f in d.iterdir():
            f.chmod(0o644)
        (d / name).chmod(0o000)
        r = as_other_user([rgemma, "generate", "-m", d, "-n", "2", "hi"], cwd=public_dir, env=cache)
        err = stderr_lines(r)
        assert r.returncode == 1 and len(err) == 1 and err[0].startswith("error: "), err
        assert "ermission denied" in err[0] and name in err[0]
    locked = public_dir / "locked"
    locked.mkdir(mode=0o755)
    r = as_other_user([rgemma, "generate", "-m", tiny_model_dir.parent.parent / "none", "--save-state",
                       locked / "s.rgs", "hi"], cwd=public_dir, env=cache)
    err = stderr_lines(r)
    assert r.returncode == 1 and len(err) == 1 and "ermission denied" in err[0], err
