"""Decode attention on CPU without the interpreter: the op's reference path, its compile capture,
argument checks, and how a transformers model is switched to it (or left alone)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config
from hpsearch.kernels import decode_attention, use_decode_attention
from hpsearch.kernels._attention import ATTN_NAME, decode_attention_forward
from transformers import AutoModelForCausalLM


def _qkv(b=2, h=8, hkv=2, s=40, d=32, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(b, 1, h, d, generator=gen).to(dtype).transpose(1, 2)  # as transformers gives it
    return query, torch.randn(b, hkv, s, d, generator=gen).to(dtype), torch.randn(b, hkv, s, d, generator=gen).to(dtype)


def test_op_output_layout_and_values():
    query, key, value = _qkv()
    mask = torch.arange(40)[None, None, None, :] < torch.tensor([30, 9])[:, None, None, None]
    out = decode_attention(query, key, value, mask)
    assert out.shape == (2, 1, 8, 32) and out.is_contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_captures_the_op():
    query, key, value = _qkv(dtype=torch.float16)
    mask = torch.zeros(2, 1, 1, 40)
    mask[..., 25:] = float("-inf")
    compiled = torch.compile(lambda q, k, v, m: decode_attention(q, k, v, m, scale=0.2), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(query, key, value, mask), decode_attention(query, key, value, mask, 0.2))


@pytest.mark.parametrize("shapes,match", [
    (((1, 8, 1, 32), (1, 3, 40, 32)), "does not match"),  # 8 heads over 3 kv heads
    (((1, 8, 1, 32), (1, 2, 40, 16)), "does not match"),
    (((1, 8, 1, 512), (1, 2, 40, 512)), "head_dim"),
])
def test_bad_shapes_are_refused(shapes, match):
    (qs, ks) = shapes
    with pytest.raises(ValueError, match=match):
        decode_attention(torch.randn(qs), torch.randn(ks), torch.randn(ks))


def test_int_mask_is_refused():
    query, key, value = _qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        decode_attention(query, key, value, torch.ones(2, 1, 1, 40, dtype=torch.int64))


def test_unsupported_kwargs_go_to_sdpa():
    """Soft-capping is transformers' SDPA's to refuse: the call was handed over, not computed."""
    query, key, value = _qkv()
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="softcap"):
        decode_attention_forward(module, query, key, value, None, softcap=30.0)


def _tiny(arch: str, attn: str):
    torch.manual_seed(0)
    config = small_config(arch, 128)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_model_not_on_sdpa_is_left_alone():
    model = _tiny("llama", "eager")
    assert use_decode_attention(model) is False
    assert model.config._attn_implementation == "eager"


def test_use_decode_attention_switches_an_sdpa_model():
    model = _tiny("qwen2", "sdpa")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    assert use_decode_attention(model) is True
    assert model.config._attn_implementation == ATTN_NAME
    assert use_decode_attention(model) is True  # already switched
    with torch.no_grad():  # prefill is SDPA's: the same logits
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_a_model_on_additive_masks_switches_too():
    """pack_model's rope fusion leaves a model on SDPA with additive masks; the split-KV attention
    may still take it over (its own mask builder is registered with it)."""
    from hpsearch.kernels import use_additive_mask

    model = _tiny("llama", "sdpa")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    assert use_additive_mask(model) is True
    assert use_decode_attention(model) is True and model.config._attn_implementation == ATTN_NAME
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
