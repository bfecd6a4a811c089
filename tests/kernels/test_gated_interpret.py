"""``packed_gated_matmul`` and gated MLPs equal the unfused steps on CPU, through the Triton
interpreter (one child process with ``TRITON_INTERPRET=1``, as ``test_kernels_interpret``)."""

from __future__ import annotations

import pytest
from packed_cases import assert_in_bounds, interpreted

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def results():
    return interpreted("gated_cases.py")


def test_every_case_ran(results):
    # 2-4 bits x 3 shapes x bias or not in the kernel, 2 fallbacks, 2 models fused and restored
    assert len([c for c in results if c.startswith("op-")]) == 20
    assert {c for c in results if c.startswith("mlp-")} == {"mlp-llama", "mlp-llama-unfused", "mlp-qwen2",
                                                           "mlp-qwen2-unfused"}


def test_gated_op_equals_unfused_steps(results):
    errors = {cid: err for cid, err in results.items() if cid.startswith("op-")}
    bad = {cid: err for cid, err in errors.items() if not isinstance(err, float) or err > 1e-3}
    assert not bad, bad


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gated_mlps_decode_as_transformers(results, arch):
    # the epilogue rounds where transformers' MLP does: greedy decoding's logits agree to float16
    for cid in (f"mlp-{arch}", f"mlp-{arch}-unfused"):
        err = results[cid]
        assert isinstance(err, float), err
        assert err < 1e-3


def test_kernels_stay_inside_their_tensors(results):
    # a discarded out-of-bounds load passes the value checks above and faults on a GPU (bounds.py)
    assert_in_bounds(results)
