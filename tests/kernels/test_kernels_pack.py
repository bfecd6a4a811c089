"""Packing: exact round trips, exact storage, and the arguments it refuses."""

from __future__ import annotations

import pytest
import torch
from hpsearch.kernels import SUPPORTED_BITS, PackedWeight, pack, unpack
from hpsearch.kernels._pack import pack_codes, unpack_codes
from packed_cases import SHAPES, random_qsz


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n,k,g", SHAPES)
def test_round_trip(bits, n, k, g):
    q, s, z = random_qsz(n, k, g, bits)
    w = pack(q, s, z, bits, g)
    q2, s2, z2 = unpack(w)
    assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s)
    assert q2.dtype == z2.dtype == torch.uint8


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_round_trip(bits):
    top = 2**bits - 1
    q = torch.tensor([[0, top] * 64, [top] * 128], dtype=torch.uint8)
    z = torch.tensor([[top], [0]], dtype=torch.uint8)
    q2, _, z2 = unpack(pack(q, torch.ones(2, 1).half(), z, bits, 128))
    assert torch.equal(q2, q) and torch.equal(z2, z)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_storage_is_exactly_b_bits(bits):
    n, k, g = 64, 4096, 128  # K a multiple of 128 and K / g of 32: no padding at all
    w = pack(*random_qsz(n, k, g, bits), bits, g)
    assert w.nbytes() == n * k * bits // 8 + 2 * n * (k // g) + n * (k // g) * bits // 8
    assert w.qweight.dtype == torch.int32 and w.qweight.shape == (n, k * bits // 32)


def test_three_bit_padding_stays_small_on_llama_shapes():
    n, k, g = 8, 11008, 128
    w = pack(*random_qsz(n, k, g, 3), 3, g)
    exact = n * k * 3 / 8 + 2 * n * (k // g) + n * (k // g) * 3 / 8
    assert w.nbytes() / exact < 1.005


def test_three_bit_units_are_the_documented_layout():
    """3-bit: three planes of K / 32 words; word p of unit u holds code pairs 5p..5p+4 whole (pair
    5p+i at bits 3i and 16+3i), and bit p of codes 30 and 31 at its bits 15 and 31."""
    codes = torch.randint(0, 8, (2, 128), generator=torch.Generator().manual_seed(3))
    words = pack_codes(codes, 3, 128)
    assert words.shape == (2, 12)
    for row in range(2):
        for u in range(4):
            unit = codes[row, 32 * u:32 * u + 32].tolist()
            for p in range(3):
                w = int(words[row, 4 * p + u]) & 0xFFFFFFFF
                for i in range(5):
                    j = 5 * p + i
                    assert (w >> (3 * i)) & 7 == unit[2 * j] and (w >> (16 + 3 * i)) & 7 == unit[2 * j + 1]
                assert (w >> 15) & 1 == (unit[30] >> p) & 1 and (w >> 31) & 1 == (unit[31] >> p) & 1
    assert torch.equal(unpack_codes(words, 3, 128, 128), codes.to(torch.uint8))


def test_pairs_sit_sixteen_bits_apart():
    """2, 4, 8 bits: code c of a word in slot c // 2 + (c % 2) * P / 2 (even codes low, odd high)."""
    for bits in (2, 4, 8):
        per = 32 // bits
        codes = torch.arange(per).remainder(2**bits).reshape(1, per)
        w = int(pack_codes(codes, bits, per)[0, 0]) & 0xFFFFFFFF
        assert [(w >> (bits * (c // 2 + (c % 2) * per // 2))) & (2**bits - 1) for c in range(per)] == codes[0].tolist()


@pytest.mark.parametrize("bad", [
    {"bits": 5},
    {"group_size": 48},
    {"q": torch.full((4, 64), 16, dtype=torch.uint8)},
    {"z": torch.full((4, 2), 16, dtype=torch.uint8)},
    {"s": torch.ones(4, 3).half()},
])
def test_invalid_arguments(bad):
    args = {"q": torch.zeros(4, 64, dtype=torch.uint8), "s": torch.ones(4, 2).half(),
                "z": torch.zeros(4, 2, dtype=torch.uint8), "bits": 4, "group_size": 32}
    args.update(bad)
    with pytest.raises(ValueError):
        pack(**args)


def test_packed_weight_checks_shapes():
    w = pack(*random_qsz(4, 64, 32, 4), 4, 32)
    with pytest.raises(ValueError, match="qweight"):
        PackedWeight(w.qweight[:, :-1], w.scales, w.qzeros, 4, 32, 64)
