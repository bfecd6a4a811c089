"""Tensor-core products of 1-8 activation rows with packed 2-, 3- or 4-bit weights, in Gluon.

Why: ``_few_rows`` puts the activations in the 16-row A operand of ``mma.sync.m16n8k16``, so at
2-8 rows most of that operand is padding and each warp re-reads them for only 32 weight rows. Here
the *weights* are the A operand (16 weight rows by 16 codes) and the tokens B's 8 columns, so one
MMA takes 256 codes, nothing is padding, and the dequantization is only what feeds it:

- one ``lop3`` a code pair: ``(w & mask_o) | magic_o`` puts the field that sits at bit ``o`` of
  each half-word under the float16 exponent whose unit in the last place is that bit, which reads
  as ``C_o + q`` with ``C_o = 2^(10 - o)``, exact (fields that do not fit below bit 10 are read
  after one shift of the word);
- nothing else a code: the constant and the zero come out of the float32 sums afterwards. Per
  step (128 codes of every row) ``sum_k (C_o(k) + q_k) x_k`` is the MMA's, ``sum_k C_o(k) x_k``
  and ``sum_k x_k`` come from one more MMA a step whose A operand is constant (``_constant_rows``)
  and is shared by all the warp's row tiles, and each row adds
  ``s * (acc - sum C x - z sum x)`` (a step lies in one group: groups of a multiple of 128 codes).

So the weights are used as ``(q - z) * s`` with that product in float32 where the reference rounds
it to float16 first (the sums differ from the fake-quantized model's by float16 rounding, as the
GEMVs' do).

Layout: thread ``4 g + t`` of a warp loads rows ``2 g`` and ``2 g + 1`` of each of the warp's
16-row tiles, codes ``32 t .. 32 t + 31`` of the step (one 8-16 byte load a row; at 3 bits the three
words of one unit, ``_format``); the rows become MMA rows ``g`` and ``g + 8`` and the thread's pair
``j`` the k position ``16 (j // 2) + 8 (j % 2) + 2 t + e``, the same bijection as ``_few_rows``, so
each token's activations are one contiguous 64-byte load a thread. The conversions to the MMA
layouts are asserted trivial. ``R`` row tiles a warp share the activations and the constant MMA.

K may be split across programs, reduced as in ``_few_rows`` (partials in its workspace, the last
program to arrive adds them). Requirements (``takes``): CUDA of compute capability 8.0 or newer,
float16 activations read as int32 pairs, 1-8 rows, 2, 3 or 4 bits (8 bits spills registers at the
tiles that pay), groups of a multiple of 128 codes or one group a row. Off with
``HPSEARCH_FEW_ROWS=0``, like the other Gluon kernel.

Measured (kernels/NOTES.md run 37): at one row it loses to ``gemv_h2`` (2 bits 4096x11008: 11.4
against 9.8 us), so one-row products keep the GEMVs; at 2-8 rows it beats ``_few_rows`` (whose
16-row A operand is mostly padding there) on most Llama shapes at 2 and 4 bits.
"""

from __future__ import annotations

import functools

import torch

from . import _few_rows

__all__ = ["BLOCK_K", "MAX_ROWS", "launch", "takes"]

#: Codes of every row a program step covers.
BLOCK_K = 128
#: Activation rows (tokens) a launch takes: the MMA's N.
MAX_ROWS = 8


@functools.cache
def _gluon():
    """The Gluon kernel module, or None where this Triton has no Gluon ``mma_v2``."""
    try:
        from . import _skinny_kernels
    except (ImportError, AttributeError):
        return None
    return _skinny_kernels


def takes(x2: torch.Tensor, bits: int, group_size: int, in_features: int) -> bool:
    """Whether :func:`launch` runs this product (see the module docstring)."""
    if not (_few_rows.gluon_can_read(x2) and x2.shape[0] <= MAX_ROWS and bits in (2, 3, 4)):
        return False
    if group_size < in_features and group_size % BLOCK_K:
        return False
    return _gluon() is not None


def launch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
           bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, row_tiles: int,
           split_k: int, num_warps: int, depth: int) -> torch.Tensor:
    """``x2 [M, K] @ W_hat.T (+ bias)`` as float16 ``[M, N]``; the caller checked :func:`takes`.

    A program takes ``16 * row_tiles * num_warps`` weight rows (``row_tiles`` 1, 2 or 4), K split
    ``split_k`` ways; ``depth`` steps of weights (1, 2 or 4) are loaded together, a chunk ahead of the
    arithmetic."""
    kern = _gluon()
    m, k = x2.shape
    n, g = scales.shape
    k_pad, k_steps, per_split, split_k = _few_rows.k_splits(qweight, bits, split_k)
    rows = 16 * row_tiles * num_warps
    tiles = -(-n // rows)
    y = torch.empty((m, n), dtype=torch.float16, device=x2.device)
    ws, cnt = _few_rows.workspace(x2.device, split_k * MAX_ROWS * n if split_k > 1 else 0, tiles)
    kern.skinny_kernel[(tiles, split_k)](
        x2, qweight, scales, qzeros, bias if bias is not None else y, y, ws, cnt,
        m, n, k, g, x2.stride(0), y.stride(0), qweight.shape[1], qzeros.shape[1], k_steps, per_split, split_k,
        BITS=bits, GROUP=1 << 30 if group_size >= in_features else group_size, R=row_tiles, NW=num_warps, D=depth,
        MASK_K=k != k_pad, HAS_BIAS=bias is not None, num_warps=num_warps)
    return y
