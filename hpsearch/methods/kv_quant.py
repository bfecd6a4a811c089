"""Group-wise quantization of the KV cache (KIVI / KVQuant-style), as pure tensor functions.

Keys and values are ``[B, H_kv, T, D]`` (batch, KV heads, tokens, head dim), as transformers'
attention modules hand them to the attention function (keys after RoPE). A group shares a
float16 scale ``s`` and a float16 offset ``m``: ``x_hat = q * s + m`` with ``b``-bit codes ``q``
(KIVI's format: asymmetric ``m = min``, ``s = (max - min) / (2^b - 1)``; symmetric ``m = -2^(b-1) s``,
``s = 2 max|x| / (2^b - 1)``, ``m`` not stored). Unlike the weight grid's integer zero, a float
offset keeps groups whose values all share one sign (a key channel with a large mean, the outlier
channels of KIVI Sec. 3.1) on the grid. Two axes can form a group:

* ``token``: one token's ``g`` contiguous channels form a group (per-token quantization);
* ``channel``: one channel's ``G`` consecutive tokens form a group (per-channel quantization;
  KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750, Sec. 3.2: keys have outlier
  *channels*, so keys are quantized per channel and values per token).

A layout names the axis of K and of V (:data:`LAYOUTS`). The most recent ``R`` tokens stay exact
(KIVI's residual, "full precision sliding window", Algorithm 1). A per-channel key group is
quantized only once all its ``G`` tokens are older than the window, so up to ``G - 1`` extra keys
are held exact.

*When* a cached token is read quantized is fixed by :func:`exact_masks`: a query that was
processed when the cache held ``n`` tokens (its chunk's start; every query is its own chunk in
token-by-token decoding) reads value ``j`` exact iff ``j >= n - R`` and key ``j`` exact iff its
group is not yet complete below ``n - R``. The cache of :mod:`hpsearch.kvcache` stores codes under
exactly this rule, and :func:`kv_attention` computes the same attention for a whole sequence in
one pass, so both evaluation paths read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


__all__ = [
    "KV_BITS",
    "LAYOUTS",
    "KVFormat",
    "QuantizedKV",
    "quantize_kv",
    "dequantize_kv",
    "fake_quantize_kv",
    "exact_masks",
    "kv_attention",
    "token_bytes",
]

#: Bit-widths of K or V; 16 leaves them exact.
KV_BITS = (2, 3, 4, 8, 16)

#: Layout name -> (key axis, value axis).
LAYOUTS: dict[str, tuple[str, str]] = {
    "kivi": ("channel", "token"),
    "per_token": ("token", "token"),
}


@dataclass(frozen=True)
class KVFormat:
    """How one layer's K and V are stored.

    Args:
        k_bits, v_bits: bit-widths (16: exact).
        group_size: tokens per group on the ``channel`` axis, channels per group on the ``token``
            axis (the whole head dim when -1 or when it does not divide the head dim).
        layout: a key of :data:`LAYOUTS`.
        sym: symmetric grids.
        residual: recent tokens kept exact (``R``).
    """

    k_bits: int = 16
    v_bits: int = 16
    group_size: int = 32
    layout: str = "kivi"
    sym: bool = False
    residual: int = 128

    @property
    def k_axis(self) -> str:
        return LAYOUTS[self.layout][0]

    @property
    def v_axis(self) -> str:
        return LAYOUTS[self.layout][1]

    @property
    def exact(self) -> bool:
        return self.k_bits >= 16 and self.v_bits >= 16

    def group(self, axis: str, head_dim: int) -> int:
        """Group size along ``axis`` for a head dim of ``head_dim``."""
        g = self.group_size
        if axis == "token":
            return head_dim if g <= 0 or g >= head_dim or head_dim % g else g
        if g <= 0:
            raise ValueError("a per-channel group needs a positive group_size (tokens per group)")
        return g


@dataclass
class QuantizedKV:
    """Codes of ``[B, H, T, D]`` states: ``q`` uint8 in that shape (``[B, H, D, T]`` on the
    ``channel`` axis), ``scale``/``offset`` (float16) one per group along the last dim of ``q``."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bits: int
    group: int
    axis: str

    @property
    def tokens(self) -> int:
        return self.q.shape[-1] if self.axis == "channel" else self.q.shape[-2]


def _rows(x: torch.Tensor, axis: str) -> torch.Tensor:
    """``[B, H, T, D]`` -> the tensor whose last dim is grouped (tokens for ``channel``)."""
    return x.transpose(-1, -2) if axis == "channel" else x


def quantize_kv(x: torch.Tensor, bits: int, group: int, axis: str, sym: bool) -> QuantizedKV:
    """Round-to-nearest codes of ``x`` (``[B, H, T, D]``) on a min-max grid per group.

    On the ``channel`` axis ``T`` must be a multiple of ``group``.
    """
    r = _rows(x.float(), axis)
    if r.shape[-1] % group:
        raise ValueError(f"group={group} does not divide {r.shape[-1]} ({axis} axis)")
    g = r.reshape(*r.shape[:-1], r.shape[-1] // group, group)
    maxq = 2**bits - 1
    if sym:
        scale = (2 * g.abs().amax(dim=-1) / maxq).half().float().clamp_min(2.0**-24)
        offset = -float(2 ** (bits - 1)) * scale
    else:
        low = g.amin(dim=-1)
        scale = ((g.amax(dim=-1) - low) / maxq).half().float().clamp_min(2.0**-24)
        offset = low.half().float()
    q = torch.round((g - offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, maxq)
    return QuantizedKV(q.reshape(r.shape).to(torch.uint8), scale.half(), offset.half(), bits, group, axis)


def dequantize_kv(qkv: QuantizedKV, dtype: torch.dtype) -> torch.Tensor:
    """``(q - z) * s`` back in ``[B, H, T, D]``."""
    shape = qkv.q.shape
    g = qkv.q.float().reshape(*shape[:-1], shape[-1] // qkv.group, qkv.group)
    x = g * qkv.scale.float().unsqueeze(-1) + qkv.offset.float().unsqueeze(-1)
    return _rows(x.reshape(shape), qkv.axis).to(dtype)


def fake_quantize_kv(x: torch.Tensor, bits: int, group: int, axis: str, sym: bool) -> torch.Tensor:
    """``dequantize(quantize(x))``; on the ``channel`` axis only complete token groups are
    quantized (a trailing partial group is returned as it is: it is never read quantized)."""
    if bits >= 16:
        return x
    if axis == "channel":
        t = x.shape[-2] // group * group
        if t == 0:
            return x
        head = dequantize_kv(quantize_kv(x[..., :t, :], bits, group, axis, sym), x.dtype)
        return torch.cat([head, x[..., t:, :]], dim=-2)
    return dequantize_kv(quantize_kv(x, bits, group, axis, sym), x.dtype)


def exact_masks(q_len: int, kv_len: int, fmt: KVFormat, chunk: int,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cached keys and values each query reads exact (``[q_len, kv_len]`` bools each).

    The queries are the last ``q_len`` of ``kv_len`` tokens, processed ``chunk`` at a time: query
    ``a`` saw a cache of ``n(a) = kv_len - q_len + floor(a / chunk) * chunk`` tokens, and token
    ``j >= n(a)`` is its own chunk's (exact). Older tokens are exact inside the residual window,
    ``j >= n - R`` (per token); a per-channel key group ``[kG, (k+1)G)`` is quantized only once
    ``(k+1)G <= n - R`` (KIVI, Algorithm 1: keys are grouped along tokens).
    """
    a = torch.arange(q_len, device=device)
    n = (kv_len - q_len + torch.div(a, chunk, rounding_mode="floor") * chunk).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    window = n - fmt.residual
    exact_token = j >= window
    if fmt.k_axis == "channel":
        g = fmt.group("channel", 1)
        exact_k = (torch.div(j, g, rounding_mode="floor") + 1) * g > window
    else:
        exact_k = exact_token
    return exact_k, exact_token


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, *, scaling: float, fmt: KVFormat, chunk: int = 1,
                 softcap: float | None = None, dropout: float = 0.0,
                 training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention in which every query reads the quantized past, with exact recent tokens.

    ``S_ij = q_i . k~_ij * scaling``, ``k~_ij = k_j`` where :func:`exact_masks` says exact and
    ``Q(k)_j`` otherwise; ``o_i = sum_j softmax(S_i)_j v~_ij`` likewise. Equal to what
    chunked prefill through the quantized cache computes, in one pass over the sequence.

    Args:
        query: ``[B, H, Tq, D]``; key, value: ``[B, H_kv, Tk, D]`` (the last ``Tq`` are the queries').
        attention_mask: additive ``[B, 1|H, Tq, Tk]`` float mask, a boolean one (True = attend),
            or ``None`` for plain causal.

    Returns:
        ``(output [B, Tq, H, D], weights [B, H, Tq, Tk])``, as transformers' attention functions.
    """
    n_rep = query.shape[1] // key.shape[1]
    q_len, kv_len, d = query.shape[2], key.shape[2], key.shape[3]
    exact_k, exact_v = exact_masks(q_len, kv_len, fmt, chunk, query.device)
    k = _repeat_kv(key, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3))
    if fmt.k_bits < 16 and not bool(exact_k.all()):
        k_hat = _repeat_kv(fake_quantize_kv(key, fmt.k_bits, fmt.group(fmt.k_axis, d), fmt.k_axis, fmt.sym), n_rep)
        scores = torch.where(exact_k, scores, torch.matmul(query, k_hat.transpose(2, 3)))
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    v = _repeat_kv(value, n_rep)
    if fmt.v_bits < 16 and not bool(exact_v.all()):
        v_hat = _repeat_kv(fake_quantize_kv(value, fmt.v_bits, fmt.group(fmt.v_axis, d), fmt.v_axis, fmt.sym), n_rep)
        old = weights.masked_fill(exact_v, 0)
        out = torch.matmul(weights - old, v) + torch.matmul(old, v_hat)
    else:
        out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous(), weights


def _side_bytes(bits: int, group: int, n_kv_heads: int, head_dim: int, dtype_bytes: int, sym: bool) -> float:
    """Bytes per token of K or V of one layer: codes plus its share of scales and offsets."""
    values = n_kv_heads * head_dim
    if bits >= 16:
        return float(values * dtype_bytes)
    # groups per token: D/g per head on the token axis, 1/G per channel on the channel axis
    groups = values / group
    per_group = 2 if sym else 4  # float16 scale (+ float16 offset when asymmetric)
    return values * bits / 8 + groups * per_group


def token_bytes(fmt: KVFormat, n_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Per-token storage of one layer's K and V.

    Returns:
        ``{"quantized": bytes of a token older than the window (codes, scales, offsets),
        "exact": bytes of a token in the window, "key_pending": extra bytes of one key token held
        exact while its per-channel group fills (0 on the token axis)}``.
    """
    k = _side_bytes(fmt.k_bits, fmt.group(fmt.k_axis, head_dim), n_kv_heads, head_dim, dtype_bytes, fmt.sym)
    v = _side_bytes(fmt.v_bits, fmt.group(fmt.v_axis, head_dim), n_kv_heads, head_dim, dtype_bytes, fmt.sym)
    exact_side = float(n_kv_heads * head_dim * dtype_bytes)
    pending = exact_side - k if fmt.k_axis == "channel" and fmt.k_bits < 16 else 0.0
    return {"quantized": k + v, "exact": 2 * exact_side, "key_pending": pending}
