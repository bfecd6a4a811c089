"""``PackedLinear``: an ``nn.Linear`` replacement holding a packed low-bit weight."""

from __future__ import annotations

import torch
from torch import nn

from ._format import G_MULTIPLE, K_MULTIPLE, PackedWeight, check_bits, padded
from ._gated import packed_gated_matmul
from ._pack import pack
from ._rope import packed_qkv_rope

__all__ = ["PackedLinear"]


class PackedLinear(nn.Module):
    """``y = x @ W_hat.T + bias`` with ``W_hat`` stored packed (see :mod:`hpsearch.kernels`).

    The forward pass is the ``hpsearch::packed_matmul`` custom op: Triton kernels on CUDA, the
    PyTorch reference elsewhere. It has static shapes and no host synchronisation, so
    ``torch.compile`` (``fullgraph=True``) and CUDA graph capture take it as is; run one forward
    before capturing so that the kernels are compiled.

    Construct empty (correctly shaped buffers, e.g. to load a state dict) or with
    :meth:`from_quantized`.

    Args:
        in_features: ``K``.
        out_features: ``N``.
        bits: 2, 3, 4 or 8.
        group_size: input channels per group (``in_features`` for per-channel).
        bias: whether the layer has a bias.
        in_scale: whether activations are divided by a per-input-channel scale first (AWQ).
        device: where the buffers live.
        dtype: dtype of the bias and input scale (the activations' dtype).
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int,
                 bias: bool = False, in_scale: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        check_bits(bits)
        if group_size <= 0 or (in_features % group_size and group_size != in_features):
            raise ValueError(f"group_size={group_size} must divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        g = -(-in_features // group_size)
        k_words = padded(in_features, K_MULTIPLE) * bits // 32
        self.register_buffer("qweight", torch.zeros(out_features, k_words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(out_features, g, dtype=torch.float16, device=device))
        z_words = padded(g, G_MULTIPLE) * bits // 32
        self.register_buffer("qzeros", torch.zeros(out_features, z_words, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("in_scale", torch.ones(in_features, dtype=dtype, device=device) if in_scale else None)

    @classmethod
    def from_packed(cls, w: PackedWeight, bias: torch.Tensor | None = None,
                    in_scale: torch.Tensor | None = None) -> PackedLinear:
        """Wrap an already packed weight (its tensors are used, not copied)."""
        dtype = bias.dtype if bias is not None else (in_scale.dtype if in_scale is not None else torch.float16)
        layer = cls(w.in_features, w.out_features, bits=w.bits, group_size=w.group_size, device="meta",
                    bias=bias is not None, in_scale=in_scale is not None, dtype=dtype)
        layer.qweight, layer.scales, layer.qzeros = w.qweight, w.scales, w.qzeros
        if bias is not None:
            layer.bias = bias.detach().reshape(w.out_features)
        if in_scale is not None:
            layer.in_scale = in_scale.detach().reshape(w.in_features)
        return layer

    @classmethod
    def from_quantized(cls, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int,
                       bias: torch.Tensor | None = None, in_scale: torch.Tensor | None = None) -> PackedLinear:
        """Pack the quantization stages' codes ``q [N, K]``, scales and zeros ``[N, K // group_size]``.

        The layer lives on ``q``'s device. ``in_scale`` (AWQ) divides the activations first.
        """
        return cls.from_packed(pack(q, s, z, bits, group_size), bias=bias, in_scale=in_scale)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x / self.in_scale
        return torch.ops.hpsearch.packed_matmul(x, self.qweight, self.scales, self.qzeros, self.bias,
                                                self.bits, self.group_size, self.in_features)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` where this layer's rows are a gate's then an up projection's (a fused
        gate/up group, :func:`packed_gated_matmul`): ``[..., out_features // 2]``."""
        if self.in_scale is not None:
            x = x / self.in_scale
        return packed_gated_matmul(x, self.qweight, self.scales, self.qzeros, self.bias, self.bits,
                                   self.group_size, self.in_features)

    def qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, position: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
        """The rotated query of one new token per row where this layer's rows are ``[q | k | v]``
        heads (a fused q/k/v group); the rotated key and the value go into the caches at
        ``position`` (:func:`packed_qkv_rope`)."""
        if self.in_scale is not None:
            x = x / self.in_scale
        return packed_qkv_rope(x, self.qweight, self.scales, self.qzeros, self.bias, self.bits, self.group_size,
                               self.in_features, cos, sin, k_cache, v_cache, position, q_heads, kv_heads)

    def nbytes(self) -> int:
        """Exact bytes of the layer's stored tensors (codes, scales, zeros, bias, input scale)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
