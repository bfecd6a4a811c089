"""Rotary embedding and the KV-cache write in the epilogue of the fused q/k/v GEMV.

Why: a packed Llama-family attention block at one token runs q/k/v as one launch
(:func:`~hpsearch.kernels.fuse_packed_siblings`), then three small kernels before attention: the
query's rotary embedding, the key's rotary embedding and cache write, the value's cache write
(1.0-1.7 us each on the H100, 3.6 us a block with 1.3 us of launch gaps: 0.15 ms of a 7B model's
2.7 ms token; kernels/NOTES.md, run 28). The one-row GEMV holds whole output values at its end: if
a program's rows alternate ``d`` and ``d + head_dim / 2`` of a head, the two values rotary
embedding mixes, it can rotate them and store the key and value straight into the static cache.

``hpsearch::packed_qkv_rope`` does this for one new token per batch row: it returns the rotated
query and writes the rotated key and the value at ``position`` of ``k_cache``/``v_cache``
(``[batch, kv_heads, length, head_dim]``, transformers' static cache layout), rounding each
projection to the activations' dtype as transformers' q/k/v do and the rotation once, as Inductor's
kernel for transformers' ``apply_rotary_pos_emb`` does. Where ``gemv_h2`` does not run (several
tokens, bfloat16, 8 bits, no Triton), it runs the same steps unfused (:func:`qkv_rope_reference`).
"""

from __future__ import annotations

import torch

from ._launch import RotaryTarget, _launch, _matmul, triton_enabled

__all__ = ["packed_qkv_rope", "qkv_rope_reference"]


def qkv_rope_reference(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, position: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
    """The steps :func:`packed_qkv_rope` folds, from the fused product ``y [batch, 1, (q_heads +
    2 kv_heads) * head_dim]``: rotate the query and key (``x * cos + rotate_half(x) * sin`` in float32,
    rounded once), write key and value at ``position`` of the caches (in place), return the query
    ``[batch, 1, q_heads * head_dim]``."""
    head_dim = k_cache.shape[-1]
    batch = y.shape[0]
    q, k, v = y.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    c = cos.reshape(cos.shape[0], 1, 1, head_dim).float()
    s = sin.reshape(sin.shape[0], 1, 1, head_dim).float()

    def rotate(t: torch.Tensor, heads: int) -> torch.Tensor:
        t32 = t.reshape(batch, 1, heads, head_dim).float()
        half = head_dim // 2
        rotated_half = torch.cat((-t32[..., half:], t32[..., :half]), dim=-1)
        return (t32 * c + rotated_half * s).to(t.dtype)

    slot = position.reshape(1).to(k_cache.device, torch.long)
    k_cache.index_copy_(2, slot, rotate(k, kv_heads).transpose(1, 2))
    v_cache.index_copy_(2, slot, v.reshape(batch, 1, kv_heads, head_dim).transpose(1, 2))
    return rotate(q, q_heads).reshape(batch, 1, q_heads * head_dim)


@torch.library.custom_op("hpsearch::packed_qkv_rope", mutates_args=("k_cache", "v_cache"))
def _packed_qkv_rope_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                        bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, cos: torch.Tensor,
                        sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                        q_heads: int, kv_heads: int) -> torch.Tensor:
    head_dim = k_cache.shape[-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = None
    if triton_enabled(x.device) and x2.shape[0] > 0 and _kernel_takes(x2, cos, sin, k_cache, v_cache, position):
        target = RotaryTarget(cos, sin, k_cache, v_cache, position, q_heads, kv_heads, head_dim)
        q = _launch(x2, qweight, scales, qzeros, bias, bits, group_size, in_features, None, rope=target)
    if q is None:  # the same steps, unfused
        y = _matmul(x2, qweight, scales, qzeros, bias, bits, group_size, in_features, None)
        q = qkv_rope_reference(y.reshape(x.shape[0], 1, -1), cos, sin, k_cache, v_cache, position, q_heads, kv_heads)
    return q.reshape(*x.shape[:-1], q_heads * head_dim)


@_packed_qkv_rope_op.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, in_features, cos, sin, k_cache, v_cache, position,
      q_heads, kv_heads):
    return x.new_empty(*x.shape[:-1], q_heads * k_cache.shape[-1])


def _kernel_takes(x2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, position: torch.Tensor) -> bool:
    """Whether ``gemv_h2_rope_kernel`` can address these tensors (unit last strides, one layout for
    both caches and both tables, one dtype)."""
    return (x2.shape[0] == k_cache.shape[0] and cos.shape[0] in (1, x2.shape[0]) and position.device == x2.device
            and cos.stride() == sin.stride() and cos.stride(-1) == 1 and k_cache.stride(-1) == 1
            and k_cache.stride() == v_cache.stride() and k_cache.dtype == v_cache.dtype == x2.dtype)


def packed_qkv_rope(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                    bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                    q_heads: int, kv_heads: int) -> torch.Tensor:
    """The rotated query ``[batch, 1, q_heads * head_dim]`` of one new token per batch row, for a
    packed weight whose rows are ``[q | k | v]`` heads; the rotated key and the value are written at
    ``position`` (a 0-dim integer tensor) of ``k_cache``/``v_cache`` ``[batch, kv_heads, length,
    head_dim]``. ``cos``/``sin``: the token's rotary tables ``[batch or 1, 1, head_dim]``."""
    head_dim = k_cache.shape[-1]
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"x must be [batch, 1, features] (one new token per row), got {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    if head_dim % 2 or scales.shape[0] != (q_heads + 2 * kv_heads) * head_dim:
        raise ValueError(f"the weight's {scales.shape[0]} rows are not q/k/v heads of {head_dim} "
                         f"({q_heads} + 2 x {kv_heads} heads; head_dim must be even)")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (x.shape[0], kv_heads):
        raise ValueError(f"k_cache and v_cache must be [{x.shape[0]}, {kv_heads}, length, {head_dim}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if cos.shape != sin.shape or cos.shape[-1] != head_dim or cos.numel() not in (head_dim, x.shape[0] * head_dim):
        raise ValueError(f"cos and sin must be [batch or 1, 1, {head_dim}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if position.dim() != 0 or position.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position must be a 0-dim integer tensor, got {position.dtype} of shape {tuple(position.shape)}")
    return torch.ops.hpsearch.packed_qkv_rope(x, qweight, scales, qzeros, bias, bits, group_size, in_features,
                                              cos, sin, k_cache, v_cache, position, q_heads, kv_heads)
