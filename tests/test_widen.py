"""kernels.widen: the f16 -> f32 conversion is exact for every half value, both as vcvtph2ps
(hosts with F16C) and in plain integer ops (generic targets: `fpext half` there became a call
into a runtime library Numba does not link, and the process crashed)."""

import os
import subprocess
import sys

import numpy as np

from rgemma_cli.kernels import widen

CHECK = """
import numpy as np
from rgemma_cli.kernels import widen
h = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
out = np.empty(h.shape, np.float32)
widen.widen_f16(h, out)
ref = h.view(np.float16).astype(np.float32)
same = (out.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(out) & np.isnan(ref))
assert same.all(), int((~same).sum())
print(widen._F16C)
"""


def test_every_half_value_widens_exactly():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    out = np.empty(h.shape, np.float32)
    widen.widen_f16(h, out)
    ref = h.view(np.float16).astype(np.float32)
    same = (out.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(out) & np.isnan(ref))
    assert same.all()


def test_generic_target_widens_f16_without_f16c():
    env = dict(os.environ, NUMBA_CPU_NAME="generic")
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"  # the integer path was the one tested
