"""SDPA with additive masks built once a pass (``hpsearch.kernels._additive_mask``), CPU."""

from __future__ import annotations

import inspect

import pytest
import torch
from hpsearch.kernels import (
    fuse_packed_siblings,
    fuse_rope_attention,
    unfuse_rope_attention,
    use_additive_mask,
)
from hpsearch.kernels._additive_mask import ADDITIVE_NAME, additive_sdpa_mask, use_boolean_mask
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache


def float_model(arch: str = "llama", attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    return model


def padded_decode(model, cache_cls):
    """Prefill of two prompts, the second left-padded by 3 tokens, then two decode steps: the logits
    of every real (not padding) position."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    cache = StaticCache(config=model.config, max_cache_len=12) if cache_cls is StaticCache \
        else DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        out += [logits[0], logits[1, 3:]]
        for _ in range(2):
            nxt = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            out.append(logits[:, -1])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("cache_cls", [StaticCache, DynamicCache])
def test_same_attention_as_boolean_masks_on_real_positions(arch, cache_cls):
    model = float_model(arch)
    before = padded_decode(model, cache_cls)
    assert use_additive_mask(model) and model.config._attn_implementation == ADDITIVE_NAME
    after = padded_decode(model, cache_cls)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert use_boolean_mask(model) and model.config._attn_implementation == "sdpa"
    assert not use_boolean_mask(model)  # nothing left to undo


def test_the_mask_is_additive_in_the_model_dtype_and_absent_where_sdpa_has_none():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    sdpa = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    kwargs = {"batch_size": 1, "kv_length": 6, "mask_function": lambda b, h, q, kv: kv <= q}
    if "q_length" in inspect.signature(sdpa).parameters:  # transformers >= 5.20
        kwargs.update(q_length=1, q_offset=4)
    else:
        kwargs.update(cache_position=torch.tensor([4]))
    boolean = sdpa(**kwargs, allow_is_causal_skip=False)
    mask = additive_sdpa_mask(**kwargs, allow_is_causal_skip=False, dtype=torch.float16)
    assert mask.dtype == torch.float16 and mask.shape == boolean.shape
    assert torch.equal(mask == 0, boolean) and (mask[~boolean] == torch.finfo(torch.float16).min).all()
    # no dtype to make it additive in: SDPA's boolean mask as it is
    assert additive_sdpa_mask(**kwargs, allow_is_causal_skip=False).dtype == torch.bool


def test_other_attentions_are_left_alone():
    model = float_model(attn="eager")  # eager masks are additive already
    assert not use_additive_mask(model) and model.config._attn_implementation == "eager"
    assert not use_boolean_mask(model)


def test_fuse_rope_attention_builds_the_mask_once_and_its_undo_restores_sdpa():
    from gated_cases import tiny_model

    model = tiny_model("llama", layers=1)
    fuse_packed_siblings(model, input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert fuse_rope_attention(model) == ["model.layers.0.self_attn"]
    assert model.config._attn_implementation == ADDITIVE_NAME
    assert unfuse_rope_attention(model) == 1 and model.config._attn_implementation == "sdpa"
    # a model switched by its user keeps the switch after the undo
    use_additive_mask(model)
    assert fuse_rope_attention(model) == ["model.layers.0.self_attn"]
    assert unfuse_rope_attention(model) == 1 and model.config._attn_implementation == ADDITIVE_NAME
