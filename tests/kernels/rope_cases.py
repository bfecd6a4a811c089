"""``packed_qkv_rope`` and rope-fused attention under ``TRITON_INTERPRET=1`` (run as a script, in a
fresh process: the interpreter must be chosen before triton compiles anything); the GPU and CPU
tests import its helpers.

Prints one JSON object: case id -> the largest relative error of the query and both caches against
the unfused steps and whether the fused kernel ran (op cases), the logits' error (model cases), or
the error message.
"""

from __future__ import annotations

import torch

# (query heads, kv heads, head_dim, K, group size): grouped queries, as many kv heads as query heads,
# one kv head; head_dim 16 makes the 32-row tiles of wide_tiles_table halve to stay in one head;
# K off the tile and per-channel groups
HEADS = [(4, 2, 16, 96, 32), (3, 3, 8, 64, 64), (2, 1, 32, 100, 100)]


def rope_tables(batch: int, head_dim: int, position: int, device: str = "cpu"):
    """Llama's rotary tables ``[batch, 1, head_dim]`` (float16) at ``position`` (row b at position + b)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    f = (position + torch.arange(batch, dtype=torch.float32))[:, None, None] * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().half().to(device), emb.sin().half().to(device)


def op_case(bits, heads, batch, with_bias, position=5, length=9, device="cpu", seed=0):
    """The op and its unfused steps on fresh caches: (query error, key cache error, value cache error,
    whether the caches' other slots stayed zero, whether the fused kernel ran)."""
    import hpsearch.kernels._launch as launch
    from hpsearch.kernels import PackedLinear, packed_matmul, qkv_rope_reference
    from packed_cases import random_qsz, rel_err

    hq, hkv, d, k, g = heads
    n = (hq + 2 * hkv) * d
    q, s, z = random_qsz(n, k, g, bits, seed=seed + bits + n, device=device)
    gen = torch.Generator().manual_seed(seed + 17 * bits + batch)
    bias = torch.randn(n, generator=gen).half().to(device) if with_bias else None
    layer = PackedLinear.from_quantized(q, s, z, bits, g, bias=bias)
    x = (torch.randn(batch, 1, k, generator=gen) * 4).half().to(device)
    cos, sin = rope_tables(batch, d, position, device)
    caches = [torch.zeros(batch, hkv, length, d, dtype=torch.float16, device=device) for _ in range(4)]
    pos = torch.tensor(position, device=device)
    launched, original = [], launch._launch_rope
    launch._launch_rope = lambda *args, **kwargs: (launched.append(1), original(*args, **kwargs))[1]
    try:
        got = layer.qkv_rope(x, cos, sin, caches[0], caches[1], pos, hq, hkv)
    finally:
        launch._launch_rope = original
    ref = qkv_rope_reference(packed_matmul(x, layer.packed, bias), cos, sin, caches[2], caches[3], pos, hq, hkv)
    assert got.shape == ref.shape == (batch, 1, hq * d), (got.shape, ref.shape)
    others = [c[:, :, [i for i in range(length) if i != position]] for c in caches[:2]]
    return (rel_err(got, ref), rel_err(caches[0], caches[2]), rel_err(caches[1], caches[3]),
            all(bool((o == 0).all()) for o in others), bool(launched))


def op_cases(device: str = "cpu") -> dict[str, dict | str]:
    out: dict[str, dict | str] = {}
    # the kernel's epilogue (one row, 2-4 bits, with and without bias), then the unfused fallback
    # (two rows; 8 bits)
    grid = [(bits, heads, 1, bias) for bits in (2, 3, 4) for heads in HEADS for bias in (False, True)]
    grid += [(4, HEADS[0], 2, True), (8, HEADS[1], 1, False)]
    for bits, heads, batch, with_bias in grid:
        cid = f"op-b{bits}-h{heads[0]}x{heads[1]}x{heads[2]}-k{heads[3]}-m{batch}{'-bias' if with_bias else ''}"
        try:
            eq, ek, ev, untouched, kernel = op_case(bits, heads, batch, with_bias, device=device)
            out[cid] = {"err": max(eq, ek, ev), "kernel": kernel} if untouched else "another cache slot was written"
        except Exception as e:  # noqa: BLE001 - reported per case
            out[cid] = f"{type(e).__name__}: {e}"
    return out


def model_cases(device: str = "cpu") -> dict[str, float | str]:
    from gated_cases import decode_logits, tiny_model
    from hpsearch.kernels import fuse_packed_siblings, fuse_rope_attention, unfuse_rope_attention
    from packed_cases import rel_err

    out: dict[str, float | str] = {}
    for arch in ("llama", "qwen2"):
        try:
            model = tiny_model(arch, device)
            ref = decode_logits(model, steps=3, prompt=2)
            fuse_packed_siblings(model, input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
            names = fuse_rope_attention(model)
            assert names == ["model.layers.0.self_attn"], names
            assert type(model.model.layers[0].self_attn).__name__.startswith("Rope")
            out[f"attn-{arch}"] = rel_err(decode_logits(model, steps=3, prompt=2), ref)
            assert unfuse_rope_attention(model) == 1
            out[f"attn-{arch}-unfused"] = rel_err(decode_logits(model, steps=3, prompt=2), ref)
        except Exception as e:  # noqa: BLE001 - reported per case
            out[f"attn-{arch}"] = f"{type(e).__name__}: {e}"
    return out


if __name__ == "__main__":
    from gated_cases import print_cases

    print_cases(op_cases, model_cases)
