"""The Triton kernels equal the reference on CPU, through the Triton interpreter.

The interpreter is chosen when triton first compiles, so the cases run in one child process with
``TRITON_INTERPRET=1`` (this process's triton, if imported, is left as it is).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from interpret_cases import CASES, DEFAULT_TILE_K

HERE = Path(__file__).resolve().parent
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "interpret_cases.py")], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("cid", [c[0] for c in CASES] + ["packed_linear_op", "packed_linear_op_m1", "scale_tail_gemv",
                                                               "scale_tail_gemv_words", "scale_tail_gemv_h2",
                                                               "scale_tail_dot"]
                         + [f"default_tile_b{b}_k{k}" for b, k in DEFAULT_TILE_K])
def test_interpreted_kernel_matches_reference(results, cid):
    err = results[cid]
    assert isinstance(err, float), err
    tol = 1e-2 if "bfloat16" in cid else 2e-3  # one rounding of W_hat (dot) or of the output
    assert err < tol
