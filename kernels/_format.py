"""The packed low-bit weight format shared by the reference and the Triton kernels.

A linear weight ``W`` of shape ``[N, K]`` is stored as group-wise asymmetric integer codes:
``W_hat[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]`` with ``b``-bit codes ``q`` and zeros ``z``
and float16 scales ``s`` (one per group of ``g`` contiguous input channels; ``g = K`` is
per-channel). Symmetric grids are the same format with ``z = 2^(b-1)``.

Storage (all row-major, one row per output channel):

- ``qweight`` int32 ``[N, K_pad * b / 32]``: the codes at exactly ``b`` bits each, pairwise
  interleaved: codes ``2i`` and ``2i + 1`` always sit 16 bits apart in one word, so one
  mask-and-or turns them into a float16 pair (the kernels' ``f16x2`` arithmetic).

  - 2, 4 and 8 bits (``P = 32 / b`` codes a word): codes ``k`` go to word ``k // P``; code
    ``c = k % P`` sits in slot ``c // 2 + (c % 2) * P / 2`` (bits ``slot * b`` on): even codes in
    the low half-word, odd ones in the high.
  - 3 bits, in *units* of 32 codes held by three words, one in each of three *planes* that follow
    one another in the row (``K_pad / 32`` words each; unit ``u`` is word ``u`` of every plane).
    Word ``p`` of a unit holds the code pairs ``j = 5p .. 5p + 4`` whole: pair ``j = 5p + i`` at
    bits ``3i`` (code ``2j``) and ``16 + 3i`` (code ``2j + 1``). The last pair, codes 30 and 31,
    is spread over the spare bits: bit ``p`` of code 30 is bit 15 of word ``p``, bit ``p`` of code
    31 its bit 31. So every 3-bit field but two of 32 is whole in one word, and a one-row kernel
    spends on a 3-bit code no more than on a 4-bit one (``_triton_kernels``, ``gemv_h2``).

  ``K_pad`` is ``K`` rounded up to a multiple of 128, so that every row and plane starts on a
  16-byte boundary; the padded codes are 0 and meet zero activations in every kernel.
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

__all__ = ["G_MULTIPLE", "K_MULTIPLE", "SUPPORTED_BITS", "PackedWeight", "check_bits", "padded"]

#: Bit-widths the format and the kernels support.
SUPPORTED_BITS = (2, 3, 4, 8)

#: The code and zero axes are padded to these multiples.
K_MULTIPLE, G_MULTIPLE = 128, 32

def check_bits(bits: int) -> None:
    """Raise a one-line ``ValueError`` unless the format supports ``bits``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; allowed: {SUPPORTED_BITS}")


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
        check_bits(self.bits)
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
