"""AWQ: activation-aware per-input-channel weight scaling before quantization.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024 (https://arxiv.org/abs/2306.00978).

Salient input channels (large mean ``|x|``) are scaled up before quantization and the input is
scaled down by the same factor: ``y = Q(W diag(s)) (diag(s)^-1 x)`` (Equation (3)). The scale is
``s = s_x^alpha`` (Equation (5)) with ``s_x`` the per-channel mean ``|x|``, and ``alpha`` is found by
grid search minimising the layer output error. Here the error is computed from the cached input
Hessian ``H = E[x x^T]`` as ``tr(dW H dW^T)``, so the search needs no forward pass. The paper's
weight-clipping search (``auto_clip`` in the authors' code: after scaling, each group's range is
shrunk by up to half in 20 steps to minimise the output error) is
:func:`~hpsearch.methods.clip.mse_clip_grid` on the scaled weight with the scaled Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hpsearch.methods.clip import mse_clip_grid
from hpsearch.methods.gptq import output_error
from hpsearch.methods.grid import QuantizedWeight, quantize, quantize_rtn

__all__ = ["awq_scales", "awq_search", "DEFAULT_GRID"]

#: ``alpha`` values searched (the paper's grid of 20 points in [0, 1)).
DEFAULT_GRID = tuple(i / 20 for i in range(20))


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = s_x^alpha`` (Equation (5)), normalised to geometric mean 1 as in the authors' code,
    rounded to float16 (the stored ``in_scale``)."""
    s = mean_abs.float().clamp_min(1e-4).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.half().float().clamp_min(1e-4)


def _fit(W: torch.Tensor, s: torch.Tensor, quantizer: Callable[[torch.Tensor], QuantizedWeight]) -> QuantizedWeight:
    qw = quantizer(W * s.unsqueeze(0))  # Q(W diag(s))
    qw.in_scale = s.half()
    return qw


@torch.no_grad()
def awq_search(W: torch.Tensor, H: torch.Tensor, mean_abs: torch.Tensor, bits: int, group_size: int, sym: bool,
               *, grid: Sequence[float] = DEFAULT_GRID,
               final: Callable[[torch.Tensor, torch.Tensor], QuantizedWeight] | None = None,
               clip_shrinks: Sequence[float] | None = None) -> tuple[QuantizedWeight, float, float]:
    """Search ``alpha`` over ``grid`` with RTN and the Hessian error; quantize with the best scales.

    Args:
        W: weight ``[N, K]``.
        H: input Hessian ``[K, K]`` of the layer.
        mean_abs: per-input-channel mean ``|x|`` ``[K]``.
        bits, group_size, sym: the grid.
        grid: ``alpha`` values tried; ``0`` (no scaling, plain RTN) is always tried, so the result
            is never worse than RTN on the calibration error.
        final: ``(W_scaled, H_scaled) -> QuantizedWeight`` quantizing the scaled weight with the
            scaled Hessian ``diag(s)^-1 H diag(s)^-1`` (e.g. GPTQ); RTN when ``None``.
        clip_shrinks: with RTN (``final`` is ``None``), the range factors of the clipping search
            run after the scale search on the scaled weight; ``None``: min-max grids. The error in
            the scaled basis equals the error in the original one, so clipping never raises it.

    Returns:
        ``(quantized weight with in_scale, best alpha, its calibration output error)``.
    """
    W = W.float()
    H = H.to(W.device, torch.float32)
    mean_abs = mean_abs.to(W.device)

    def rtn(w: torch.Tensor) -> QuantizedWeight:
        return quantize_rtn(w, bits, group_size, sym)

    best: tuple[float, float] | None = None
    for alpha in sorted({0.0, *map(float, grid)}):
        s = awq_scales(mean_abs, alpha)
        err = output_error(W, _fit(W, s, rtn).dequantize(), H)
        if best is None or err < best[1]:
            best = (alpha, err)
    alpha = best[0]
    s = awq_scales(mean_abs, alpha)
    inv = 1.0 / s
    if final is None and clip_shrinks is None:
        return _fit(W, s, rtn), alpha, best[1]
    if final is None:  # auto_clip: tr(dW' H' dW'^T) with W' = W diag(s), H' = diag(s)^-1 H diag(s)^-1
        W_s, H_s = W * s.unsqueeze(0), H * inv.unsqueeze(0) * inv.unsqueeze(1)
        scale, zero = mse_clip_grid(W_s, H_s, bits, group_size, sym, shrinks=tuple(clip_shrinks))
        q = quantize(W_s, scale, zero, bits, group_size)
        qw = QuantizedWeight(q, scale.half(), zero.to(torch.uint8), bits, group_size, sym, in_scale=s.half())
        return qw, alpha, output_error(W, qw.dequantize(), H)
    qw = final(W * s.unsqueeze(0), H * inv.unsqueeze(0) * inv.unsqueeze(1))
    qw.in_scale = s.half()
    return qw, alpha, output_error(W, qw.dequantize(), H)
