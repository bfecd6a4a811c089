"""``silu(gate) * up`` in the epilogue of the fused gate/up GEMV.

Why: a packed Llama-family MLP at one token runs gate and up as one launch
(:func:`~hpsearch.kernels.fuse_packed_siblings`), then an elementwise ``silu(gate) * up`` kernel
(1.3 us on the H100) and its launch gap before down_proj. The one-row GEMV holds whole output
values at its end: if a program's rows alternate gate ``r`` and up ``r``, it can leave the product
itself (kernels/NOTES.md, run 26: the epilogue costs 0.6 us of the 21 us 4-bit gate/up GEMV of a
7B model, and decode gains 2%).

``hpsearch::packed_gated_matmul`` computes ``silu(y[..., :N/2]) * y[..., N/2:]`` for
``y = x @ W_hat.T + bias``, rounding to the activations' dtype where transformers' modules do
(each projection, the activation, the product), in one ``gemv_h2`` launch where that kernel runs
(one activation row per program: decode), and as the same steps around
:func:`~hpsearch.kernels.packed_matmul` elsewhere (prefill, other kernels, no Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import _launch, _matmul, triton_enabled

__all__ = ["gated_reference", "packed_gated_matmul"]


def gated_reference(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``y = [gate | up]`` (last dimension), as transformers' MLPs compute it."""
    half = y.shape[-1] // 2
    return F.silu(y[..., :half]) * y[..., half:]


@torch.library.custom_op("hpsearch::packed_gated_matmul", mutates_args=())
def _packed_gated_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                            bias: torch.Tensor | None, bits: int, group_size: int,
                            in_features: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = None
    if triton_enabled(x.device) and x2.shape[0] > 0:
        y = _launch(x2, qweight, scales, qzeros, bias, bits, group_size, in_features, None, gated=True)
    if y is None:  # the same steps, unfused
        y = gated_reference(_matmul(x2, qweight, scales, qzeros, bias, bits, group_size, in_features, None))
    return y.reshape(*x.shape[:-1], scales.shape[0] // 2)


@_packed_gated_matmul_op.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], scales.shape[0] // 2)


def packed_gated_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                        bias: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """``silu(gate) * up`` for a packed weight whose rows are a gate's then an up projection's
    (equal counts): ``[..., K]`` activations in, ``[..., N // 2]`` out."""
    if scales.shape[0] % 2:
        raise ValueError(f"a gated product needs an even number of rows (gate then up), got {scales.shape[0]}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    return torch.ops.hpsearch.packed_gated_matmul(x, qweight, scales, qzeros, bias, bits, group_size, in_features)
