"""Triton kernels for ``y = x @ W_hat.T`` on the packed format of :mod:`._format`.

Every kernel walks K in tiles of ``BK`` codes, dequantizes in registers and never writes ``W_hat``
out. :func:`gemv_kernel` keeps a tile inside one group; the others also take tiles of ``GT`` whole
groups (longer runs of each row per load), and :func:`gemv_h2_kernel` a last tile past the row:

- :func:`gemv_kernel` (one activation row per program along grid axis 2): CUDA cores, float32
  accumulation. A field ``f`` of ``w`` bits becomes ``v = 1 + f / 2^w`` with one shift and one
  masked or (``(f << (23 - w)) | 0x3F800000`` read as float32): no integer-to-float conversion.
  Per tile, ``sum_k (q_k - z) s x_k = s * (2^w (sum_k v_k x_k - X) - z X)`` with ``X = sum_k x_k``.
- :func:`dot_kernel` (several rows: decode with ``BLOCK_M = 16``, prefill with larger tiles): tensor
  cores on the transposed tile ``W_hat[BLOCK_N, BK] @ x[BLOCK_M, BK].T``, so that the dequantized
  weight is the left operand (it may stay in registers) and a small ``M`` costs no padding of the
  weight. A field becomes ``2^23 + f`` by ``f | 0x4B000000`` read as float32; ``(that - (2^23 + z)) * s``
  is exact in float32 and rounded once to the activation dtype.
- :func:`gemv_words_kernel` (``ASM``: its arithmetic in inline PTX, ``gemv_asm``) and
  :func:`gemv_h2_kernel` (float16 activations at 2-4 bits, two codes per float16-pair instruction):
  one-row GEMVs, see their section comments below. ``gemv_h2`` is the one-row default.

Words are unpacked with a tree of ``tl.join`` (:func:`_tree`; :func:`_unit_tree` for the three
words of a 3-bit unit), which keeps each word's codes in the thread that loaded the word.
``SPLIT_K > 1`` splits K over a grid axis and adds partial results atomically into a zeroed output.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_kernel", "gemv_h2_kernel", "gemv_kernel", "gemv_words_kernel"]


@triton.jit
def _tree(words, OFF: tl.constexpr, STRIDE: tl.constexpr, LEVELS: tl.constexpr, WIDTH: tl.constexpr):
    """Fields ``OFF + STRIDE * j`` (``j < 2^LEVELS``) of every word, joined in new minor dims in order j."""
    if LEVELS == 0:
        return (words >> (OFF * WIDTH)) & ((1 << WIDTH) - 1)
    else:
        return tl.join(_tree(words, OFF, 2 * STRIDE, LEVELS - 1, WIDTH),
                       _tree(words, OFF + STRIDE, 2 * STRIDE, LEVELS - 1, WIDTH))


@triton.jit
def _plane_fields(ptrs, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr):
    """Load one plane's words ``ptrs`` [BLOCK_N, BK * WIDTH // 32]: its fields, int32 [BLOCK_N, BK].

    Slots ``i < P/2`` hold the even codes ``2i``, slots ``P/2 + i`` the odd ones (see ``_format``):
    joining the two halves last puts the codes in natural order.
    """
    words = tl.load(ptrs)
    HALF: tl.constexpr = 16 // WIDTH
    if WIDTH == 1:
        t = tl.join(_tree(words, 0, 1, 4, WIDTH), _tree(words, HALF, 1, 4, WIDTH))
    elif WIDTH == 2:
        t = tl.join(_tree(words, 0, 1, 3, WIDTH), _tree(words, HALF, 1, 3, WIDTH))
    elif WIDTH == 4:
        t = tl.join(_tree(words, 0, 1, 2, WIDTH), _tree(words, HALF, 1, 2, WIDTH))
    else:
        t = tl.join(_tree(words, 0, 1, 1, WIDTH), _tree(words, HALF, 1, 1, WIDTH))
    return tl.reshape(t, (BLOCK_N, BK))


@triton.jit
def _unit_pair(w0, w1, w2, J: tl.constexpr):
    """Codes ``2J`` and ``2J + 1`` of 3-bit units as one int32, in bits 0-2 and 16-18."""
    if J < 15:
        if J // 5 == 0:
            w = w0
        elif J // 5 == 1:
            w = w1
        else:
            w = w2
        return (w >> (3 * (J % 5))) & 0x00070007
    else:  # the spare bits 15 and 31 of the three words
        return ((w0 >> 15) & 0x00010001) | ((w1 >> 14) & 0x00020002) | ((w2 >> 13) & 0x00040004)


@triton.jit
def _unit_code(w0, w1, w2, J: tl.constexpr, H: tl.constexpr):
    """Code ``2J + H`` of every 3-bit unit whose three words are ``w0, w1, w2`` (see ``_format``)."""
    return (_unit_pair(w0, w1, w2, J) >> (16 * H)) & 7


@triton.jit
def _unit_tree(w0, w1, w2, H: tl.constexpr, JLOW: tl.constexpr, NB: tl.constexpr):
    """Codes ``2j + H`` for the pairs ``j`` whose low ``NB`` bits are ``JLOW``, joined in new minor
    dims (the deepest join is the highest bit of ``j``)."""
    if NB == 4:
        return _unit_code(w0, w1, w2, JLOW, H)
    else:
        return tl.join(_unit_tree(w0, w1, w2, H, JLOW, NB + 1), _unit_tree(w0, w1, w2, H, JLOW + (1 << NB), NB + 1))


@triton.jit
def _unit_fields(ptrs, plane, BLOCK_N: tl.constexpr, BK: tl.constexpr):
    """Load the 3-bit units of a tile (``ptrs``: plane 0's words [BLOCK_N, BK // 32]; ``plane``:
    words from one plane to the next): its codes in order, int32 [BLOCK_N, BK]. Each word's codes
    stay in the thread that loaded it (a ``tl.join`` tree, as :func:`_plane_fields`)."""
    w0 = tl.load(ptrs)
    w1 = tl.load(ptrs + plane)
    w2 = tl.load(ptrs + 2 * plane)
    t = tl.join(_unit_tree(w0, w1, w2, 0, 0, 0), _unit_tree(w0, w1, w2, 1, 0, 0))
    return tl.reshape(t, (BLOCK_N, BK))


@triton.jit
def _pairs(words, zz2, s2, OFF: tl.constexpr, STRIDE: tl.constexpr, LEVELS: tl.constexpr,
           WIDTH: tl.constexpr):
    """Float16 ``(q - z) * s`` of codes ``2j`` and ``2j + 1``, ``j = OFF + STRIDE * i``, as two trees.

    Slot ``j`` and slot ``j + P/2`` are 16 bits apart: one mask-and-or makes them the float16 pair
    ``(1024 + q_2j, 1024 + q_2j+1)``; ``sub.f16x2`` (exact) and ``mul.rn.f16x2`` (one rounding, as
    the reference) finish both codes at once.
    """
    if LEVELS == 0:
        mask: tl.constexpr = ((1 << WIDTH) - 1) * 65537
        h = ((words >> (OFF * WIDTH)) & mask) | 0x64006400
        a, b = tl.inline_asm_elementwise(
            "{ .reg .b32 r; sub.f16x2 r, $2, $3; mul.rn.f16x2 r, r, $4; mov.b32 {$0, $1}, r; }",
            "=h,=h,r,r,r", [h, zz2, s2], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        return a, b
    else:
        a0, b0 = _pairs(words, zz2, s2, OFF, 2 * STRIDE, LEVELS - 1, WIDTH)
        a1, b1 = _pairs(words, zz2, s2, OFF + STRIDE, 2 * STRIDE, LEVELS - 1, WIDTH)
        return tl.join(a0, a1), tl.join(b0, b1)


@triton.jit
def _dequant_f16x2(ptrs, zoff, s, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr):
    """``(f - zoff) * s`` of one plane's fields in float16, two codes per instruction: [BLOCK_N, BK].
    ``zoff``, ``s``: [BLOCK_N, GT], per group of the tile."""
    words = tl.load(ptrs)
    zb = (zoff + 1024.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    sb = s.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    WPG: tl.constexpr = BK * WIDTH // 32 // GT
    zz2 = _per_word(zb | (zb << 16), BLOCK_N, GT, WPG)
    s2 = _per_word(sb | (sb << 16), BLOCK_N, GT, WPG)
    if WIDTH == 1:
        a, b = _pairs(words, zz2, s2, 0, 1, 4, WIDTH)
    elif WIDTH == 2:
        a, b = _pairs(words, zz2, s2, 0, 1, 3, WIDTH)
    elif WIDTH == 4:
        a, b = _pairs(words, zz2, s2, 0, 1, 2, WIDTH)
    else:
        a, b = _pairs(words, zz2, s2, 0, 1, 1, WIDTH)
    return tl.reshape(tl.join(a, b), (BLOCK_N, BK))


@triton.jit
def _unit_pairs(w0, w1, w2, zz2, s2, JLOW: tl.constexpr, NB: tl.constexpr):
    """``_pairs`` for 3-bit units: float16 ``(q - z) * s`` of the even and of the odd codes of the
    pairs ``j`` whose low ``NB`` bits are ``JLOW``, as two trees (see :func:`_unit_tree`)."""
    if NB == 4:
        h = _unit_pair(w0, w1, w2, JLOW) | 0x64006400
        a, b = tl.inline_asm_elementwise(
            "{ .reg .b32 r; sub.f16x2 r, $2, $3; mul.rn.f16x2 r, r, $4; mov.b32 {$0, $1}, r; }",
            "=h,=h,r,r,r", [h, zz2, s2], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        return a, b
    else:
        a0, b0 = _unit_pairs(w0, w1, w2, zz2, s2, JLOW, NB + 1)
        a1, b1 = _unit_pairs(w0, w1, w2, zz2, s2, JLOW + (1 << NB), NB + 1)
        return tl.join(a0, a1), tl.join(b0, b1)


@triton.jit
def _dequant_units_f16x2(ptrs, plane, zoff, s, BLOCK_N: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr):
    """:func:`_dequant_f16x2` for 3-bit units (``ptrs``: plane 0's words; ``plane``: words from one
    plane to the next): ``(q - zoff) * s`` in float16, [BLOCK_N, BK] in code order."""
    w0 = tl.load(ptrs)
    w1 = tl.load(ptrs + plane)
    w2 = tl.load(ptrs + 2 * plane)
    zb = (zoff + 1024.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    sb = s.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    zz2 = _per_word(zb | (zb << 16), BLOCK_N, GT, BK // 32 // GT)
    s2 = _per_word(sb | (sb << 16), BLOCK_N, GT, BK // 32 // GT)
    a, b = _unit_pairs(w0, w1, w2, zz2, s2, 0, 0)
    return tl.reshape(tl.join(a, b), (BLOCK_N, BK))


@triton.jit
def _plane_ptrs(qw_ptr, rows, k0, plane_off, WIDTH: tl.constexpr, BK: tl.constexpr):
    """Pointers [BLOCK_N, BK * WIDTH // 32] to the words of codes ``[k0, k0 + BK)`` of one plane."""
    base = tl.multiple_of(rows + plane_off, 4)  # the format starts rows and planes on 16 bytes
    return qw_ptr + base[:, None] + (k0 // (32 // WIDTH) + tl.arange(0, BK // (32 // WIDTH)))[None, :]


@triton.jit
def _slot(c, PER: tl.constexpr):
    """Slot of code ``c`` (< PER) in its word: see ``_format``."""
    return c // 2 + (c % 2) * (PER // 2)


@triton.jit
def _zero(qz_ptr, rows, grp, G_PAD, BITS: tl.constexpr):
    """Zero of group ``grp`` (a scalar) of every row: float32 [BLOCK_N]."""
    row = rows * (G_PAD * BITS // 32)
    if BITS == 3:  # units of 32 zeros in three planes of G_PAD // 32 words (see ``_format``)
        u = row + grp // 32
        r = grp % 32
        j = r // 2
        h = r % 2
        # zeros 30 and 31 (j = 15) are in the spare bits, not in a fourth plane: read plane 2 for
        # them (discarded below) rather than a word past the unit, which faulted at the end of
        # an allocation (kernels/NOTES.md run 34)
        main = tl.load(qz_ptr + u + tl.minimum(j // 5, 2) * (G_PAD // 32))
        e = 15 + 16 * h  # zeros 30 and 31 of a unit: bit p in the spare bit of plane p's word
        spare = ((tl.load(qz_ptr + u) >> e) & 1) | (((tl.load(qz_ptr + u + G_PAD // 32) >> e) & 1) << 1) \
            | (((tl.load(qz_ptr + u + 2 * (G_PAD // 32)) >> e) & 1) << 2)
        z = tl.where(r >= 30, spare, (main >> (16 * h + 3 * (j % 5))) & 7)
    else:
        words = tl.load(qz_ptr + row + grp // (32 // BITS))
        z = (words >> (_slot(grp % (32 // BITS), 32 // BITS) * BITS)) & ((1 << BITS) - 1)
    return z.to(tl.float32)


@triton.jit
def _scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP: tl.constexpr, BITS: tl.constexpr):
    """Scale and zero (float32 [BLOCK_N]) of the group holding code ``k0``; ``GROUP = 0``: per channel."""
    if GROUP == 0:
        grp = 0
    else:
        # A tile of the zero padding past K (K_PAD > K) may lie past the last group: read the last
        # group's scale (finite; it meets zero activations) rather than past the end of the tensor.
        grp = tl.minimum(k0 // GROUP, G - 1)
    s = tl.load(s_ptr + rows * G + grp).to(tl.float32)
    return s, _zero(qz_ptr, rows, grp, G_PAD, BITS)


@triton.jit
def _tile_fields(ptrs, K_PAD, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr):
    """The codes of a tile, int32 [BLOCK_N, BK] (``ptrs``: its words; plane 0's for 3 bits)."""
    if BITS == 3:
        return _unit_fields(ptrs, K_PAD // 32, BLOCK_N, BK)
    else:
        return _plane_fields(ptrs, BITS, BLOCK_N, BK)


@triton.jit
def _fields_sum(f, xk, BITS: tl.constexpr):
    """``sum_k (1 + f_k / 2^BITS) * x_k`` over the tile, per row: float32 [BLOCK_N]."""
    v = ((f << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    return tl.sum(v * xk[None, :], axis=1)


@triton.jit
def _gemv_program(x_ptr, qw_ptr, N, K_PAD, stride_xm, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BK: tl.constexpr, GATED: tl.constexpr = False, HALF: tl.constexpr = 0):
    """What a GEMV program works on: its K split, its activation row, its weight rows (``rn``, and
    ``rows`` clamped to ``N - 1``: rows past N recompute row N-1 and are not stored), that row's
    pointer, and the word pointers of its first tile (for 3 bits, plane 0's: the others follow
    ``K_PAD // 32`` words on). ``GATED``: the weight is a gate's rows then an up projection's
    (``N // 2`` each); the program's rows alternate gate ``r``, up ``r`` for ``BLOCK_N // 2``
    outputs ``r`` (``rn`` is then the output's, each index twice). ``HALF`` (rotary heads of
    ``2 * HALF`` rows, ``BLOCK_N // 2`` dividing ``HALF``): the rows alternate ``d`` and ``d + HALF``
    of one head, ``rn`` the pair's index (``head * HALF + d``, each twice; no program passes N)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    if GATED:
        j = tl.arange(0, BLOCK_N)
        rn = pid_n * (BLOCK_N // 2) + j // 2
        rows = (tl.minimum(rn, N // 2 - 1) + (j % 2) * (N // 2)).to(tl.int64)
    elif HALF > 0:
        j = tl.arange(0, BLOCK_N)
        first = pid_n * (BLOCK_N // 2)  # scalar: the program's pairs are d .. d + BLOCK_N / 2 of one head
        rn = first + j // 2
        rows = (first + (first // HALF) * HALF + j // 2 + (j % 2) * HALF).to(tl.int64)
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(rn, N - 1).to(tl.int64)
    row_words = rows * (K_PAD * BITS // 32)
    ptrs = _plane_ptrs(qw_ptr, row_words, pid_k * BK, 0, 1 if BITS == 3 else BITS, BK)
    return pid_k, pid_m, rn, rows, x_ptr + pid_m * stride_xm, ptrs


@triton.jit
def _x_tile(x_row, k0, K, BK: tl.constexpr, MASK_K: tl.constexpr):
    """Activations ``[k0, k0 + BK)`` of one row in float32 (zeros past ``K``)."""
    rk = k0 + tl.arange(0, BK)
    if MASK_K:
        return tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
    else:
        return tl.load(x_row + rk).to(tl.float32)


@triton.jit
def _gemv_store(out, y_ptr, b_ptr, rows, rn, N, pid_k, pid_m, stride_ym, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """Add the bias (once, by the first K split) and store, or add atomically when K is split."""
    if HAS_BIAS:  # noqa: SIM102 - a compile-time branch around a run-time one
        if pid_k == 0:
            out += tl.load(b_ptr + rows).to(tl.float32)
    y = y_ptr + pid_m * stride_ym + rn
    if SPLIT_K == 1:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(y, out.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def gemv_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr,
                N, K, K_PAD, G, G_PAD, stride_xm, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """One activation row (grid axis 2) times ``BLOCK_N`` weight rows (axis 0), K split over axis 1.

    The K loop is software-pipelined ``NUM_STAGES`` deep (the word loads of later tiles are in
    flight, as asynchronous copies to shared memory, while a tile is unpacked).
    """
    pid_k, pid_m, rn, rows, x_row, ptrs = _gemv_program(x_ptr, qw_ptr, N, K_PAD, stride_xm, BITS, BLOCK_N, BK)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(pid_k * BK, K_PAD, BK * SPLIT_K, num_stages=NUM_STAGES):
        xk = _x_tile(x_row, k0, K, BK, MASK_K)
        xsum = tl.sum(xk, axis=0)
        a = (1 << BITS) * (_fields_sum(_tile_fields(ptrs, K_PAD, BITS, BLOCK_N, BK), xk, BITS) - xsum)
        ptrs += BK * (1 if BITS == 3 else BITS) // 32 * SPLIT_K
        s, z = _scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP, BITS)
        acc += s * (a - z * xsum)
    _gemv_store(acc, y_ptr, b_ptr, rows, rn, N, pid_k, pid_m, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant(f, zoff, s, BLOCK_N: tl.constexpr, BK: tl.constexpr, dtype, UPCAST: tl.constexpr, GT: tl.constexpr):
    """``(f - zoff) * s`` of a tile's codes ``f``, rounded to ``dtype``: [BLOCK_N, BK]. ``zoff``,
    ``s``: [BLOCK_N, GT], per group of the tile."""
    f = (f | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + f
    w = ((f - _per_word(zoff + 8388608.0, BLOCK_N, GT, BK // GT)) * _per_word(s, BLOCK_N, GT, BK // GT)).to(dtype)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def dot_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr,
               M, N, K, K_PAD, G, G_PAD, stride_xm, stride_ym,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
               UPCAST: tl.constexpr, F16X2: tl.constexpr, GT: tl.constexpr = 1):
    """Tile ``y[BLOCK_M, BLOCK_N]`` (grid axes 1 and 0) over a share of K (axis 2).

    ``UPCAST`` multiplies float32 copies of the (rounded) operands: the Triton interpreter's
    ``tl.dot`` mishandles bfloat16. ``F16X2`` (float16 activations on a GPU; inline PTX, so not in
    the interpreter) dequantizes two codes per instruction (``_dequant_f16x2``;
    ``_dequant_units_f16x2`` at 3 bits). A tile spans ``GT``
    groups (``BK = GT * GROUP``): longer contiguous runs of each weight row per load.
    """
    dtype = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(rn, N - 1).to(tl.int64)
    row_words = rows * (K_PAD * BITS // 32)
    x_ptrs = x_ptr + (tl.minimum(rm, M - 1).to(tl.int64) * stride_xm)[:, None] \
        + (pid_k * BK + tl.arange(0, BK))[None, :]
    WIDTH: tl.constexpr = 1 if BITS == 3 else BITS  # 3 bits: the words of plane 0, see _unit_fields
    ptrs = _plane_ptrs(qw_ptr, row_words, pid_k * BK, 0, WIDTH, BK)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(pid_k * BK, K_PAD, BK * SPLIT_K):
        if MASK_K:
            xt = tl.load(x_ptrs, mask=(k0 + tl.arange(0, BK) < K)[None, :], other=0.0)
        else:
            xt = tl.load(x_ptrs)
        if UPCAST:
            xt = xt.to(tl.float32)
        x_ptrs += BK * SPLIT_K
        if GT == 1:
            s, z = _scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP, BITS)
            s = s[:, None]
            z = z[:, None]
        else:
            s, z = _tile_scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP, BITS, GT)
        if F16X2 and BITS == 3:
            w = _dequant_units_f16x2(ptrs, K_PAD // 32, z, s, BLOCK_N, BK, GT)
        elif F16X2:
            w = _dequant_f16x2(ptrs, z, s, BITS, BLOCK_N, BK, GT)
        else:
            w = _dequant(_tile_fields(ptrs, K_PAD, BITS, BLOCK_N, BK), z, s, BLOCK_N, BK, dtype, UPCAST, GT)
        acc = tl.dot(w, tl.trans(xt), acc)
        ptrs += BK * WIDTH // 32 * SPLIT_K
    if HAS_BIAS:  # noqa: SIM102 - a compile-time branch around a run-time one
        if pid_k == 0:
            acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    y = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    mask = (rm < M)[None, :] & (rn < N)[:, None]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


# --- GEMV with in-place fields and per-word partial sums -------------------------------------
#
# Why a second GEMV: :func:`gemv_kernel` spends ~4 integer instructions per code (shift, mask,
# shift, or), and integer instructions issue at half the rate of float ones on sm_80/sm_90, so
# at 4 bits it is bound by the integer pipe well before memory (kernels/NOTES.md, run 3). Here a
# field is turned into a float *where it lies*: ``(w & (mask << p)) | 0x4B000000`` read as float32
# is ``2^23 + f * 2^p`` (exact while ``p + width <= 23``), one LOP3, and ``- 2^23`` (exact) leaves
# ``f * 2^p``; the activation it meets is pre-scaled by ``2^-p``. Fields of the high half-word
# (the odd codes, see ``_format``) are read from ``w >> 16``, one shift per word. So a code costs
# one integer and two float instructions (LOP3, FADD, FFMA). Partial sums stay per word
# ([BLOCK_N, words] accumulators, summed inside the thread), and the cross-thread reduction over
# K happens once per program instead of once per tile.


@triton.jit
def _inplace_tree(half, OFF: tl.constexpr, STRIDE: tl.constexpr, LEVELS: tl.constexpr, WIDTH: tl.constexpr):
    """``f * 2^(WIDTH * i)`` (float32) of fields ``i = OFF + STRIDE * j`` of ``half`` (a half-word
    with 0x4B000000 or'ed in)."""
    if LEVELS == 0:
        # ``half`` already carries the exponent bits: one AND with one immediate per field
        mask: tl.constexpr = (((1 << WIDTH) - 1) << (OFF * WIDTH)) | -8388608  # | 0xFF800000
        return (half & mask).to(tl.float32, bitcast=True) - 8388608.0
    else:
        return tl.join(_inplace_tree(half, OFF, 2 * STRIDE, LEVELS - 1, WIDTH),
                       _inplace_tree(half, OFF + STRIDE, 2 * STRIDE, LEVELS - 1, WIDTH))


@triton.jit
def _inplace_values(words, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, NW: tl.constexpr):
    """Codes of ``words`` [BLOCK_N, NW] as ``q_c * 2^(WIDTH * (c // 2 mod P/2))``: [BLOCK_N, NW, 32 // WIDTH]."""
    lo = (words & 0xFFFF) | 0x4B000000
    hi = ((words >> 16) & 0xFFFF) | 0x4B000000
    words = lo
    if WIDTH == 1:
        t = tl.join(_inplace_tree(words, 0, 1, 4, WIDTH), _inplace_tree(hi, 0, 1, 4, WIDTH))
    elif WIDTH == 2:
        t = tl.join(_inplace_tree(words, 0, 1, 3, WIDTH), _inplace_tree(hi, 0, 1, 3, WIDTH))
    elif WIDTH == 4:
        t = tl.join(_inplace_tree(words, 0, 1, 2, WIDTH), _inplace_tree(hi, 0, 1, 2, WIDTH))
    else:
        t = tl.join(_inplace_tree(words, 0, 1, 1, WIDTH), _inplace_tree(hi, 0, 1, 1, WIDTH))
    return tl.reshape(t, (BLOCK_N, NW, 32 // WIDTH))


@triton.jit
def _slot_scaled_x(xk, WIDTH: tl.constexpr, BK: tl.constexpr):
    """``x_k * 2^-(WIDTH * i)`` with ``i = (k mod P) // 2`` the field of code ``k`` in its half-word,
    shaped [BK // P, P] like the words' codes."""
    P: tl.constexpr = 32 // WIDTH
    c = tl.arange(0, BK) % P
    scale = ((127 - WIDTH * (c // 2)) << 23).to(tl.float32, bitcast=True)  # 2^-(WIDTH*i), exact
    return tl.reshape(xk * scale, (BK // P, P))


@triton.jit
def _word_sums(ptrs, xk, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr):
    """Per word of the tile, ``sum_c q_c x_c`` over its codes: float32 [BLOCK_N, BK * WIDTH // 32]."""
    NW: tl.constexpr = BK * WIDTH // 32
    v = _inplace_values(tl.load(ptrs), WIDTH, BLOCK_N, NW)
    return tl.sum(v * _slot_scaled_x(xk, WIDTH, BK)[None, :, :], axis=2)


@triton.jit
def _tile_scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP: tl.constexpr, BITS: tl.constexpr, GT: tl.constexpr,
                     ZERO_PAST: tl.constexpr = True):
    """Scales and zeros (float32 [BLOCK_N, GT]) of the ``GT`` groups from code ``k0`` on. Groups past
    the row's last read the last group's (finite: they meet zero-padded activations); ``ZERO_PAST``
    also zeroes their scale."""
    grp = k0 // GROUP + tl.arange(0, GT)
    valid = grp < G
    grp = tl.minimum(grp, G - 1)
    s = tl.load(s_ptr + rows[:, None] * G + grp[None, :]).to(tl.float32)
    z = _zero(qz_ptr, rows[:, None], grp[None, :], G_PAD, BITS)
    if ZERO_PAST:
        s = tl.where(valid[None, :], s, 0.0)
    return s, z


@triton.jit
def _per_word(t, BLOCK_N: tl.constexpr, GT: tl.constexpr, WPG: tl.constexpr):
    """``t`` [BLOCK_N, GT] repeated for the ``WPG`` words of each group: [BLOCK_N, GT * WPG]."""
    if GT == 1:  # a plain broadcast: no reshape for the compiler to lay out
        return tl.broadcast_to(t, (BLOCK_N, WPG))
    return tl.reshape(tl.broadcast_to(t[:, :, None], (BLOCK_N, GT, WPG)), (BLOCK_N, GT * WPG))


@triton.jit
def gemv_words_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr,
                      N, K, K_PAD, G, G_PAD, stride_xm, stride_ym,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                      ASM: tl.constexpr = False, GT: tl.constexpr = 1):
    """Same contract and grid as :func:`gemv_kernel`; see the section comment for how it differs.
    ``ASM`` (CUDA only: inline PTX does not run in the interpreter) takes the per-word sums of 2-,
    4- and 8-bit planes from :func:`_word_sums_asm`.

    Per tile: ``acc[n, w] += s_nw * (sum_{c in w} q_c x_c - z_nw * sum_{c in w} x_c)`` for every word
    ``w`` (``s_nw``, ``z_nw``: the scale and zero of the word's group), two FMAs per word;
    ``y_n = sum_w acc[n, w]`` at the end. A tile spans ``GT`` groups (``BK = GT * GROUP``): longer
    contiguous runs of each row per load than one group gives.
    """
    tl.static_assert(BITS != 3, "3-bit units have no in-place fields: the launcher runs gemv_kernel")
    pid_k, pid_m, rn, rows, x_row, ptrs = _gemv_program(x_ptr, qw_ptr, N, K_PAD, stride_xm, BITS, BLOCK_N, BK)
    acc = tl.zeros([BLOCK_N, BK * BITS // 32], dtype=tl.float32)
    for k0 in tl.range(pid_k * BK, K_PAD, BK * SPLIT_K, num_stages=NUM_STAGES):
        xk = _x_tile(x_row, k0, K, BK, MASK_K)
        if GT == 1:
            s, z = _scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP, BITS)
            s_w = s[:, None]
            sz_w = (s * z)[:, None]
        else:
            st, zt = _tile_scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP, BITS, GT)
            s_w = _per_word(st, BLOCK_N, GT, BK * BITS // 32 // GT)
            sz_w = _per_word(st * zt, BLOCK_N, GT, BK * BITS // 32 // GT)
        xw = tl.sum(tl.reshape(xk, (BK * BITS // 32, 32 // BITS)), axis=1)
        if ASM:
            sums = _word_sums_asm(ptrs, xk, BITS, BLOCK_N, BK)
        else:
            sums = _word_sums(ptrs, xk, BITS, BLOCK_N, BK)
        acc += s_w * sums - sz_w * xw[None, :]
        ptrs += BK * BITS // 32 * SPLIT_K
    out = tl.sum(acc, axis=1)
    _gemv_store(out, y_ptr, b_ptr, rows, rn, N, pid_k, pid_m, stride_ym, HAS_BIAS, SPLIT_K)


# --- The same GEMV with the per-half-word arithmetic in PTX (CUDA only) -----------------------
#
# Compiled from Triton, ``gemv_words_kernel`` still spends ~7 instructions per code (run 4 in
# kernels/NOTES.md): the or-ed constant is rematerialised, the in-thread sum is a tree of FMUL and
# FADD. Written by hand, a
# field one LOP3 ``(w & mask) | 0x4B000000``, one FADD and one FFMA of a serial chain (the high
# half-word shifted down once): ~3.1 instructions per code.


def _half_word_asm(width: int, high: bool) -> str:
    """PTX: ``$0 = $2 + sum_i (f_i * 2^(width*i)) * $(3+i)`` over the fields ``f_i`` of half-word
    ``high`` of the word ``$1`` (see ``gemv_words_kernel`` for the float trick): per field one LOP3
    ``(w & mask_i) | 0x4B000000``, one FADD and one FFMA of a serial chain."""
    fields = 16 // width
    lines = ["{", ".reg .b32 m, f, c;", ".reg .f32 v, a;", "mov.b32 c, 0x4B000000;",
             "shr.b32 m, $1, 16;" if high else "mov.b32 m, $1;", "mov.f32 a, $2;"]
    for i in range(fields):
        mask = ((1 << width) - 1) << (width * i)
        lines += [f"lop3.b32 f, m, {mask:#x}, c, 0xEA;", "mov.b32 v, f;", "sub.rn.f32 v, v, 0f4B000000;",
                  f"fma.rn.f32 a, v, ${3 + i}, a;"]
    lines += ["mov.f32 $0, a;", "}"]
    return " ".join(lines)


def _constraints(width: int) -> str:
    return ",".join(["=f", "r", "f"] + ["f"] * (16 // width))


_ASM_LO2: tl.constexpr = tl.constexpr(_half_word_asm(2, False))
_ASM_HI2: tl.constexpr = tl.constexpr(_half_word_asm(2, True))
_ASM_LO4: tl.constexpr = tl.constexpr(_half_word_asm(4, False))
_ASM_HI4: tl.constexpr = tl.constexpr(_half_word_asm(4, True))
_ASM_LO8: tl.constexpr = tl.constexpr(_half_word_asm(8, False))
_ASM_HI8: tl.constexpr = tl.constexpr(_half_word_asm(8, True))
_CON2: tl.constexpr = tl.constexpr(_constraints(2))
_CON4: tl.constexpr = tl.constexpr(_constraints(4))
_CON8: tl.constexpr = tl.constexpr(_constraints(8))


@triton.jit
def _halves(t):
    """``t[..., 2k]`` and ``t[..., 2k + 1]`` of a last axis of even length."""
    return tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))


@triton.jit
def _word_sums_asm(ptrs, xk, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr):
    """:func:`_word_sums` with the arithmetic in PTX (``WIDTH`` 2, 4 or 8)."""
    NW: tl.constexpr = BK * WIDTH // 32
    words = tl.load(ptrs)
    xs = _slot_scaled_x(xk, WIDTH, BK)  # [NW, P], code order
    xe, xo = _halves(xs)  # even codes (low half-word), odd codes (high half-word): [NW, P/2]
    zero = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
    if WIDTH == 8:
        e0, e1 = _halves(xe)
        o0, o1 = _halves(xo)
        acc = tl.inline_asm_elementwise(_ASM_LO8, _CON8, [words, zero, e0.reshape(1, NW), e1.reshape(1, NW)],
                                        dtype=tl.float32, is_pure=True, pack=1)
        acc = tl.inline_asm_elementwise(_ASM_HI8, _CON8, [words, acc, o0.reshape(1, NW), o1.reshape(1, NW)],
                                        dtype=tl.float32, is_pure=True, pack=1)
    elif WIDTH == 4:
        e02, e13 = _halves(xe)  # fields 0, 2 | 1, 3
        e0, e2 = _halves(e02)
        e1, e3 = _halves(e13)
        o02, o13 = _halves(xo)
        o0, o2 = _halves(o02)
        o1, o3 = _halves(o13)
        acc = tl.inline_asm_elementwise(
            _ASM_LO4, _CON4, [words, zero, e0.reshape(1, NW), e1.reshape(1, NW), e2.reshape(1, NW), e3.reshape(1, NW)],
            dtype=tl.float32, is_pure=True, pack=1)
        acc = tl.inline_asm_elementwise(
            _ASM_HI4, _CON4, [words, acc, o0.reshape(1, NW), o1.reshape(1, NW), o2.reshape(1, NW), o3.reshape(1, NW)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        e0246, e1357 = _halves(xe)
        e04, e26 = _halves(e0246)
        e15, e37 = _halves(e1357)
        e0, e4 = _halves(e04)
        e2, e6 = _halves(e26)
        e1, e5 = _halves(e15)
        e3, e7 = _halves(e37)
        o0246, o1357 = _halves(xo)
        o04, o26 = _halves(o0246)
        o15, o37 = _halves(o1357)
        o0, o4 = _halves(o04)
        o2, o6 = _halves(o26)
        o1, o5 = _halves(o15)
        o3, o7 = _halves(o37)
        acc = tl.inline_asm_elementwise(
            _ASM_LO2, _CON2, [words, zero, e0.reshape(1, NW), e1.reshape(1, NW), e2.reshape(1, NW), e3.reshape(1, NW),
                              e4.reshape(1, NW), e5.reshape(1, NW), e6.reshape(1, NW), e7.reshape(1, NW)],
            dtype=tl.float32, is_pure=True, pack=1)
        acc = tl.inline_asm_elementwise(
            _ASM_HI2, _CON2, [words, acc, o0.reshape(1, NW), o1.reshape(1, NW), o2.reshape(1, NW), o3.reshape(1, NW),
                              o4.reshape(1, NW), o5.reshape(1, NW), o6.reshape(1, NW), o7.reshape(1, NW)],
            dtype=tl.float32, is_pure=True, pack=1)
    return acc


# --- GEMV in float16 pairs (CUDA cores, two codes per instruction) -----------------------------
#
# Why a third GEMV: with tiles of several groups the float32 kernels above are issue-bound again
# (kernels/NOTES.md, run 6: 4.9 instructions per code, ~39 us of issue at 8192x28672 against a
# ~43 us memory floor), and 2 and 3 bits cannot beat 4 bits there at all. Here two codes move
# through every instruction: slot ``j`` (code ``2j``) and slot ``j + P/2`` (code ``2j + 1``) of a
# word are 16 bits apart (see ``_format``), so one LOP3 ``(w & mask) | 0x64006400`` makes the
# float16 pair ``1024 + f * 2^(width*i)``, one ``fma.f16x2`` by ``2^-(width*i)`` with addend
# ``-1024 * 2^-(width*i)`` gives both fields exactly, and one ``fma.f16x2`` multiplies by the
# activation pair (activations are read as int32: ``x[2p], x[2p+1]`` is already a float16 pair, in
# the codes' order) and adds. A word's pairs accumulate in float16 (4 products a lane at 4 bits, 8
# at 2, 5 or 6 in a word of a 3-bit unit) and leave through float32, where the group scale is
# applied; the zero enters per word (per unit at 3 bits) in float32, ``- s z sum_w x`` (the
# activation sums are shared by a thread's rows). Every constant is an immediate: nothing is
# computed per word but the arithmetic (about 2.1 instructions per code at 4 bits against 4.9).
# 3-bit units (``_format``) keep 15 of their 16 pairs whole in one word (fields at bits 0, 3, 6,
# then 0 and 3 of the word shifted down 9), so a 3-bit code costs what a 4-bit one does; the pair
# spread over the three words' spare bits takes 7 instructions (``_h2_spare``). kernels/NOTES.md,
# run 14: the earlier 2-bit + 1-bit planes cost twice the instructions of 4 bits.
# Float16 partial sums cost accuracy: ~5e-4 relative against the float32
# reference (tests: 2e-3), and a word's partial sum overflows past 65504, i.e. with activations
# beyond ~1000 on every code of a word. Float16 activations only (bfloat16 pairs have too few
# mantissa bits for the trick) and 2, 3 and 4 bits (8-bit codes times x overflow sooner).


@triton.jit
def _h2_half(v, HIGH: tl.constexpr):
    """Half ``HIGH`` of int32 float16 pairs as float32 (interpreter path)."""
    if HIGH:
        b = (v >> 16) & 0xFFFF
    else:
        b = v & 0xFFFF
    return b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _h2_step(src, xp, h, J: tl.constexpr, FIRST: tl.constexpr, WIDTH: tl.constexpr, ASM: tl.constexpr):
    """``h + f * x`` for the pair of fields ``J`` of every word ``src`` (fields ``J`` at bits
    ``WIDTH * J`` and ``16 + WIDTH * J``; the caller shifts the words down for fields past bit 9);
    ``FIRST``: ``h`` is not read (it starts the sum).

    ``ASM``: float16 pairs in PTX, ``h`` an int32 float16 pair. Otherwise (the interpreter) the same
    bit manipulation with float32 arithmetic, ``h`` float32 (both halves summed).
    """
    MASK: tl.constexpr = ((1 << WIDTH) - 1) * 65537 << (WIDTH * J)
    E: tl.constexpr = -WIDTH * J  # the field is read times 2^-(WIDTH*J)
    M_BITS: tl.constexpr = ((15 + E) << 10) * 65537  # 2^E, a float16 pair
    C_BITS: tl.constexpr = (((25 + E) << 10) | 0x8000) * 65537  # -1024 * 2^E, a float16 pair
    if ASM:
        # the constants go in as operands and come back as immediates (ptxas folds them)
        mask = tl.full(src.shape, MASK, tl.int32)
        mb = tl.full(src.shape, M_BITS, tl.int32)
        cb = tl.full(src.shape, C_BITS, tl.int32)
        if FIRST:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 v; lop3.b32 v, $1, $2, 0x64006400, 0xEA; fma.rn.f16x2 v, v, $3, $4; "
                "mul.rn.f16x2 $0, v, $5; }",
                "=r,r,r,r,r,r", [src, mask, mb, cb, xp], dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 v; lop3.b32 v, $1, $2, 0x64006400, 0xEA; fma.rn.f16x2 v, v, $3, $4; "
                "fma.rn.f16x2 $0, v, $5, $6; }",
                "=r,r,r,r,r,r,r", [src, mask, mb, cb, xp, h], dtype=tl.int32, is_pure=True, pack=1)
    else:
        M_F: tl.constexpr = (1 << (E + 8)) / 256.0
        v = (src & MASK) | 0x64006400
        lo = _h2_half(v, False) * M_F - 1024.0 * M_F
        hi = _h2_half(v, True) * M_F - 1024.0 * M_F
        return h + lo * _h2_half(xp, False) + hi * _h2_half(xp, True)


@triton.jit
def _h2_add(a, b, ASM: tl.constexpr):
    """``a + b`` of float16 pairs (int32); float32 sums of both halves in the interpreter."""
    if ASM:
        return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return a + _h2_half(b, False) + _h2_half(b, True)


@triton.jit
def _h2_sum(h, ASM: tl.constexpr):
    """Sum of both halves of float16 pairs, float32."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, u; .reg .f32 a, b; mov.b32 {l, u}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, u; "
            "add.f32 $0, a, b; }", "=f,r", [h], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return h


@triton.jit
def _h2_plane(words, x32, k0, s_w, acc, K, WIDTH: tl.constexpr, BK: tl.constexpr, MASK_K: tl.constexpr,
              ASM: tl.constexpr):
    """``acc[n, w] + s * sum_{c in word w} f_c x_c`` for the words [BLOCK_N, NW] of a 2- or 4-bit
    tile (``s_w``: the scale of each word's group), and ``sum_{c in word w} x_c`` [NW] (float32)."""
    PAIRS: tl.constexpr = 16 // WIDTH  # code pairs a word
    PER: tl.constexpr = 8 // WIDTH  # pairs a byte shift: fields past bit 9 would overflow 1024 + f
    NW: tl.constexpr = BK * WIDTH // 32
    shifted = words >> 8
    pair0 = k0 // 2 + tl.arange(0, NW) * PAIRS  # int32 index of each word's first activation pair
    if ASM:
        h = tl.zeros(words.shape, dtype=tl.int32)
        xs = tl.zeros([NW], dtype=tl.int32)
    else:
        h = tl.zeros(words.shape, dtype=tl.float32)
        xs = tl.zeros([NW], dtype=tl.float32)
    for i in tl.static_range(PAIRS):
        xp = _x_pair(x32, pair0 + i, K, MASK_K)
        if i < PER:
            h = _h2_step(words, xp[None, :], h, i % PER, i == 0, WIDTH, ASM)
        else:
            h = _h2_step(shifted, xp[None, :], h, i % PER, i == 0, WIDTH, ASM)
        xs = _h2_xsum(xs, xp, i == 0, ASM)
    return acc + s_w * _h2_sum(h, ASM), _h2_sum(xs, ASM)


@triton.jit
def _x_pair(x32, pair, K, MASK_K: tl.constexpr):
    """Activation pairs ``pair`` (int32 index: ``x[2 pair], x[2 pair + 1]``), zero past ``K``."""
    if MASK_K:
        return tl.load(x32 + pair, mask=pair * 2 < K, other=0)
    else:
        return tl.load(x32 + pair)


@triton.jit
def _h2_xsum(xs, xp, FIRST: tl.constexpr, ASM: tl.constexpr):
    """Running sum of activation pairs (float16 pairs; float32 in the interpreter)."""
    if FIRST and ASM:
        return xp
    else:
        return _h2_add(xs, xp, ASM)


@triton.jit
def _h2_unit_word(w, x32, pair0, P: tl.constexpr, K, MASK_K: tl.constexpr, ASM: tl.constexpr):
    """Word ``P`` of 3-bit units [BLOCK_N, NU]: ``sum f x`` over its five whole pairs ``5P + i``
    (float16 pair, or float32 in the interpreter), and the sum of their activation pairs [NU]."""
    shifted = w >> 9  # fields 3 and 4 (bits 9-14) down to 0-5: 1024 + f * 2^(3j) must stay below 2048
    if ASM:
        h = tl.zeros(w.shape, dtype=tl.int32)
        xs = tl.zeros([w.shape[1]], dtype=tl.int32)
    else:
        h = tl.zeros(w.shape, dtype=tl.float32)
        xs = tl.zeros([w.shape[1]], dtype=tl.float32)
    for i in tl.static_range(5):
        xp = _x_pair(x32, pair0 + 5 * P + i, K, MASK_K)
        if i < 3:
            h = _h2_step(w, xp[None, :], h, i, i == 0, 3, ASM)
        else:
            h = _h2_step(shifted, xp[None, :], h, i - 3, False, 3, ASM)
        xs = _h2_xsum(xs, xp, i == 0, ASM)
    return h, xs


@triton.jit
def _h2_spare(s0, s1, s2, xp, h, ASM: tl.constexpr):
    """``h + f * x`` for codes 30 and 31 of 3-bit units, whose bit ``p`` is bit 6 (and 22) of
    ``s_p``, word ``p`` shifted down 9. Three LOP3s make ``1024 + 64 b_p`` pairs; three
    ``fma.f16x2`` give ``b_0 + 2 b_1 + 4 b_2`` exactly (every partial value is a small integer:
    ``4 b_2 - 48``, ``+ 2 b_1 + 32 - 64``... see the constants); one more multiplies by ``x``."""
    if ASM:
        mask = tl.full(s0.shape, 0x00400040, tl.int32)
        c16 = tl.full(s0.shape, 0x2C002C00, tl.int32)  # 1/16
        c112 = tl.full(s0.shape, -687810816, tl.int32)  # -112 (0xD700D700)
        c32 = tl.full(s0.shape, 0x28002800, tl.int32)  # 1/32
        c64 = tl.full(s0.shape, 0x24002400, tl.int32)  # 1/64
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b, c, t; lop3.b32 a, $1, $4, 0x64006400, 0xEA; lop3.b32 b, $2, $4, 0x64006400, 0xEA; "
            "lop3.b32 c, $3, $4, 0x64006400, 0xEA; fma.rn.f16x2 t, c, $5, $6; fma.rn.f16x2 t, b, $7, t; "
            "fma.rn.f16x2 t, a, $8, t; fma.rn.f16x2 $0, t, $9, $10; }",
            "=r,r,r,r,r,r,r,r,r,r,r", [s0, s1, s2, mask, c16, c112, c32, c64, xp, h], dtype=tl.int32,
            is_pure=True, pack=1)
    else:
        lo = (((s0 >> 6) & 1) | (((s1 >> 6) & 1) << 1) | (((s2 >> 6) & 1) << 2)).to(tl.float32)
        hi = (((s0 >> 22) & 1) | (((s1 >> 22) & 1) << 1) | (((s2 >> 22) & 1) << 2)).to(tl.float32)
        return h + lo * _h2_half(xp, False) + hi * _h2_half(xp, True)


@triton.jit
def _h2_units(w0, w1, w2, x32, k0, s_w, acc, K, BK: tl.constexpr, MASK_K: tl.constexpr, ASM: tl.constexpr):
    """``_h2_plane`` for 3-bit units (words ``w0, w1, w2`` [BLOCK_N, BK // 32] of the three planes):
    ``acc[n, u] + s * sum_{c in unit u} f_c x_c`` and ``sum_{c in unit u} x_c`` [BK // 32]."""
    pair0 = k0 // 2 + tl.arange(0, BK // 32) * 16  # a unit's first activation pair
    h0, xs0 = _h2_unit_word(w0, x32, pair0, 0, K, MASK_K, ASM)
    h1, xs1 = _h2_unit_word(w1, x32, pair0, 1, K, MASK_K, ASM)
    h2, xs2 = _h2_unit_word(w2, x32, pair0, 2, K, MASK_K, ASM)
    xp = _x_pair(x32, pair0 + 15, K, MASK_K)
    h2 = _h2_spare(w0 >> 9, w1 >> 9, w2 >> 9, xp[None, :], h2, ASM)
    # each word's pairs leave float16 on their own (at most 6 products a lane, fewer than a 2-bit
    # word's 8); the activation sums too (shared by a thread's rows)
    xs = _h2_sum(xs0, ASM) + _h2_sum(xs1, ASM) + _h2_sum(xs2, ASM) + (_h2_half(xp, False) + _h2_half(xp, True))
    return acc + s_w * (_h2_sum(h0, ASM) + _h2_sum(h1, ASM) + _h2_sum(h2, ASM)), xs


@triton.jit
def _h2_words(ptrs, k0, K_PAD, WIDTH: tl.constexpr, BK: tl.constexpr, TAIL: tl.constexpr):
    """The words of one plane's tile; with ``TAIL`` those past the row's last are 0 (and meet zero
    activations: ``MASK_K`` is set with it)."""
    # read once per call: evict them first, keep the activations and scales in L2
    if TAIL:
        w = k0 * WIDTH // 32 + tl.arange(0, BK * WIDTH // 32)
        return tl.load(ptrs, mask=(w < K_PAD * WIDTH // 32)[None, :], other=0, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, eviction_policy="evict_first")


@triton.jit
def gemv_h2_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr,
                   N, K, K_PAD, G, G_PAD, stride_xm, stride_ym,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                   ASM: tl.constexpr = False, GT: tl.constexpr = 1, TAIL: tl.constexpr = False,
                   GATED: tl.constexpr = False):
    """Same contract and grid as :func:`gemv_kernel` for float16 activations (even ``K``, rows
    4-byte aligned) and 2, 3 or 4 bits; see the section comment. ``ASM`` (CUDA only) runs the pairs
    in PTX; the interpreter runs the same bit manipulation in float32. ``TAIL``: ``BK`` does not
    divide ``K_PAD``, the last tile's words past the row are masked (``MASK_K`` must be set too).
    ``GATED`` (``SPLIT_K`` 1; see ``_gated``): the rows are a gate's then an up projection's, the
    output ``silu(gate) * up`` (``N // 2`` values, the grid over them).
    """
    pid_k, pid_m, rn, rows, x_row, ptrs = _gemv_program(x_ptr, qw_ptr, N, K_PAD, stride_xm, BITS, BLOCK_N, BK,
                                                        GATED)
    out = _h2_sums(x_row, ptrs, s_ptr, qz_ptr, rows, pid_k, K, K_PAD, G, G_PAD, BITS, GROUP, MASK_K, BLOCK_N,
                   BK, SPLIT_K, NUM_STAGES, ASM, GT, TAIL)
    if GATED:
        _gated_store(out, y_ptr, b_ptr, rows, rn, N, pid_m, stride_ym, HAS_BIAS, BLOCK_N)
    else:
        _gemv_store(out, y_ptr, b_ptr, rows, rn, N, pid_k, pid_m, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def _h2_sums(x_row, ptrs, s_ptr, qz_ptr, rows, pid_k, K, K_PAD, G, G_PAD, BITS: tl.constexpr,
             GROUP: tl.constexpr, MASK_K: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
             SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, ASM: tl.constexpr, GT: tl.constexpr,
             TAIL: tl.constexpr):
    """``gemv_h2``'s K loop: the float32 sums ``[BLOCK_N]`` of a program's rows over its K split."""
    x32 = x_row.to(tl.pointer_type(tl.int32))
    WIDTH: tl.constexpr = 1 if BITS == 3 else BITS  # 3 bits: a unit of 32 codes per word of each plane
    NW: tl.constexpr = BK * WIDTH // 32
    acc = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
    for k0 in tl.range(pid_k * BK, K_PAD, BK * SPLIT_K, num_stages=NUM_STAGES):
        if GT == 1:
            s, z = _scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP, BITS)
            st = s[:, None]
            zt = z[:, None]
        else:
            # no select per word: past K the activation pairs are zero (masked loads)
            st, zt = _tile_scale_zero(s_ptr, qz_ptr, rows, k0, G, G_PAD, GROUP, BITS, GT, False)
        s_w = _per_word(st, BLOCK_N, GT, NW // GT)
        if BITS == 3:
            w0 = _h2_words(ptrs, k0, K_PAD, 1, BK, TAIL)
            w1 = _h2_words(ptrs + K_PAD // 32, k0, K_PAD, 1, BK, TAIL)
            w2 = _h2_words(ptrs + 2 * (K_PAD // 32), k0, K_PAD, 1, BK, TAIL)
            acc, xw = _h2_units(w0, w1, w2, x32, k0, s_w, acc, K, BK, MASK_K, ASM)
        else:
            words = _h2_words(ptrs, k0, K_PAD, BITS, BK, TAIL)
            acc, xw = _h2_plane(words, x32, k0, s_w, acc, K, BITS, BK, MASK_K, ASM)
        # the zero, per word (per unit at 3 bits): - s z sum_{c in w} x_c
        acc -= _per_word(st * zt, BLOCK_N, GT, NW // GT) * xw[None, :]
        ptrs += NW * SPLIT_K
    return tl.sum(acc, axis=1)


@triton.jit
def _gated_store(out, y_ptr, b_ptr, rows, rn, N, pid_m, stride_ym, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store ``silu(gate) * up`` of a ``GATED`` program's sums (rows alternating gate, up), rounding
    as transformers' modules do: each projection to float16, ``silu`` of the gate to float16, then
    the product."""
    if HAS_BIAS:
        out += tl.load(b_ptr + rows).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    gate, up = tl.split(tl.reshape(out.to(dt).to(tl.float32), (BLOCK_N // 2, 2)))
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    rn = tl.reshape(rn, (BLOCK_N // 2, 2)).max(axis=1)  # each output index appears twice
    tl.store(y_ptr + pid_m * stride_ym + rn, (act * up).to(dt), mask=rn < N // 2)


@triton.jit
def gemv_h2_rope_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                        N, K, K_PAD, G, G_PAD, stride_xm, stride_qm, stride_cb, stride_ch, stride_cs, stride_rm,
                        Q_HEADS, KV_HEADS,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BK: tl.constexpr, NUM_STAGES: tl.constexpr, ASM: tl.constexpr,
                        GT: tl.constexpr, TAIL: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``gemv_h2`` over a fused ``[q | k | v]`` weight (heads of ``HEAD_DIM`` rows) for one new token
    per activation row (axis 2: the batch), with rotary embedding and the KV-cache write in its
    epilogue (see ``_rope``): each program's rows alternate ``d`` and ``d + HEAD_DIM / 2`` of a head,
    the pair rotary embedding mixes. It stores the rotated query ``[Q_HEADS * HEAD_DIM]`` at ``q_ptr``
    and the rotated key and the value of ``KV_HEADS`` heads in the caches at position ``*pos_ptr``
    (``[batch, head, position, HEAD_DIM]`` with strides ``stride_cb, stride_ch, stride_cs``, unit
    last). ``cos_ptr``/``sin_ptr``: the token's ``[HEAD_DIM]`` rotary tables (batch stride
    ``stride_rm``). No K split: the epilogue needs whole sums."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_k, pid_m, _, rows, x_row, ptrs = _gemv_program(x_ptr, qw_ptr, N, K_PAD, stride_xm, BITS, BLOCK_N, BK,
                                                        False, HALF)
    first = tl.program_id(0) * (BLOCK_N // 2)  # the program's pairs share a head: one destination
    head = first // HALF
    d = first % HALF + tl.arange(0, BLOCK_N // 2)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows).to(tl.float32)
    out = _h2_sums(x_row, ptrs, s_ptr, qz_ptr, rows, pid_k, K, K_PAD, G, G_PAD, BITS, GROUP, MASK_K, BLOCK_N,
                   BK, 1, NUM_STAGES, ASM, GT, TAIL)
    if HAS_BIAS:
        out += bias
    # loaded after the K loop: before it, they kept the kernel's 4-bit program at 168 registers a thread
    # instead of 128 (3 programs an SM for 4), and cost more than their late latency (kernels/NOTES.md, run 28)
    table = pid_m * stride_rm + d
    cos_a = tl.load(cos_ptr + table).to(tl.float32)
    cos_b = tl.load(cos_ptr + table + HALF).to(tl.float32)
    sin_a = tl.load(sin_ptr + table).to(tl.float32)
    sin_b = tl.load(sin_ptr + table + HALF).to(tl.float32)
    pos = tl.load(pos_ptr).to(tl.int64)
    dt = q_ptr.dtype.element_ty
    # each projection rounds to float16 (as transformers' q/k/v), the rotation once from float32 (as
    # Inductor's kernel for transformers' apply_rotary_pos_emb)
    a, b = tl.split(tl.reshape(out.to(dt).to(tl.float32), (BLOCK_N // 2, 2)))
    if head < Q_HEADS + KV_HEADS:  # values are not rotated
        lo = (a * cos_a - b * sin_a).to(dt)  # rotate_half: (-x2, x1)
        hi = (b * cos_b + a * sin_b).to(dt)
    else:
        lo = a.to(dt)
        hi = b.to(dt)
    if head < Q_HEADS:
        dst = q_ptr + pid_m * stride_qm + head * HEAD_DIM
    elif head < Q_HEADS + KV_HEADS:
        dst = kc_ptr + pid_m * stride_cb + (head - Q_HEADS) * stride_ch + pos * stride_cs
    else:
        dst = vc_ptr + pid_m * stride_cb + (head - Q_HEADS - KV_HEADS) * stride_ch + pos * stride_cs
    tl.store(dst + d, lo)
    tl.store(dst + d + HALF, hi)
