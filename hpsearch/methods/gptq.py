"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (https://arxiv.org/abs/2210.17323).

Pure functions on one layer: ``W`` is ``[N, K]`` (out, in) and ``H`` the ``[K, K]`` input Hessian
``E[x x^T]`` of the layer (the paper's ``2 X X^T`` up to a constant, which GPTQ is invariant to).
Codes land on the group-wise grid of :mod:`hpsearch.methods.grid`, so the result is the same
:class:`~hpsearch.methods.grid.QuantizedWeight` that RTN produces.
"""

from __future__ import annotations

import torch

from hpsearch.methods.clip import mse_clip_grid
from hpsearch.methods.grid import QuantizedWeight, fit_grid

__all__ = ["gptq_quantize", "output_error", "damped_inverse_cholesky"]


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Layer output error ``tr((W - W_hat) H (W - W_hat)^T)``: the mean squared output change
    over the calibration inputs when ``H = E[x x^T]`` (the objective of Equation (1))."""
    dW = W.float() - W_hat.float().to(W.device)
    return float(((dW @ H.to(W.device, torch.float32)) * dW).sum(dtype=torch.float64))


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` with ``lambda = percdamp * mean(diag H)``.

    Section 4, "Cholesky Reformulation": the rows of this factor hold exactly the entries of the
    successive inverses that Algorithm 1 needs. Damping is raised tenfold until ``H`` is positive
    definite in float32.
    """
    K = H.shape[0]
    idx = torch.arange(K, device=H.device)
    mean_diag = float(torch.mean(torch.diag(H)))
    damp = percdamp * (mean_diag if mean_diag > 0 else 1.0)
    for _ in range(6):
        Hd = H.clone()
        Hd[idx, idx] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp *= 10.0
    raise torch.linalg.LinAlgError("H + lambda I is not positive definite even with 1e5x damping")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, *,
                  percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
                  static_groups: bool = False, clip_shrinks: tuple[float, ...] | None = None) -> QuantizedWeight:
    """Quantize ``W`` column by column, spreading each column's error over the columns not yet
    quantized (Algorithm 1), with lazy batch updates of ``blocksize`` columns.

    Args:
        W: weight ``[N, K]``; any float dtype, any device (the math runs in float32 there).
        H: input Hessian ``[K, K]`` (float32), ``E[x x^T]`` over the calibration tokens.
        bits: code bit-width.
        group_size: input channels per scale/zero (divides ``K``).
        sym: symmetric grid (zero at the middle code).
        percdamp: damping ``lambda`` as a share of the mean diagonal of ``H``.
        blocksize: ``B``, columns per lazy batch update.
        act_order: quantize columns in order of decreasing ``diag(H)`` ("desc_act").
        static_groups: fit every group's grid on the original weight up front. Forced with
            ``act_order`` so a group still covers ``group_size`` contiguous input channels (one
            scale per group in storage order); otherwise a group's grid is fitted on the
            error-compensated weights when its first column is reached, as in the paper's code.
        clip_shrinks: range factors for an MSE-optimal clipping search of every group's grid
            (:func:`~hpsearch.methods.clip.mse_clip_grid`, the reference code's ``mse`` option);
            ``None``: min-max grids. Static grids are searched on the original weight with ``H``;
            a grid fitted when its group is reached is searched on the updated weights with the
            Hessian of the group given that the later columns compensate its error,
            ``([H_rest^-1]_cc)^-1 = (U_cc^T U_cc)^-1`` (``U`` the upper Cholesky factor of ``H^-1``).

    Returns:
        The codes, scales and zeros (dequantize to get ``W_hat``).
    """
    N, K = W.shape
    if K % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={K}")
    static_groups = static_groups or act_order
    maxq = 2**bits - 1
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that never fire: any value is exact, quantize them to 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = K // group_size
    scale = torch.zeros(N, n_groups, device=W.device)
    zero = torch.zeros(N, n_groups, device=W.device)
    if static_groups and clip_shrinks is not None:
        scale, zero = mse_clip_grid(W, H, bits, group_size, sym, shrinks=clip_shrinks)
    elif static_groups:
        scale, zero = fit_grid(W, bits, group_size, sym)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = damped_inverse_cholesky(H, percdamp)  # upper Cholesky of H^-1
    group_of = (perm // group_size).tolist()  # group (in storage order) of the j-th quantized column

    Q = torch.zeros_like(W)  # quantized columns (in quantization order)
    codes = torch.zeros_like(W)
    for i1 in range(0, K, blocksize):  # Algorithm 1, outer loop over blocks of B columns
        i2 = min(i1 + blocksize, K)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            g = group_of[j]
            if not static_groups and j % group_size == 0:
                # fit the group's grid on the weights as updated so far
                cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                if clip_shrinks is None:
                    s, z = fit_grid(cols, bits, group_size, sym)
                else:
                    U_cc = Hinv[j : j + group_size, j : j + group_size]
                    H_cc = torch.cholesky_inverse(U_cc, upper=True)  # (U_cc^T U_cc)^-1
                    s, z = mse_clip_grid(cols, H_cc, bits, group_size, sym, shrinks=clip_shrinks)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g], zero[:, g]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)  # quant(w), Algorithm 1 line 6
            codes[:, j] = q
            Q1[:, i] = (q - z) * s
            err = (w - Q1[:, i]) / d  # E_{:, j-i} = (W_{:,j} - Q_{:,j}) / [H^-1]_{jj}, line 7
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)  # W_{:, j:} -= E_{:, j-i} [H^-1]_{j, j:}, line 8
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)  # lazy batch update, line 11
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    return QuantizedWeight(codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), bits, group_size, sym)
