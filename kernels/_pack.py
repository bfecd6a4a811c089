"""Pack and unpack: integer codes <-> the words of :mod:`._format` (pure PyTorch)."""

from __future__ import annotations

import torch

from ._format import G_MULTIPLE, K_MULTIPLE, PackedWeight, check_bits, padded

__all__ = ["pack", "pack_codes", "unpack", "unpack_codes"]


def _slot_order(per: int) -> list[int]:
    """Code held by each slot of a word: even codes in the low half-word, odd ones in the high."""
    return list(range(0, per, 2)) + list(range(1, per, 2))


def _code_order(per: int) -> list[int]:
    """Slot holding each code (the inverse of :func:`_slot_order`)."""
    return [c // 2 + (c % 2) * (per // 2) for c in range(per)]


def pack_codes(codes: torch.Tensor, bits: int, multiple: int = 32) -> torch.Tensor:
    """Pack ``[R, L]`` integer codes in ``[0, 2^bits)`` into int32 words (3 bits: plane after plane).

    Returns:
        int32 ``[R, padded(L, multiple) * bits // 32]``; codes past ``L`` are 0.
    """
    r, length = codes.shape
    lp = padded(length, multiple)
    n_words = lp * bits // 32
    out = torch.empty(r, n_words, dtype=torch.int32, device=codes.device)
    step = max(1, (1 << 24) // max(lp, 1))  # rows at a time: bounded int64 intermediates
    for r0 in range(0, r, step):
        out[r0:r0 + step] = _pack_rows(codes[r0:r0 + step], bits, length, lp)
    return out


def _pack_rows(codes: torch.Tensor, bits: int, length: int, lp: int) -> torch.Tensor:
    r = codes.shape[0]
    c = torch.zeros(r, lp, dtype=torch.int64, device=codes.device)
    c[:, :length] = codes
    if bits == 3:
        w = _pack_units(c.view(r, lp // 32, 32))
    else:
        per = 32 // bits
        field = c.view(r, lp // per, per)[:, :, _slot_order(per)]
        shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
        w = (field << shifts).sum(-1)  # disjoint bit fields: sum == or
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _unit_shifts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per word ``p`` of a 3-bit unit: the codes of its 10 whole fields and their bit offsets."""
    code = torch.tensor([[2 * (5 * p + i) + h for h in (0, 1) for i in range(5)] for p in range(3)], device=device)
    shift = torch.tensor([[16 * h + 3 * i for h in (0, 1) for i in range(5)]] * 3, device=device, dtype=torch.int64)
    return code, shift


def _pack_units(units: torch.Tensor) -> torch.Tensor:
    """int64 codes ``[R, U, 32]`` -> the three planes of words, int64 ``[R, 3 * U]`` (see ``_format``)."""
    code, shift = _unit_shifts(units.device)
    words = (units[:, :, code] << shift).sum(-1)  # [R, U, 3]: the whole fields
    p = torch.arange(3, device=units.device)
    words |= ((units[:, :, 30, None] >> p) & 1) << 15 | ((units[:, :, 31, None] >> p) & 1) << 31
    return words.transpose(1, 2).reshape(units.shape[0], -1)


def _unpack_units(w: torch.Tensor, lp: int) -> torch.Tensor:
    """Inverse of :func:`_pack_units` on words ``[R, 3 * lp / 32]`` (int64, 32 bits): codes ``[R, lp]``."""
    r, u = w.shape[0], lp // 32
    words = w[:, :3 * u].view(r, 3, u).transpose(1, 2)  # [R, U, 3]
    code, shift = _unit_shifts(w.device)
    codes = torch.zeros(r, u, 32, dtype=torch.int64, device=w.device)
    codes[:, :, code] = (words[:, :, :, None] >> shift) & 7
    p = torch.arange(3, device=w.device)
    codes[:, :, 30] = (((words >> 15) & 1) << p).sum(-1)
    codes[:, :, 31] = (((words >> 31) & 1) << p).sum(-1)
    return codes.reshape(r, lp)


def unpack_codes(words: torch.Tensor, bits: int, length: int, multiple: int = 32) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[R, length]``."""
    r = words.shape[0]
    lp = padded(length, multiple)
    w = words.to(torch.int64) & 0xFFFFFFFF
    if bits == 3:
        codes = _unpack_units(w, lp)
    else:
        per = 32 // bits
        shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
        field = (w[:, :lp // per, None] >> shifts) & ((1 << bits) - 1)
        codes = field[:, :, _code_order(per)].reshape(r, lp)
    return codes[:, :length].to(torch.uint8)


def _check(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int) -> None:
    check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"q must be [N, K], got shape {tuple(q.shape)}")
    n, k = q.shape
    if group_size <= 0 or (k % group_size and group_size != k):
        raise ValueError(f"group_size={group_size} must divide in_features={k} (or equal it)")
    g = k // group_size
    for name, t in (("s", s), ("z", z)):
        if tuple(t.shape) != (n, g):
            raise ValueError(f"{name} must be [{n}, {g}], got {tuple(t.shape)}")
    maxq = 2**bits - 1
    if q.numel() and (int(q.max()) > maxq or int(q.min()) < 0):
        raise ValueError(f"q has codes outside [0, {maxq}] for bits={bits}")
    if z.numel() and (int(z.max()) > maxq or int(z.min()) < 0):
        raise ValueError(f"z has zeros outside [0, {maxq}] for bits={bits}")


def pack(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int) -> PackedWeight:
    """Pack the quantization stages' ``(q, s, z)`` into a :class:`PackedWeight`.

    Args:
        q: integer codes ``[N, K]`` (uint8 or any integer dtype) in ``[0, 2^bits)``.
        s: scales ``[N, K // group_size]``; stored as float16.
        z: integer zeros ``[N, K // group_size]`` in ``[0, 2^bits)``.
        bits: 2, 3, 4 or 8.
        group_size: input channels per group; must divide ``K`` (``K`` itself is per-channel).

    Returns:
        The packed weight, on ``q``'s device.
    """
    _check(q, s, z, bits, group_size)
    return PackedWeight(
        qweight=pack_codes(q, bits, K_MULTIPLE),
        scales=s.to(device=q.device, dtype=torch.float16).contiguous(),
        qzeros=pack_codes(z.to(q.device), bits, G_MULTIPLE),
        bits=bits,
        group_size=group_size,
        in_features=q.shape[1],
    )


def unpack(w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: ``(q uint8 [N, K], s float16 [N, G], z uint8 [N, G])``."""
    q = unpack_codes(w.qweight, w.bits, w.in_features, K_MULTIPLE)
    z = unpack_codes(w.qzeros, w.bits, w.num_groups, G_MULTIPLE)
    return q, w.scales, z
