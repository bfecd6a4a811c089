"""Attention of a few new query tokens over a KV cache: the ``hpsearch::decode_attention`` op and
the transformers attention function built on it.

Why: at batch 1 a decode step's SDPA call is one program per head (32 on a 132-SM H100 for a 7B
Llama), each reading its whole slice of the cache; PyTorch's kernels then take ~8 us per layer for
~2 us worth of bytes. Splitting the cache's length over programs (``_attention_kernels``) fills the
GPU. The op is opaque to ``torch.compile`` (a fake implementation gives its shape), free of host
synchronisation and of value-dependent shapes, so CUDA graphs capture it once its kernels are
compiled. It runs the Triton kernels on CUDA tensors and on CPU tensors when ``TRITON_INTERPRET=1``
was set before the first call, and :func:`decode_attention_reference` elsewhere.

:func:`use_decode_attention` switches a loaded transformers model to
:func:`decode_attention_forward`, which runs the op for one new token and hands every other call
(prefill, dropout, soft-capping, ...) to transformers' own SDPA attention:

.. code-block:: python

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa")
    use_decode_attention(model)   # True: decode steps now run hpsearch::decode_attention
"""

from __future__ import annotations

import functools
import inspect
import math
import sys

import torch

from ._launch import triton_enabled  # one interpreter switch for every kernel module

__all__ = ["ATTN_NAME", "decode_attention", "decode_attention_forward", "decode_attention_reference",
           "register_decode_attention", "use_decode_attention"]

#: the name under which :func:`decode_attention_forward` is registered in transformers
ATTN_NAME = "hpsearch_decode"

#: attention kwargs of transformers models that change the result and that the kernel does not
#: take: soft-capping (Gemma 2), attention sinks (gpt-oss), position bias (T5-like), paged caches
_DELEGATED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "cache")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
#: programs per launch on CPU (the interpreter): enough that the tests' shapes split the cache
_CPU_PROGRAMS = 32


def decode_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """What :func:`decode_attention` computes, with PyTorch's SDPA: ``[B, Q, H, D]``."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2).contiguous()


@functools.cache
def _kernels():
    from . import (
        _attention_kernels,  # deferred: triton is optional and reads TRITON_INTERPRET on import
    )

    return _attention_kernels


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan(bh: int, kv_len: int, block_d: int, rows: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """``(BLOCK_N, CHUNK, SPLITS, num_warps, NUM_STAGES)`` of the split kernel: enough chunks that
    ``bh * SPLITS`` programs are about eight (one row) or four (``tl.dot``) per SM, each a whole
    number of ``BLOCK_N``-key tiles (the last may be partial). Depends on shapes only, so a captured
    graph never needs another plan.

    Measured on an H100 (float16, 32 heads of 128, 32 or 8 kv heads, CUDA graph replays of both
    kernels; two empty launches alone take ~1.8 us). One row: 16-key tiles on one warp (no
    cross-warp reduction; 152 registers, no spills) and eight programs per SM took 9.1 -> 6.0 us
    at 328 keys, 18.5 -> 11.5 at 2048 and 37.9 -> 29.1 at 4096 against 64-key tiles on 4 warps and
    two per SM (cuDNN SDPA with the same mask: 12.2, 17.0, 35.6 us). tl.dot (8 kv heads): 32-key
    tiles, 4 warps, four per SM: 5.6 -> 5.4 us at 328 keys, 9.2 -> 8.7 at 4096. Pipelining
    (``NUM_STAGES = 2``) helps programs of several tiles and costs those of one.
    """
    if rows == 1:
        block_n, warps, per_sm = 16, 1, 8
    else:  # 4 warps spill at head_dim 256 (ptxas), 8 do not
        block_n, warps, per_sm = 32, 4 if block_d <= 128 else 8, 4
    if device.type == "cuda":
        programs = per_sm * _sm_count(device.index)
    else:  # the interpreter: its time goes by tiles, whatever their size
        block_n, programs = 64, _CPU_PROGRAMS
    tiles = -(-kv_len // block_n)
    # at most 16K float32 partial values per output row for the combine kernel to hold
    splits = max(1, min(tiles, -(-programs // bh), 16384 // block_d))
    chunk = -(-tiles // splits) * block_n
    return block_n, chunk, -(-kv_len // chunk), warps, 1 if chunk == block_n else 2


def _run_kernels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    b, h, q_len, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = h // hkv
    query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    out = torch.empty((b, q_len, h, d), dtype=query.dtype, device=query.device)
    if mask is None:
        mask_kind, mask, mstrides = 0, out, (0, 0, 0, 0)  # any valid pointer; never read
    else:
        mask = mask.expand(b, h, q_len, s)  # stride 0 on broadcast dimensions
        if mask.dtype == torch.bool:
            mask_kind, mask = 1, mask.view(torch.uint8)
        else:
            mask_kind = 2
        mstrides = mask.stride()
    block_d = max(16, _next_pow2(d))
    rows = g * q_len
    rows_p = 1 if rows == 1 else max(16, _next_pow2(rows))  # tl.dot takes 16 rows or more
    block_n, chunk, splits, warps, stages = _plan(b * hkv, s, block_d, rows_p, query.device)
    final = splits == 1
    if final:
        m_part = l_part = acc_part = out  # unused pointers
    else:
        m_part, l_part = torch.empty((2, b * hkv, splits, rows), dtype=torch.float32, device=query.device)
        acc_part = torch.empty((b * hkv, splits, rows, d), dtype=torch.float32, device=query.device)
    # float32 inputs, or bfloat16 in the interpreter (its tl.dot mishandles it), multiply in float32
    ieee = query.dtype == torch.float32 or (query.device.type == "cpu" and query.dtype == torch.bfloat16)
    kern = _kernels()
    kern.split_kernel[(b * hkv, splits)](
        query, key, value, mask, out, m_part, l_part, acc_part, s, chunk, splits, hkv, scale * math.log2(math.e),
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), *mstrides,
        G=g, Q=q_len, D=d, BLOCK_D=block_d, BLOCK_N=block_n, ROWS=rows_p, MASK_KIND=mask_kind, IEEE=ieee,
        FINAL=final, NUM_STAGES=stages, num_warps=warps)
    if not final:
        splits_p2 = _next_pow2(splits)
        kern.combine_kernel[(b * hkv * rows,)](out, m_part, l_part, acc_part, splits, hkv, G=g, Q=q_len, D=d,
                                               BLOCK_D=block_d, SPLITS_P2=splits_p2,
                                               num_warps=4 if splits_p2 * block_d <= 4096 else 8)
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@torch.library.custom_op("hpsearch::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    if triton_enabled(query.device):
        return _run_kernels(query, key, value, attn_mask, scale)
    return decode_attention_reference(query, key, value, attn_mask, scale)


@_decode_attention_op.register_fake
def _(query, key, value, attn_mask, scale):
    b, h, q_len, _ = query.shape
    return query.new_empty((b, q_len, h, value.shape[-1]))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of ``query`` over a KV cache, as ``[B, Q, H, D]`` (transformers' layout).

    Args:
        query: ``[B, H, Q, D]`` (any strides; a transposed view as transformers gives is read in
            place), float16, bfloat16 or float32; ``Q`` a few tokens (1 when decoding).
        key: ``[B, Hkv, S, D]`` with ``H`` a multiple of ``Hkv`` (grouped-query attention), the
            query's dtype.
        value: like ``key``.
        attn_mask: ``None`` (attend to all ``S`` keys), a boolean tensor (``True`` = attend) or an
            additive float tensor, broadcastable to ``[B, H, Q, S]``. A row with nothing to attend
            to gives zeros, as PyTorch's SDPA does.
        scale: the scores' factor, ``1 / sqrt(D)`` by default.

    Returns:
        ``[B, Q, H, D]`` contiguous, the query's dtype.
    """
    if query.ndim != 4 or key.shape != value.shape or key.ndim != 4:
        raise ValueError(f"query [B, H, Q, D] and key, value [B, Hkv, S, D] expected, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    b, h, _, d = query.shape
    if key.shape[0] != b or key.shape[3] != d or h % key.shape[1]:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)}")
    if d > _MAX_HEAD_DIM or query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"head_dim <= {_MAX_HEAD_DIM} and one dtype of {_DTYPES} expected, got {d}, "
                         f"{query.dtype}/{key.dtype}/{value.dtype}")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be boolean or floating point, got {attn_mask.dtype}")
    return torch.ops.hpsearch.decode_attention(query, key, value, attn_mask,
                                               float(scale) if scale is not None else 1.0 / math.sqrt(d))


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def decode_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: :func:`decode_attention` for one new token, transformers'
    ``sdpa_attention_forward`` for everything else.

    The kernel runs when the query is one token, without dropout, gradients, or any of
    soft-capping, attention sinks, a position bias or a paged cache, on CUDA (or on CPU under the
    Triton interpreter), with a tensor mask or none. A sliding window needs nothing here: the mask
    transformers builds for SDPA (registered for this attention too) holds it, and a one-token
    query attends to all keys ``is_causal`` or not.
    """
    q_len, d = query.shape[2], query.shape[3]
    usable = (
        q_len == 1
        and not dropout
        and all(kwargs.get(name) is None for name in _DELEGATED_KWARGS)
        and query.dtype in _DTYPES and key.dtype == query.dtype and value.dtype == query.dtype
        and key.shape == value.shape and d == key.shape[3] and d <= _MAX_HEAD_DIM
        and query.shape[1] % key.shape[1] == 0
        and (attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                        and (attention_mask.dtype == torch.bool or attention_mask.is_floating_point())))
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        and (query.is_cuda or triton_enabled(query.device))
    )
    if not usable:
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               is_causal=is_causal, **kwargs)
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[2]:
        attention_mask = attention_mask[..., : key.shape[2]]  # older transformers: a mask longer than the cache
    return decode_attention(query, key, value, attention_mask, scaling), None


def register_decode_attention() -> str:
    """Register :func:`decode_attention_forward` and SDPA's mask builder under :data:`ATTN_NAME` in
    transformers (idempotent); returns the name.

    Raises:
        RuntimeError: transformers lacks ``AttentionInterface`` or ``AttentionMaskInterface``
            (both exist from 4.56 on).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as e:
        import transformers

        raise RuntimeError(f"hpsearch decode attention needs transformers >= 4.56 (AttentionInterface and "
                           f"AttentionMaskInterface); this is {transformers.__version__}") from e
    AttentionInterface.register(ATTN_NAME, decode_attention_forward)
    # the same masks as SDPA: a boolean [B, 1, Q, S] over the whole static cache in decode
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTN_NAME


def _configs(config) -> list:
    """``config`` and its sub-configs, at any depth."""
    out, todo = [], [config]
    while todo:
        c = todo.pop()
        if c is None or any(c is seen for seen in out):
            continue
        out.append(c)
        todo.extend(getattr(c, key, None) for key in getattr(c, "sub_configs", {}) or {})
    return out


def _uses_attention_interface(model: torch.nn.Module) -> bool:
    """Whether the model's attention layers dispatch through transformers' ``AttentionInterface``."""
    check = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(check):
        return bool(check())
    try:  # transformers before set_attn_implementation: the same heuristic on the modeling source
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[type(model).__module__])
    except (KeyError, OSError, TypeError):
        return False


def use_decode_attention(model: torch.nn.Module) -> bool:
    """Switch a loaded transformers model from SDPA to :func:`decode_attention_forward`.

    Call it before ``torch.compile`` or graph capture. Registers the attention (once) first.

    Args:
        model: a ``PreTrainedModel`` whose configs (and sub-configs) use ``"sdpa"`` (or
            :func:`use_additive_mask`'s SDPA).

    Returns:
        Whether the model now uses it; ``False``, with the model untouched, where it does not run
        SDPA (eager-only architectures, models loaded with another attention), its attention does
        not dispatch through ``AttentionInterface``, or transformers has no such interface.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_sdpa", False) or not _uses_attention_interface(model):
        return False
    configs = _configs(config)
    impls = {getattr(c, "_attn_implementation", None) for c in configs}
    if impls == {ATTN_NAME}:
        return True
    from ._additive_mask import ADDITIVE_NAME  # deferred: that module builds on this one

    # SDPA, or SDPA with additive masks (fuse_rope_attention switches to it): this registers its own masks
    if not impls <= {"sdpa", ADDITIVE_NAME, ATTN_NAME}:
        return False
    try:
        register_decode_attention()
    except RuntimeError:
        return False
    switch_attention(model, ATTN_NAME)
    return config._attn_implementation == ATTN_NAME


def switch_attention(model: torch.nn.Module, name: str) -> None:
    """Make every config of ``model`` run the registered attention ``name``."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers without it: every config reads _attn_implementation when attention runs
        for c in _configs(model.config):
            c._attn_implementation = name
