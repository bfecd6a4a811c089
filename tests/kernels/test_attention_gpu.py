"""The decode attention kernels on a GPU: 7B shapes against SDPA, CUDA graph capture, tiny
transformers models decoding as with SDPA, eager and under ``torch.compile(mode="reduce-overhead")``."""

from __future__ import annotations

import pytest
import torch
from attention_cases import _decode_logits
from conftest import small_config
from hpsearch.kernels import decode_attention, use_decode_attention
from hpsearch.kernels._attention import ATTN_NAME, decode_attention_reference
from torch.nn.attention import SDPBackend, sdpa_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}  # of max |output|


def _inputs(b, h, hkv, s, d, dtype, valid=None, q_len=1, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    query = torch.randn(b, q_len, h, d, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    key = torch.randn(b, hkv, s, d, device="cuda", generator=gen).to(dtype)
    value = torch.randn(b, hkv, s, d, device="cuda", generator=gen).to(dtype)
    mask = None
    if valid is not None:  # a static cache: slots past each sequence's length are unused
        slots = torch.arange(s, device="cuda")
        limit = torch.tensor(valid, device="cuda")[:, None] - q_len + 1 + torch.arange(q_len, device="cuda")
        mask = (slots[None, None, :] < limit[:, :, None])[:, None]  # [B, 1, Q, S]
    return query, key, value, mask


def _rel_err(out, query, key, value, mask, scale=None) -> float:
    with sdpa_kernel(SDPBackend.MATH):
        ref = decode_attention_reference(query.float(), key.float(), value.float(),
                                         mask if mask is None or mask.dtype == torch.bool else mask.float(), scale)
    assert torch.isfinite(out).all()
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("s", [328, 2048, 4096])
@pytest.mark.parametrize("hkv", [32, 8])
@pytest.mark.parametrize("masked", [True, False])
def test_7b_shapes_match_sdpa(dtype, s, hkv, masked):
    """Llama-2-7B (32 heads) and Llama-3-8B (8 kv heads) decode shapes, head_dim 128."""
    query, key, value, mask = _inputs(1, 32, hkv, s, 128, dtype, valid=[s - 72] if masked else None)
    out = decode_attention(query, key, value, mask)
    assert out.shape == (1, 1, 32, 128) and out.dtype == dtype
    assert _rel_err(out, query, key, value, mask) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("h,hkv", [(16, 16), (28, 4), (32, 8)])
def test_head_dims_groups_and_batches(dtype, d, h, hkv):
    """Batch 3 with other valid lengths, a cache length no tile divides."""
    query, key, value, mask = _inputs(3, h, hkv, 1000, d, dtype, valid=[1000, 517, 3], seed=d + h)
    assert _rel_err(decode_attention(query, key, value, mask, scale=0.1), query, key, value, mask, 0.1) < TOL[dtype]


@pytest.mark.parametrize("hkv", [32, 8])
def test_additive_mask_and_a_few_tokens(hkv):
    query, key, value, mask = _inputs(2, 32, hkv, 700, 128, torch.float16, valid=[650, 90], q_len=4)
    bias = torch.randn(mask.shape, device="cuda")
    fmask = torch.where(mask, bias, torch.finfo(torch.float16).min).half()
    assert _rel_err(decode_attention(query, key, value, fmask), query, key, value, fmask) < TOL[torch.float16]


def test_fully_masked_sequence_gives_zeros():
    query, key, value, mask = _inputs(2, 32, 8, 328, 128, torch.float16, valid=[200, 0])
    out = decode_attention(query, key, value, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert _rel_err(out[:1], query[:1], key[:1], value[:1], mask[:1]) < TOL[torch.float16]


def test_cuda_graph_replay_equals_eager():
    query, key, value, mask = _inputs(1, 32, 32, 2048, 128, torch.float16, valid=[1500])
    eager = decode_attention(query, key, value, mask)  # compiles the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(query, key, value, mask)
    query.copy_(torch.randn_like(query))
    mask[..., 1500:1600] = True  # the next token's slots: read by value, not baked into the graph
    graph.replay()
    torch.testing.assert_close(out, decode_attention(query, key, value, mask))
    assert not torch.equal(out, eager)


def _tiny(arch: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = small_config(arch, 128)
    if arch == "llama":
        config.num_key_value_heads = config.num_attention_heads  # multi-head: the one-row kernel
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).to("cuda", dtype).eval()


def _op_calls(prof) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == "hpsearch::decode_attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_decode_matches_sdpa(arch, dtype):
    from torch.profiler import ProfilerActivity, profile

    model = _tiny(arch, dtype)
    ids = torch.randint(0, 128, (2, 11), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0  # left padding
    ref = _decode_logits(model, ids, attention_mask, 3)
    assert use_decode_attention(model) and model.config._attn_implementation == ATTN_NAME
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = _decode_logits(model, ids, attention_mask, 3)
    assert _op_calls(prof) == 3 * model.config.num_hidden_layers
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for g, r in zip(got, ref):
        assert ((g.float() - r.float()).abs().max() / r.float().abs().max()).item() < tol


def test_compiled_decode_step_equals_eager():
    """``torch.compile(mode="reduce-overhead", fullgraph=True)`` of a decode step (CUDA graphs)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    model = _tiny("qwen2", torch.float32)
    assert use_decode_attention(model)
    ids = torch.randint(0, 128, (1, 9), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    eager_cache = StaticCache(config=model.config, max_cache_len=32)
    graph_cache = StaticCache(config=model.config, max_cache_len=32)

    def step(tok: torch.Tensor, cache) -> torch.Tensor:
        return model(input_ids=tok, past_key_values=cache, use_cache=True).logits

    compiled = torch.compile(lambda tok: step(tok, graph_cache), mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        tok = model(input_ids=ids, past_key_values=eager_cache, use_cache=True).logits[:, -1:].argmax(-1)
        model(input_ids=ids, past_key_values=graph_cache, use_cache=True)
        for i in range(5):  # the first calls warm up, record and then replay the graph
            want = step(tok, eager_cache)
            if i == 0:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    got = compiled(tok.clone()).clone()
                assert _op_calls(prof) >= model.config.num_hidden_layers  # the op is in the graph
            else:
                got = compiled(tok.clone()).clone()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            tok = want[:, -1:].argmax(-1)
