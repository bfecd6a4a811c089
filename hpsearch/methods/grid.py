"""Group-wise uniform quantization grids: the weight format every quantizer produces.

A weight ``W`` of shape ``[N, K]`` (out, in) is split into groups of ``g`` contiguous input
channels per output row. Each group has a float16 scale ``s`` and an integer zero ``z``; codes are
``q = clamp(round(W / s) + z, 0, 2^b - 1)`` and the weight is ``W_hat = (q - z) * s``.
Symmetric grids are the same format with ``z = 2^(b-1)`` (GPTQ's convention), so kernels and the
memory model see one format. Scales are rounded to float16 *before* the codes are computed, so
``dequantize`` gives exactly what a packed kernel computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantizedWeight", "fit_grid", "quantize", "dequantize", "quantize_rtn"]


@dataclass
class QuantizedWeight:
    """Codes, scales and zeros of one quantized weight (the packed kernels' input)."""

    q: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # float16 [N, K // g]
    zero: torch.Tensor  # uint8 [N, K // g]
    bits: int
    group_size: int
    sym: bool
    #: Per-input-channel scale ``s`` the codes were fitted on (AWQ): the layer computes
    #: ``(x / s) @ W_hat^T``, with ``1/s`` folded into the previous operation where possible.
    in_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the quantized layer applies, in the original input basis."""
        w = dequantize(self.q, self.scale, self.zero, self.group_size)
        if self.in_scale is not None:
            w = w / self.in_scale.float().unsqueeze(0)
        return w.to(dtype)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    return w.reshape(n, k // group_size, group_size)


def fit_grid(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zeros for every group of ``w`` (float32 math, float16 scales).

    Returns:
        ``(scale, zero)``, each ``[N, K // group_size]``; scale float32 holding float16 values,
        zero float32 holding integers.
    """
    maxq = 2**bits - 1
    wg = _grouped(w.float(), group_size)
    if sym:
        amax = wg.abs().amax(dim=-1)
        scale = (2 * amax / maxq).clamp_min(1e-8)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        # The range always holds 0 (as GPTQ's quantizer does): the integer zero must be a code in
        # [0, 2^b - 1], which a group of one sign would otherwise push out of range and saturate.
        wmin, wmax = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)
        scale = ((wmax - wmin) / maxq).clamp_min(1e-8)
        zero = None
    scale = scale.half().float().clamp_min(2.0**-24)  # smallest float16 subnormal: never a zero scale
    if zero is None:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes of ``w`` on a given grid (uint8 ``[N, K]``)."""
    maxq = 2**bits - 1
    wg = _grouped(w.float(), group_size)
    q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(0, maxq).reshape(w.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(q - z) * s`` per group, as float32 ``[N, K]``."""
    qg = _grouped(q.float(), group_size)
    return ((qg - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(q.shape)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest on a min-max grid: the baseline every other quantizer is measured against."""
    scale, zero = fit_grid(w, bits, group_size, sym)
    q = quantize(w, scale, zero, bits, group_size)
    return QuantizedWeight(q, scale.half(), zero.to(torch.uint8), bits, group_size, sym)
