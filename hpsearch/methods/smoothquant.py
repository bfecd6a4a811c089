"""SmoothQuant: W8A8 with activation outliers migrated into the weights.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (https://arxiv.org/abs/2211.10438).

``Y = (X diag(s)^-1) (diag(s) W^T)`` (Equation (3)) with the smoothing factor
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (Equation (4)); weights are then quantized per
output channel and activations per token, dynamically, both symmetric 8-bit (Section 3).
:class:`W8A8Linear` simulates that in the forward pass (fake quantization, exact codes).
"""

from __future__ import annotations

import torch
from torch import nn

from hpsearch.methods.grid import QuantizedWeight, quantize_rtn

__all__ = ["smooth_scales", "quantize_per_token", "quantize_weight_per_channel", "W8A8Linear", "w8a8_output"]


def smooth_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (Equation (4)), float16-rounded.

    Args:
        act_max: per-input-channel ``max|X_j|`` over the calibration tokens, ``[K]``.
        weight_max: per-input-channel ``max|W_j|`` over the output channels of every layer that
            reads this input (they share ``s`` when it is folded into the preceding norm), ``[K]``.
        alpha: migration strength in ``[0, 1]``; 0 leaves activations alone.
    """
    s = act_max.float().clamp_min(1e-5).pow(alpha) / weight_max.float().clamp_min(1e-5).pow(1.0 - alpha)
    return s.clamp_min(1e-5).half().float()


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric fake quantization, one scale per token (last dim is channels)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def quantize_weight_per_channel(W: torch.Tensor, bits: int = 8) -> QuantizedWeight:
    """Symmetric per-output-channel codes (one group spanning the row)."""
    return quantize_rtn(W, bits, W.shape[1], sym=True)


class W8A8Linear(nn.Module):
    """A linear layer computing ``Q_tok(x / s) @ Q_ch(W diag(s))^T + b`` in the input's dtype.

    Args:
        weight: the smoothed, dequantized weight ``Q(W diag(s))`` ``[N, K]``.
        inv_scale: ``1 / s`` ``[K]``.
        bias: the original bias or ``None``.
        a_bits: activation bit-width.
    """

    def __init__(self, weight: torch.Tensor, inv_scale: torch.Tensor, bias: torch.Tensor | None, a_bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("inv_scale", inv_scale.to(weight.dtype))
        self.a_bits = a_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = quantize_per_token(x.float() * self.inv_scale.float(), self.a_bits).to(x.dtype)
        return nn.functional.linear(xq, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, a_bits={self.a_bits}"


def w8a8_output(x: torch.Tensor, W: torch.Tensor, s: torch.Tensor, w_bits: int = 8, a_bits: int = 8) -> torch.Tensor:
    """What a smoothed W8A8 layer outputs for inputs ``x`` ``[T, K]`` (no bias), in float32."""
    Wq = quantize_weight_per_channel(W.float() * s.unsqueeze(0), w_bits).dequantize()
    return quantize_per_token(x.float() / s.unsqueeze(0), a_bits) @ Wq.T
