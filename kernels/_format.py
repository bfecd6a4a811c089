"""The packed low-bit weight format shared by the reference and the Triton kernels.

A linear weight ``W`` of shape ``[N, K]`` is stored as group-wise asymmetric integer codes:
``W_hat[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]`` with ``b``-bit codes ``q`` and zeros ``z``
and float16 scales ``s`` (one per group of ``g`` contiguous input channels; ``g = K`` is
per-channel). Symmetric grids are the same format with ``z = 2^(b-1)``.

Storage (all row-major, one row per output channel):

- ``qweight`` int32 ``[N, K_pad * b / 32]``: the codes at exactly ``b`` bits each. A code is split
  into *bit planes* whose widths are powers of two (2 -> [2], 3 -> [2, 1], 4 -> [4], 8 -> [8]).
  Plane ``p`` (width ``w_p``, ``P = 32 / w_p`` codes a word) packs bits ``[o_p, o_p + w_p)`` of
  codes ``k`` into word ``k // P``, pairwise interleaved: code ``c = k % P`` sits in slot
  ``c // 2 + (c % 2) * P / 2`` (bits ``slot * w_p`` on), so codes ``2i`` and ``2i + 1`` are 16 bits
  apart and one mask-and-or turns them into a float16 pair (the kernels' ``f16x2`` dequantization).
  The planes of a row follow one another (3-bit: ``K_pad / 16`` words of the low 2 bits, then
  ``K_pad / 32`` words of the high bit). ``K_pad`` is ``K`` rounded up to a multiple of 128, so
  that every row and plane starts on a 16-byte boundary; the padded codes are 0 and meet zero
  activations in every kernel.
- ``scales`` float16 ``[N, G]`` with ``G = ceil(K / g)``, stored as given.
- ``qzeros`` int32 ``[N, G_pad * b / 32]``: the zeros, packed like the codes (``G_pad`` is ``G``
  rounded up to a multiple of 32). Zeros are *not* pre-multiplied by the scales.

So a layer takes ``N * (K_pad + G_pad) * b / 8 + 2 * N * G`` bytes: exactly the engine's count
``N*K*b/8 + 2*N*G + N*G*b/8`` when ``K`` is a multiple of 128 and ``G`` of 32 (Llama, Qwen, Mistral
and Phi-3 shapes at g = 128 are, except ``G = 86`` for ``K = 11008``: +0.1%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["G_MULTIPLE", "K_MULTIPLE", "SUPPORTED_BITS", "PackedWeight", "padded", "planes"]

#: Bit-widths the format and the kernels support.
SUPPORTED_BITS = (2, 3, 4, 8)

#: The code and zero axes are padded to these multiples.
K_MULTIPLE, G_MULTIPLE = 128, 32

_PLANES = {2: ((2, 0),), 3: ((2, 0), (1, 2)), 4: ((4, 0),), 8: ((8, 0),)}


def planes(bits: int) -> tuple[tuple[int, int], ...]:
    """The ``(width, bit offset)`` of each bit plane of a ``bits``-bit code."""
    try:
        return _PLANES[bits]
    except KeyError:
        raise ValueError(f"bits={bits} is not supported; allowed: {SUPPORTED_BITS}") from None


def padded(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


@dataclass(frozen=True)
class PackedWeight:
    """Packed codes, scales and zeros of one ``[N, K]`` weight (see the module docstring).

    Build one with :func:`hpsearch.kernels.pack`; its tensors may live on any device.
    """

    qweight: torch.Tensor  # int32 [N, K_pad * bits // 32]
    scales: torch.Tensor  # float16 [N, G]
    qzeros: torch.Tensor  # int32 [N, G_pad * bits // 32]
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        planes(self.bits)
        n = self.out_features
        if self.qweight.shape != (n, self.k_pad * self.bits // 32) or self.qweight.dtype != torch.int32:
            raise ValueError(f"qweight must be int32 [{n}, {self.k_pad * self.bits // 32}], "
                             f"got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        if self.scales.shape != (n, self.num_groups) or self.scales.dtype != torch.float16:
            raise ValueError(f"scales must be float16 [{n}, {self.num_groups}], "
                             f"got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.qzeros.shape != (n, self.g_pad * self.bits // 32):
            raise ValueError(f"qzeros must be int32 [{n}, {self.g_pad * self.bits // 32}]")

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def k_pad(self) -> int:
        return padded(self.in_features, K_MULTIPLE)

    @property
    def g_pad(self) -> int:
        return padded(self.num_groups, G_MULTIPLE)

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    def nbytes(self) -> int:
        """Exact bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros))

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.qweight.to(device), self.scales.to(device), self.qzeros.to(device),
                            self.bits, self.group_size, self.in_features)
