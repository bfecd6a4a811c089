"""A checkout's ``kernels/`` directory (``hpsearch.kernels``) must not hide Hugging Face's ``kernels``
distribution, which transformers >= 5.25 imports for every model, when Python runs from the
checkout's root (``python -m hpsearch``, ``python -m pytest``: the root is then on ``sys.path``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

CHECK = """
import sys, kernels, hpsearch.kernels
print(kernels.__file__, hasattr(kernels, "__version__"), hasattr(kernels, "packed_matmul"))
print(hpsearch.kernels.__file__)
"""


def test_top_level_kernels_is_not_hpsearch_kernels_from_the_root():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    top, versioned, ours_by_name, ours = proc.stdout.split()
    assert ours.startswith(str(REPO / "kernels")) and ours_by_name == "False"
    if "kernels" in _installed():  # Hugging Face's
        assert top != ours and versioned == "True"
    else:  # an empty stand-in: transformers reads "not installed"
        assert versioned == "False"


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
