"""The decode attention kernels equal PyTorch's SDPA on CPU, through the Triton interpreter; tiny
transformers models decode the same logits with them as with SDPA.

The interpreter is chosen when triton first compiles, so the cases run in one child process with
``TRITON_INTERPRET=1`` (this process's triton, if imported, is left as it is).
"""

from __future__ import annotations

import pytest
from attention_cases import CASES, HF_ARCHES
from packed_cases import assert_in_bounds, interpreted

pytest.importorskip("triton")

TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.5e-2}  # of max |SDPA output|: one rounding of it


@pytest.fixture(scope="module")
def results():
    return interpreted("attention_cases.py", timeout=600)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreted_attention_matches_sdpa(results, case):
    err = results[case[0]]
    assert isinstance(err, float), err
    assert err < TOL[case[7]]


@pytest.mark.parametrize("arch", HF_ARCHES)
def test_interpreted_decode_matches_sdpa_model(results, arch):
    """Prefill then 3 greedy steps (batch 2, one sequence left-padded) with a StaticCache: the same
    logits as SDPA, and every decode step of every layer ran the op."""
    got = results[f"hf_{arch}"]
    assert isinstance(got, dict), got
    assert got["op_calls"] == got["expected_calls"] > 0
    assert got["err"] < 1e-5


def test_kernels_stay_inside_their_tensors(results):
    # a discarded out-of-bounds load passes the value checks above and faults on a GPU (bounds.py)
    assert_in_bounds(results)
