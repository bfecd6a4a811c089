"""Triton kernels of split-KV ("flash-decoding") attention: a few query rows over a KV cache.

Dao et al., "Flash-Decoding for long-context inference" (2023): at one new token, one program per
head has too little work to fill a GPU (32 heads of a 7B Llama are 32 programs on 132 SMs), so the
cache's length is cut into ``SPLITS`` chunks, each program attends over its chunk with an online
softmax, and a second kernel merges the chunks' partial results.

- :func:`split_kernel` (grid: ``batch * kv_heads`` x ``SPLITS``): the query rows that share one
  key/value head (``G = heads // kv_heads`` heads times ``Q`` query tokens) attend over
  ``[split * CHUNK, (split + 1) * CHUNK)`` of the cache in tiles of ``BLOCK_N`` keys, in float32
  with base-2 exponentials (``scale * log2(e)`` folded into the scores). One row (multi-head
  attention at one token) uses CUDA cores (products and sums in float32); several rows use
  ``tl.dot`` on ``ROWS >= 16`` padded rows, with probabilities rounded to the cache's dtype for the
  second product, as FlashAttention does. It writes the running maximum ``m``, the sum ``l`` and
  the unnormalised ``acc`` of every row to float32 scratch, or, with ``FINAL`` (one split), the
  output itself.
- :func:`combine_kernel` (grid: one program per output row): ``o = sum_s 2^(m_s - M) acc_s /
  sum_s 2^(m_s - M) l_s`` with ``M = max_s m_s``.

A row whose keys are all masked gets zeros, as PyTorch's SDPA (math) gives; masked scores are
``-inf`` and every exponential is taken against a finite stand-in for an infinite maximum.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["combine_kernel", "split_kernel"]

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr, acc_ptr,
                 S, CHUNK, SPLITS, HKV, qk_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_mt, stride_ms,
                 G: tl.constexpr, Q: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr, MASK_KIND: tl.constexpr,
                 IEEE: tl.constexpr, FINAL: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Rows ``r = g * Q + t`` (head ``kv_head * G + g``, query token ``t``) over one chunk of keys.

    ``MASK_KIND``: 0 none, 1 boolean (nonzero = attend), 2 additive float. ``IEEE``: ``tl.dot`` on
    float32 copies (float32 inputs; bfloat16 in the interpreter, whose ``tl.dot`` mishandles it).
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = (pid_bh % HKV).to(tl.int64)
    r = tl.arange(0, ROWS)
    row_ok = r < G * Q
    rc = tl.minimum(r, G * Q - 1)  # padded rows read row G*Q-1 and are never stored
    t = rc % Q
    h = kvh * G + rc // Q
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qf = q.to(tl.float32)  # the one-row and float32 products
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    mask_rows = mask_ptr + b * stride_mb + h * stride_mh + t * stride_mt  # [ROWS]
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, S)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None].to(tl.int64) * stride_ks + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + n[:, None].to(tl.int64) * stride_vs + d[None, :], mask=kv_ok, other=0.0)
        if ROWS == 1:
            # one row on CUDA cores: scores [BLOCK_N], the row's state in [1]-shaped tensors
            s = tl.sum(qf * k.to(tl.float32), axis=1) * qk_scale
            ok = n_ok
            mask_ptrs = mask_ptr + b * stride_mb + kvh * stride_mh + n * stride_ms
            if MASK_KIND == 1:
                ok = ok & (tl.load(mask_ptrs, mask=n_ok, other=0) != 0)
            if MASK_KIND == 2:
                s += tl.load(mask_ptrs, mask=n_ok, other=0.0).to(tl.float32) * LOG2E
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha[:, None] + tl.sum(p[:, None] * v.to(tl.float32), axis=0)[None, :]
        else:
            if IEEE:
                s = tl.dot(qf, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale
            ok = row_ok[:, None] & n_ok[None, :]
            mask_ptrs = mask_rows[:, None] + n[None, :] * stride_ms
            if MASK_KIND == 1:
                ok = ok & (tl.load(mask_ptrs, mask=ok, other=0) != 0)
            if MASK_KIND == 2:
                s += tl.load(mask_ptrs, mask=ok, other=0.0).to(tl.float32) * LOG2E
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
        m_i = m_new
    if FINAL:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # all keys masked: l = 0, acc = 0
        o_rows = ((b * Q + t) * (HKV * G) + h) * D
        tl.store(o_ptr + o_rows[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        idx = (pid_bh * SPLITS + split).to(tl.int64) * (G * Q) + r
        tl.store(m_ptr + idx, m_i, mask=row_ok)
        tl.store(l_ptr + idx, l_i, mask=row_ok)
        tl.store(acc_ptr + idx[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def combine_kernel(o_ptr, m_ptr, l_ptr, acc_ptr, SPLITS, HKV,
                   G: tl.constexpr, Q: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLITS_P2: tl.constexpr):
    """Output row ``(b, t, h)`` from its ``SPLITS`` partial results (grid axis 0: ``b, h_kv, r``)."""
    pid = tl.program_id(0)
    pid_bh = pid // (G * Q)
    r = pid % (G * Q)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64) * G + r // Q
    t = r % Q
    sp = tl.arange(0, SPLITS_P2)
    sp_ok = sp < SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    idx = (pid_bh * SPLITS + sp).to(tl.int64) * (G * Q) + r
    m = tl.load(m_ptr + idx, mask=sp_ok, other=float("-inf"))
    l = tl.load(l_ptr + idx, mask=sp_ok, other=0.0)
    acc = tl.load(acc_ptr + idx[:, None] * D + d[None, :], mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty or masked chunks
    denom = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + ((b * Q + t) * (HKV * G) + h) * D + d, o.to(o_ptr.dtype.element_ty), mask=d_ok)
