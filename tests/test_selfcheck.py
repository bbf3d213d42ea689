"""`rgemma bench --quick` (selfcheck) and the CPU description it prints (kernels.cpu): runs on
any CPU, names a kernel variant for every format, and measures rates that are positive. (What
the rates ARE is for benchmarks, never asserted in tests.)"""

import json

import numpy as np
from typer.testing import CliRunner

from rgemma_cli import cli, selfcheck
from rgemma_cli.kernels import cpu


def test_cpu_description_and_variants():
    f = cpu.features()
    assert all(isinstance(v, bool) for v in f.values())
    d = cpu.describe()
    assert cpu.cpu_model() in d and "CPUs" in d
    for fmt in ("f32", "bf16", "f16", "int8", "q4"):
        v = cpu.variant(fmt)
        assert v and ("portable" in v) == (cpu.ISA == "")  # x86 SIMD, or the portable loops
    if not f.get("amx-tile"):
        assert cpu.amx_permitted() is False  # nothing to ask the OS for: the callers fall back


def test_random_weights_have_the_format_shapes():
    for fmt in selfcheck.FORMATS:
        w = selfcheck.random_weights(fmt, (8, 128))
        assert w.shape == (8, 128) and w.nbytes > 0


def test_kernel_rates_small():
    r = selfcheck.kernel_rates(rounds=2, shape=(16, 256), cycled_bytes=1 << 14)
    assert set(r) >= {(f, 1) for f in selfcheck.FORMATS}
    assert all(v["best"] > 0 and v["median"] > 0 for v in r.values())


def test_probe_reads():
    p = selfcheck.ReadProbe(1 << 20)
    assert p.once() > 0 and np.all(p.out == 16384)  # every row of ones summed


def test_bench_quick_command(monkeypatch):
    monkeypatch.setattr(selfcheck, "MATRIX", (16, 256))
    monkeypatch.setattr(selfcheck, "_CYCLED_BYTES", 1 << 14)
    monkeypatch.setattr(selfcheck, "PROBE_BYTES", 1 << 20)
    r = CliRunner().invoke(cli.app, ["bench", "--quick"])
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert out.startswith("CPU: ") and "read probe" in out
    for fmt in selfcheck.FORMATS:
        assert any(line.startswith(fmt + " ") and cpu.variant(fmt) in line for line in out.splitlines())
    j = json.loads(CliRunner().invoke(cli.app, ["bench", "--quick", "--json"]).stdout)
    assert j["probe_gbs"] > 0 and set(j["variants"]) == set(selfcheck.FORMATS)
