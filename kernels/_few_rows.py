"""Tensor-core products of 2-16 activation rows with packed 2-, 3-, 4- or 8-bit weights, in Gluon.

Why Gluon, not ``tl.dot``: at a few rows the product is a read of the weights, and the Triton
kernel's dequantized tile goes through shared memory before each MMA (``kernels/NOTES.md`` runs 17
and 32): Triton decides the operand layouts itself. Gluon (Triton's layout-explicit dialect) lets the
words be loaded straight into the registers of ``mma.sync.m16n8k16``'s operands, as Marlin does in
CUDA. The format (``_format``) already puts codes ``2i`` and ``2i + 1`` 16 bits apart in one word,
so one ``lop3`` makes the float16 pair an operand register holds; the kernel then only chooses which
codes a thread multiplies by which activations.

A step is 128 codes of every row of a tile. Thread ``4 g + t`` of a warp owns row ``g`` of each of
the warp's 8-row tiles and the codes ``32 t .. 32 t + 31`` of the step (``bits`` consecutive words,
one 4-16 byte load; at 3 bits one unit, a word in each of three planes, whose pair ``j`` is in word
``j // 5`` and pair 15 in the spare bits). Its 16 code pairs ``j`` become the operand's k positions
``16 (j // 2) + 8 (j % 2) + 2 t + e``: any bijection of k is allowed as long as the activations take
the same one, and this one gives every thread a single contiguous load of weights and of each
activation row. The convert to the MMA layouts is asserted trivial (no data movement).

``(q - z) * s`` is formed in ``f16x2`` as the reference does (``(1024 + q) - (1024 + z)`` is exact,
one rounding in the product), so the weights are the fake-quantized model's bit for bit; sums are
float32. K may be split across programs: each writes its partial tile to a float32 workspace, and
the last to arrive at a column tile (an atomic counter) adds them and writes the output, leaving the
counter at zero for the next launch, so no output needs zeroing first (float32 atomics into a zeroed
tile measured about the same, run 32).

On by default; ``HPSEARCH_FEW_ROWS=0`` sends these products to the Triton tensor-core kernel
(``enabled``). It was opt-in for a while: one flow with it on ended in an illegal memory access
(kernels/NOTES.md run 33). That was a 3-bit zero read one plane past its unit in the Triton
kernels, faulting only where the tensor ended at unmapped memory, which this kernel's workspace
happened to bring about (run 34; found by compute-sanitizer with each tensor its own allocation).

The activations: every warp needs all 16 rows of each step. Read by each warp each step (4 KB a
step, lanes ``t`` 64 bytes apart, so sectors half used) they were ~80% of the kernel's L1 work
(run 35). With ``x_shared`` a program copies its K range's activations (``cp.async``, at most
``MAX_SHARED_STEPS`` steps) to shared memory once, behind one barrier while its first weights are
in flight, swizzled so that the per-step reads hit 32 distinct banks; the registers this frees
let two or four steps of weights be in flight (kernels/NOTES.md run 38: 5-29% faster at 16 rows
on Llama-7B shapes).

Requirements (``takes``): on, CUDA of compute capability 8.0 or newer, float16 activations read as int32
pairs (even K and row stride, 4-byte aligned), 2, 3, 4 or 8 bits, groups of a multiple of 32 codes (or
one group a row), at most 16 rows. Elsewhere ``_launch`` uses the Triton tensor-core kernel.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["BLOCK_K", "MAX_SHARED_STEPS", "enabled", "gluon_can_read", "k_splits", "launch", "takes", "workspace"]

#: Codes of every row a program step covers.
BLOCK_K = 128
#: Most steps of a K split whose activations a program copies to shared memory (``x_shared``): 16
#: rows x 128 codes x 2 bytes a step, so 64 KB, three programs an SM.
MAX_SHARED_STEPS = 16


@functools.cache
def _gluon():
    """The Gluon kernel module, or None where this Triton has no Gluon ``mma_v2``."""
    try:
        from . import _few_rows_kernels
    except (ImportError, AttributeError):
        return None
    return _few_rows_kernels


def enabled() -> bool:
    """Whether the kernel is on: yes unless ``HPSEARCH_FEW_ROWS=0`` (see the module docstring)."""
    value = os.environ.get("HPSEARCH_FEW_ROWS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"HPSEARCH_FEW_ROWS must be 0 (off) or 1 (on, the default), got {value!r}")
    return value == "1"


def takes(x2: torch.Tensor, bits: int, group_size: int, in_features: int) -> bool:
    """Whether :func:`launch` runs this product (see the module docstring); elsewhere the Triton
    tensor-core kernel runs it."""
    if not (gluon_can_read(x2) and x2.shape[0] <= 16 and bits in (2, 3, 4, 8)):
        return False
    if group_size < in_features and group_size % 32:
        return False
    return _gluon() is not None


def gluon_can_read(x2: torch.Tensor) -> bool:
    """What both Gluon kernels (this one and ``_skinny``) need of the activations and the device:
    on, CUDA of compute capability 8.0 or newer, float16 read as int32 pairs (even K and row
    stride, 4-byte aligned), at least one row."""
    if not enabled():
        return False
    m, k = x2.shape
    if not (x2.is_cuda and x2.dtype == torch.float16 and m >= 1):
        return False
    if k % 2 or x2.stride(0) % 2 or x2.data_ptr() % 4:
        return False
    return torch.cuda.get_device_capability(x2.device) >= (8, 0)


_WORKSPACES: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
#: workspaces outgrown: kept, since a captured CUDA graph may still write to them when replayed
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial sums and arrival counters shared by this stream's launches (which run one after
    another). The counters start at zero and every launch leaves them there. A workspace first
    needed during CUDA-graph capture is allocated in the graph's pool and zeroed by a captured
    memset, which each replay runs before the launches that use it. One that grows is replaced, and
    the old one kept alive: graphs captured with it still use it."""
    stream = torch.cuda.current_stream(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), stream.cuda_stream)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < tiles:
        if ws is not None:
            _RETIRED.append((ws, cnt))
        floats = max(floats, 1 << 16, 0 if ws is None else 2 * ws.numel())
        tiles = max(tiles, 1024, 0 if cnt is None else cnt.numel())
        ws = torch.empty(floats, dtype=torch.float32, device=device)
        cnt = torch.zeros(tiles, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def k_splits(qweight: torch.Tensor, bits: int, split_k: int) -> tuple[int, int, int, int]:
    """``K_pad``, its 128-code steps, the steps a split takes and the splits that leaves (at most
    ``split_k``, none empty), for a launch of either Gluon kernel."""
    k_pad = qweight.shape[1] * 32 // bits
    k_steps = k_pad // BLOCK_K
    per_split = -(-k_steps // max(1, split_k))
    return k_pad, k_steps, per_split, -(-k_steps // per_split)


def launch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
           bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, block_n: int,
           split_k: int, num_warps: int, prefetch: int, x_shared: bool = False) -> torch.Tensor:
    """``x2 [M, K] @ W_hat.T (+ bias)`` as float16 ``[M, N]``; the caller checked :func:`takes`.

    ``block_n`` output columns a program (a multiple of ``8 * num_warps``), K split ``split_k`` ways,
    ``prefetch`` steps of weights in flight ahead of the arithmetic (1 or 2; 1, 2 or 4 with
    ``x_shared``). ``x_shared``: each program copies its K range's activations to shared memory
    once, if a split is at most ``MAX_SHARED_STEPS`` steps; otherwise every warp reads them every
    step (and a prefetch of 4 runs as 2)."""
    kern = _gluon()
    m, k = x2.shape
    n, g = scales.shape
    k_pad, k_steps, per_split, split_k = k_splits(qweight, bits, split_k)
    tiles = -(-n // block_n)
    y = torch.empty((m, n), dtype=torch.float16, device=x2.device)
    ws, cnt = workspace(x2.device, split_k * 16 * n if split_k > 1 else 0, tiles)
    shared = x_shared and per_split <= MAX_SHARED_STEPS
    if not shared:
        prefetch = min(prefetch, 2)
    kern.few_rows_kernel[(tiles, split_k)](
        x2, qweight, scales, qzeros, bias if bias is not None else y, y, ws, cnt,
        m, n, k, g, x2.stride(0), y.stride(0), qweight.shape[1], qzeros.shape[1], k_steps, per_split, split_k,
        BITS=bits, GROUP=1 << 30 if group_size >= in_features else group_size, BLOCK_N=block_n,
        NW=num_warps, MASK_K=k != k_pad, HAS_BIAS=bias is not None, PREFETCH=prefetch,
        XSTEPS=per_split if shared else 0, num_warps=num_warps)
    return y
