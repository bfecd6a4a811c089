"""PyTorch references of the packed operations: what every kernel must compute."""

from __future__ import annotations

import torch

from ._format import PackedWeight
from ._pack import unpack

__all__ = ["dequantize", "matmul_reference"]


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``W_hat = (q - z) * s`` as ``dtype`` ``[N, K]``.

    The product is formed in float32, where it is exact (an 8-bit integer times a float16), and
    rounded once to ``dtype``.
    """
    q, s, z = unpack(w)
    g = w.group_size
    grp = torch.arange(w.in_features, device=q.device) // g
    w_hat = (q.float() - z.float()[:, grp]) * s.float()[:, grp]
    return w_hat.to(dtype)


def matmul_reference(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W_hat.T (+ bias)`` in float32, returned as ``x.dtype``; ``x`` is ``[..., K]``."""
    y = x.float() @ dequantize(w, torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
