"""Run an interpreter case script (``python run_checked.py <script>``) with every load, store and
atomic of its kernels checked against their tensors (``bounds``), and add the findings to the JSON
object it prints as ``"bounds"``: a list of offending kernels, or a string saying why nothing was
checked."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys

import bounds

if __name__ == "__main__":
    checked = bounds.install()
    buf = io.StringIO()
    sys.argv = sys.argv[1:]
    with contextlib.redirect_stdout(buf):
        runpy.run_path(sys.argv[0], run_name="__main__")
    out = json.loads(buf.getvalue())
    out["bounds"] = bounds.report() if checked else "not checked: this Triton's interpreter has no hooks for it"
    json.dump(out, sys.stdout)
