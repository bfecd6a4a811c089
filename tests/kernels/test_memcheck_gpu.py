"""No packed kernel reads or writes outside its tensors on the GPU (compute-sanitizer memcheck, each
tensor its own allocation: ``memcheck_cases.py``). The CPU counterpart is ``bounds.py`` in the
interpreter case scripts; this one also covers the Gluon few-row kernel, which does not interpret."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "compute-sanitizer"
    return str(path) if path.exists() else None


def test_no_kernel_touches_memory_outside_its_tensors():
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found (CUDA toolkit)")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([tool, "--tool", "memcheck", "--print-limit", "5", sys.executable, str(here / "memcheck_cases.py")],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert "ERROR SUMMARY: 0 errors" in out and "done" in proc.stdout, out[-4000:]
