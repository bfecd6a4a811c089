"""A checkout's ``kernels/`` directory (``hpsearch.kernels``) must not hide Hugging Face's ``kernels``
distribution, which transformers >= 5.25 imports for every model, when Python runs from the
checkout's root (``python -m hpsearch``, ``python -m pytest``: the root is then on ``sys.path``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

CHECK = """
import sys, kernels, hpsearch.kernels
print(kernels.__file__)
print(hpsearch.kernels.__file__)
"""


def test_top_level_kernels_is_not_hpsearch_kernels_from_the_root():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, check=False)
    if importlib.util.find_spec("kernels") is None or "kernels" not in _installed():
        assert proc.returncode != 0 and "no 'kernels' package is installed" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    top, ours = proc.stdout.split()
    assert top != ours and ours.startswith(str(REPO / "kernels"))


def test_a_transformers_model_builds_from_the_root():
    code = ("from transformers import LlamaConfig, LlamaForCausalLM\n"
            "LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
            "num_attention_heads=4, vocab_size=64))\nprint('built')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-2000:]


def _installed() -> set[str]:
    from importlib.metadata import distributions

    return {d.metadata["Name"].lower() for d in distributions() if d.metadata["Name"]}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
