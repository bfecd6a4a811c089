"""The decode attention kernels against PyTorch's SDPA (math) under ``TRITON_INTERPRET=1``, and
tiny transformers models decoding with them against the same models on SDPA (run as a script,
in a fresh process: the interpreter must be chosen before triton compiles anything).

Prints one JSON object: case id -> relative error (or the error message), and for the models
``hf_<arch>`` -> ``{"err": ..., "op_calls": ..., "expected_calls": ...}``.
"""

from __future__ import annotations

import json
import os
import sys

# (id, batch, heads, kv heads, query tokens, kv length, head dim, dtype, mask, query layout)
# mask: "none", "bool" (trailing unused slots, a valid length per sequence), "float" (additive,
# -inf on the unused slots plus a random bias), "float_heads" (additive, one row per head, float16),
# "empty" (sequence 1 attends to nothing: zeros, as SDPA gives). layout: "hf" (a transposed view
# [B, Q, H, D] -> [B, H, Q, D], as transformers gives), "contiguous".
CASES = [
    (f"{'mha' if h == hkv else 'gqa'}-d{d}-s{s}-{mask}-{dt}", 2 if mask == "bool" else 1, h, hkv, 1, s, d, dt, mask,
     "hf")
    for h, hkv in ((4, 4), (8, 2))
    for d in (64, 80)
    for s in (37, 300)  # one tile, one split (no combine); several splits, the last tile partial
    for mask, dt in zip(("none", "bool", "float"),
                        ("float16", "float32", "float16") if d == 64 else ("float32", "float16", "float32"))
] + [
    ("mha-d64-s150-bool-bfloat16", 2, 4, 4, 1, 150, 64, "bfloat16", "bool", "hf"),
    ("gqa-d64-s150-float-bfloat16", 2, 8, 2, 1, 150, 64, "bfloat16", "float", "hf"),
    ("mha-d128-s150-bool-float16-contiguous", 1, 4, 4, 1, 150, 128, "float16", "bool", "contiguous"),
    ("gqa-d96-s129-bool-float16", 1, 8, 2, 1, 129, 96, "float16", "bool", "hf"),
    ("gqa4-d256-s100-none-float16", 1, 8, 2, 1, 100, 256, "float16", "none", "hf"),
    ("gqa7-d64-s90-bool-float32", 1, 14, 2, 1, 90, 64, "float32", "bool", "hf"),  # 7 heads a group: 16 rows
    ("mha-d64-s150-float_heads-float16", 2, 4, 4, 1, 150, 64, "float16", "float_heads", "hf"),
    ("gqa-d64-s150-float_heads-float32", 2, 8, 2, 1, 150, 64, "float32", "float_heads", "hf"),
    ("mha-d64-s150-empty-float32", 2, 4, 4, 1, 150, 64, "float32", "empty", "hf"),
    ("gqa-d64-s37-empty-float16", 2, 8, 2, 1, 37, 64, "float16", "empty", "hf"),
    ("mha-q3-d64-s200-bool-float32", 2, 4, 4, 3, 200, 64, "float32", "bool", "hf"),  # a few new tokens
    ("gqa-q3-d80-s200-float-float16", 1, 8, 2, 3, 200, 80, "float16", "float", "hf"),
]

#: tiny models (tests/conftest.py) decoding through transformers: llama with 4 kv heads (one row a
#: program), qwen2 (grouped, q/k/v biases), mistral (one kv head for 4)
HF_ARCHES = ("llama", "qwen2", "mistral")
HF_STEPS = 3


def _inputs(case):
    import torch

    _, b, h, hkv, q_len, s, d, dt, mask_kind, layout = case
    gen = torch.Generator().manual_seed(hash((h, hkv, s, d)) % 2**31)
    dtype = getattr(torch, dt)
    if layout == "hf":
        query = torch.randn(b, q_len, h, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        query = torch.randn(b, h, q_len, d, generator=gen).to(dtype)
    key = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    value = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    valid = torch.tensor([s - s // 3, s // 5 + 1])[:b]  # filled slots per sequence (a static cache)
    slots = torch.arange(s)
    # causal over the new tokens: token t of q_len sees the slots before valid - q_len + 1 + t
    limit = valid[:, None] - q_len + 1 + torch.arange(q_len)[None, :]
    attend = slots[None, None, :] < limit[:, :, None]  # [B, Q, S]
    mask = None
    if mask_kind == "bool":
        mask = attend[:, None]
    elif mask_kind == "empty":
        attend[1:] = False
        mask = attend[:, None]
    elif mask_kind == "float":
        bias = torch.randn(b, 1, q_len, s, generator=gen)
        mask = torch.where(attend[:, None], bias, float("-inf"))
    elif mask_kind == "float_heads":
        bias = torch.randn(b, h, q_len, s, generator=gen)
        mask = torch.where(attend[:, None], bias, torch.finfo(torch.float16).min).half()
    return query, key, value, mask


def _kernel_error(case) -> float:
    import torch
    from hpsearch.kernels import decode_attention
    from hpsearch.kernels._attention import decode_attention_reference
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query, key, value, mask = _inputs(case)
    out = decode_attention(query, key, value, mask, scale=0.3)
    b, h, q_len, d = query.shape
    assert out.shape == (b, q_len, h, d) and out.dtype == query.dtype and out.is_contiguous()
    float_mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    with sdpa_kernel(SDPBackend.MATH):
        ref = decode_attention_reference(query.float(), key.float(), value.float(), float_mask, scale=0.3)
    if case[8] == "empty":  # both give exact zeros for the sequence with nothing to attend to
        assert torch.equal(out[1].float(), ref[1]) and not ref[1].any()
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def _decode_logits(model, ids, attention_mask, steps: int) -> list:
    """Prefill, then ``steps`` greedy tokens with a StaticCache: every step's logits."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 5)
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits
        out.append(logits)
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
            logits = model(input_ids=nxt, attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits
            out.append(logits)
    return out


def _hf_case(arch: str) -> dict:
    """A tiny ``arch`` model, batch 2 (sequence 1 left-padded by 3): logits of SDPA vs ours."""
    import torch
    from conftest import small_config
    from hpsearch.kernels import use_decode_attention
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = small_config(arch, 128)
    if arch == "llama":
        config.num_key_value_heads = config.num_attention_heads  # multi-head: the one-row kernel
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    ref = _decode_logits(model, ids, attention_mask, HF_STEPS)
    assert use_decode_attention(model), "use_decode_attention refused the model"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = _decode_logits(model, ids, attention_mask, HF_STEPS)
    calls = sum(e.count for e in prof.key_averages() if e.key == "hpsearch::decode_attention")
    err = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref))
    return {"err": err, "op_calls": calls, "expected_calls": HF_STEPS * config.num_hidden_layers}


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from hpsearch.kernels import triton_enabled

    assert triton_enabled(torch.device("cpu"))
    out = {}
    for case in CASES:
        try:
            out[case[0]] = _kernel_error(case)
        except Exception as e:  # noqa: BLE001 - reported per case
            out[case[0]] = f"{type(e).__name__}: {e}"
    for arch in HF_ARCHES:
        try:
            out[f"hf_{arch}"] = _hf_case(arch)
        except Exception as e:  # noqa: BLE001 - reported per case
            out[f"hf_{arch}"] = f"{type(e).__name__}: {e}"
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
