"""``packed_qkv_rope`` and rope-fused attention equal the unfused steps on CPU, through the Triton
interpreter (one child process with ``TRITON_INTERPRET=1``, as ``test_kernels_interpret``)."""

from __future__ import annotations

import pytest
from packed_cases import assert_in_bounds, interpreted

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def results():
    return interpreted("rope_cases.py")


def test_every_case_ran(results):
    # 2-4 bits x 3 head layouts x bias or not in the kernel, 2 fallbacks, 2 models fused and restored
    assert len([c for c in results if c.startswith("op-")]) == 20
    assert {c for c in results if c.startswith("attn-")} == {"attn-llama", "attn-llama-unfused", "attn-qwen2",
                                                             "attn-qwen2-unfused"}


def test_rope_op_equals_unfused_steps(results):
    # the epilogue rounds where the unfused steps do: the query and both caches are equal
    cases = {cid: case for cid, case in results.items() if cid.startswith("op-")}
    bad = {cid: case for cid, case in cases.items() if not isinstance(case, dict) or case["err"] > 1e-6}
    assert not bad, bad


def test_the_kernel_ran_where_it_should(results):
    # one token a row at 2-4 bits: the fused kernel; two rows or 8 bits: the unfused steps
    ran = {cid: case["kernel"] for cid, case in results.items() if cid.startswith("op-") and isinstance(case, dict)}
    expected = {cid: "-m1" in cid and not cid.startswith("op-b8") for cid in ran}
    assert ran == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rope_attention_decodes_as_transformers(results, arch):
    # transformers' eager rotary embedding rounds three times, the fused one once: logits agree to float16
    for cid in (f"attn-{arch}", f"attn-{arch}-unfused"):
        err = results[cid]
        assert isinstance(err, float), err
        assert err < 2e-3


def test_kernels_stay_inside_their_tensors(results):
    # a discarded out-of-bounds load passes the value checks above and faults on a GPU (bounds.py)
    assert_in_bounds(results)
