"""The Triton kernels equal the reference on CPU, through the Triton interpreter.

The interpreter is chosen when triton first compiles, so the cases run in one child process with
``TRITON_INTERPRET=1`` (this process's triton, if imported, is left as it is).
"""

from __future__ import annotations

import pytest
from interpret_cases import CASES, DEFAULT_TILE_K
from packed_cases import assert_in_bounds, interpreted

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def results():
    return interpreted("interpret_cases.py", timeout=600)


@pytest.mark.parametrize("cid", [c[0] for c in CASES] + ["packed_linear_op", "packed_linear_op_m1", "scale_tail_gemv",
                                                               "scale_tail_gemv_words", "scale_tail_gemv_h2",
                                                               "scale_tail_dot"]
                         + [f"default_tile_b{b}_k{k}" for b, k in DEFAULT_TILE_K])
def test_interpreted_kernel_matches_reference(results, cid):
    err = results[cid]
    assert isinstance(err, float), err
    tol = 1e-2 if "bfloat16" in cid else 2e-3  # one rounding of W_hat (dot) or of the output
    assert err < tol


def test_kernels_stay_inside_their_tensors(results):
    # a discarded out-of-bounds load passes the value checks above and faults on a GPU (bounds.py)
    assert_in_bounds(results)
