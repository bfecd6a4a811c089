"""The Gluon kernel of ``_skinny`` (layouts, the k order and the arithmetic are explained there).

Imported only through ``_skinny._gluon``: a Triton without Gluon's ``mma_v2`` raises here and the
one-row Triton kernels are used instead. Gluon kernels do not run under ``TRITON_INTERPRET``; the
CPU tests compile this one for sm_90 and check its code (``tests/kernels/test_skinny.py``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ._few_rows_kernels import _activations, _zero_of_unit, _zero_of_word

# renamed to ``barrier`` after Triton 3.6
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.constexpr_function
def _shift(bits):
    """Bits a word is shifted right by for its fields that do not fit below bit 10 of a half."""
    return {2: 10, 3: 9, 4: 8, 8: 8}[bits]


@gluon.jit
def _offsets(p, BITS: gl.constexpr):
    """For field position ``p`` of a word (the low half's field ``p`` sits at bit ``BITS * p``):
    whether it is read from the shifted word, and its bit offset there."""
    SH: gl.constexpr = _shift(BITS)
    hi = p * BITS + BITS > 10
    return hi, gl.where(hi, p * BITS - SH, p * BITS)


@gluon.jit
def _split_steps(t, D: gl.constexpr):
    """The D tensors t[..., d] of a tensor whose last dimension (in registers) is D = 1, 2 or 4."""
    if D == 1:
        return (gl.reshape(t, t.shape[:-1]),)
    elif D == 2:
        a, b = gl.split(t)
        return (a, b)
    else:
        lo, hi = gl.split(gl.reshape(t, t.shape[:-1] + [2, 2]))
        a, c = gl.split(lo)
        b, d = gl.split(hi)
        return (a, b, c, d)


@gluon.jit
def _load_chunk(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, d_w, d_s, G, c0, i1, plane, zplane,
                BITS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr):
    """Steps ``c0 .. c0 + D - 1``'s words (2/4/8 bits: [BR, 4, BITS, D]; 3 bits: the units' three
    words, each [BR, 4, D]), and each row's scale and packed zero word(s) [BR, D]; steps past the
    last (``i1 - 1``) load the last again."""
    P: gl.constexpr = 32 // BITS
    step_w = gl.minimum(c0 + d_w, i1 - 1)
    step_s = gl.minimum(c0 + d_s, i1 - 1)
    grp = gl.minimum((step_s * 128) // GROUP, G - 1)
    s = gl.load(s_ptr + srow + grp)
    if BITS == 3:
        at = qw_ptr + w_off + step_w * 4
        words = (gl.load(at), gl.load(at + plane), gl.load(at + 2 * plane))
        zat = qz_ptr + zrow + grp // 32
        zw = (gl.load(zat), gl.load(zat + zplane), gl.load(zat + 2 * zplane))
    else:
        words = gl.load(qw_ptr + w_off + step_w * (4 * BITS))
        zw = gl.load(qz_ptr + zrow + grp // P)
    return words, s, zw


@gluon.jit
def _rows_to_mma(v, R: gl.constexpr, NW: gl.constexpr, LM: gl.constexpr):
    """Per-row values [BR] indexed by weight row ``16 NW r + 16 w + 2 g + h`` as MMA rows
    ``16 NW r + 16 w + 8 h + g`` (the same thread holds both)."""
    v = gl.reshape(gl.permute(gl.reshape(v, [R, NW, 8, 2]), [0, 1, 3, 2]), [R * NW * 16])
    return gl.convert_layout(v, LM, assert_trivial=True)


@gluon.jit
def _zero(zw, grp, BITS: gl.constexpr):
    """Each row's zero of group ``grp`` from its packed zero word(s) (``_format``)."""
    if BITS == 3:
        z0, z1, z2 = zw
        return _zero_of_unit(z0, z1, z2, grp)
    else:
        return _zero_of_word(zw, grp, BITS)


@gluon.jit
def _to_a(f, R: gl.constexpr, NW: gl.constexpr, DA: gl.constexpr):
    """float16 pairs [BR, 4, 16 pairs, 2] (row ``16 NW r + 16 w + 2 g + h`` of thread ``4 g + t``'s
    codes ``32 t + 2 j + e``) as the A operand [BR, 128]: MMA row ``16 NW r + 16 w + 8 h + g``, k
    ``16 (j // 2) + 8 (j % 2) + 2 t + e``."""
    f = gl.reshape(f, [R, NW, 8, 2, 4, 8, 2, 2])
    f = gl.permute(f, [0, 1, 3, 2, 5, 6, 4, 7])
    return gl.convert_layout(gl.reshape(f, [R * 16 * NW, 128]), DA, assert_trivial=True)


@gluon.jit
def _tile_rows(v, R: gl.constexpr, MMA: gl.constexpr):
    """[16 NW, 8] repeated R times along the rows (registers only)."""
    if R >= 2:
        v = gl.reshape(gl.permute(gl.join(v, v), [2, 0, 1]), [2 * v.shape[0], v.shape[1]])
    if R == 4:
        v = gl.reshape(gl.permute(gl.join(v, v), [2, 0, 1]), [2 * v.shape[0], v.shape[1]])
    return gl.convert_layout(v, MMA, assert_trivial=True)


@gluon.jit
def _pairs(words, LW: gl.constexpr, BITS: gl.constexpr):
    """A thread's 16 code pairs of a row as float16 ``C_o + q`` [BR, 4, 16, 2], where the field sat
    at bit ``o`` of its half and ``C_o = 2^(10 - o)`` (one ``lop3`` a pair: the field under a float16
    exponent whose unit in the last place is the field's lowest bit)."""
    SH: gl.constexpr = _shift(BITS)
    MASK: gl.constexpr = (1 << BITS) - 1
    if BITS == 3:
        L2W: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, LW))
        w0, w1, w2 = words
        w0 = gl.expand_dims(gl.expand_dims(gl.convert_layout(w0, L2W, assert_trivial=True), 2), 3)
        w1 = gl.expand_dims(gl.expand_dims(gl.convert_layout(w1, L2W, assert_trivial=True), 2), 3)
        w2 = gl.expand_dims(gl.expand_dims(gl.convert_layout(w2, L2W, assert_trivial=True), 2), 3)
        j = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LW)))), 0), 1), 3)
        # pair j = 5 p + i of the unit is in word p at bit 3 i (i >= 3: after the shift), pair 15
        # gathered from the spare bits at bit 0
        spare = ((w0 >> 15) & 0x00010001) | ((w1 >> 14) & 0x00020002) | ((w2 >> 13) & 0x00040004)
        i = j % 5
        word = gl.where(j < 5, w0, gl.where(j < 10, w1, w2))
        pw = gl.where(j == 15, spare, gl.where(i >= 3, word >> SH, word))
        o = gl.where(j == 15, 0, gl.where(i >= 3, 3 * i - SH, 3 * i))
    else:
        PPW: gl.constexpr = 16 // BITS
        # [BR, 4, BITS, PPW, 2]
        p = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, PPW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, LW))))),
            0), 1), 2), 4)
        hi, o = _offsets(p, BITS)
        w5 = gl.expand_dims(gl.expand_dims(words, 3), 4)
        pw = gl.where(hi, w5 >> SH, w5)
    mask = (MASK << o) * 65537
    magic = ((25 - o) << 10) * 65537
    pw, mask = gl.broadcast(pw, mask)
    pw, magic = gl.broadcast(pw, magic)
    if BITS != 3:
        pw, _ = gl.broadcast(pw, gl.full([1, 1, 1, 1, 2], 0, gl.int32, LW))
        mask, _ = gl.broadcast(mask, pw)
        magic, _ = gl.broadcast(magic, pw)
    else:
        pw, _ = gl.broadcast(pw, gl.full([1, 1, 1, 2], 0, gl.int32, LW))
        mask, _ = gl.broadcast(mask, pw)
        magic, _ = gl.broadcast(magic, pw)
    return gl.inline_asm_elementwise("lop3.b32 $0, $1, $3, $5, 0xEA;", "=r,r,r,r,r,r,r", [pw, mask, magic],
                                     dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _constant_rows(LW: gl.constexpr, BITS: gl.constexpr, NW: gl.constexpr):
    """The pairs of ``_pairs``' layout for an A operand whose MMA rows ``g = 0`` hold each k's
    ``C_o`` and rows ``g = 1`` hold ones (rows 0, 8 and 1, 9 of each warp's 16), the rest zeros:
    its product with the activations gives every step's ``sum_k C_o(k) x_k`` and ``sum_k x_k``."""
    if BITS == 3:
        r = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 16 * NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LW)))), 1), 2), 3)
        j = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LW)))), 0), 1), 3)
        i = j % 5
        o = gl.where(j == 15, 0, gl.where(i >= 3, 3 * i - _shift(BITS), 3 * i))
        full = gl.full([1, 4, 1, 2], 0, gl.int32, LW)
    else:
        PPW: gl.constexpr = 16 // BITS
        r = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 16 * NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, LW))))),
            1), 2), 3), 4)
        p = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, PPW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, LW))))),
            0), 1), 2), 4)
        _, o = _offsets(p, BITS)
        full = gl.full([1, 4, BITS, 1, 2], 0, gl.int32, LW)
    g = (r % 16) // 2
    bits16 = gl.where(g == 0, (25 - o) << 10, gl.where(g == 1, 0x3C00, 0))
    v, _ = gl.broadcast(bits16 * 65537, full)
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [v], dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _shfl(v, src):
    """``v`` of lane ``src`` (element by element; all lanes take part)."""
    return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=f,f,r", [v, src],
                                     dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _step(y, words, s, zw, grp, xv, a_const, src_p, src_q, LW: gl.constexpr, LX3: gl.constexpr,
          DA: gl.constexpr, DB: gl.constexpr, MMA: gl.constexpr, BITS: gl.constexpr, R: gl.constexpr,
          NW: gl.constexpr):
    f = _pairs(words, LW, BITS)
    if BITS == 3:
        a = _to_a(f, R, NW, DA)
    else:
        a = _to_a(gl.reshape(f, [R * 16 * NW, 4, 16, 2]), R, NW, DA)
    x3 = gl.expand_dims(xv, 2)
    x3, _ = gl.broadcast(x3, gl.full([1, 1, 2], 0, gl.int32, LX3))
    xh = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x3], dtype=gl.float16, is_pure=True, pack=2)
    # token n's codes 32 t + 2 j + e at k = 16 (j // 2) + 8 (j % 2) + 2 t + e, as the weights'
    xh = gl.permute(gl.reshape(xh, [8, 4, 8, 2, 2]), [2, 3, 1, 4, 0])
    b = gl.convert_layout(gl.reshape(xh, [128, 8]), DB, assert_trivial=True)
    acc = mma_v2(a, b, gl.zeros([R * 16 * NW, 8], gl.float32, MMA))
    pq = mma_v2(a_const, b, gl.zeros([16 * NW, 8], gl.float32, MMA))
    c_sum = _tile_rows(_shfl(pq, src_p), R, MMA)  # sum_k C_o(k) x_k of the thread's token columns
    x_sum = _tile_rows(_shfl(pq, src_q), R, MMA)  # sum_k x_k
    LM: gl.constexpr = gl.SliceLayout(1, MMA)
    z = _rows_to_mma(_zero(zw, grp, BITS), R, NW, LM).to(gl.float32)
    sf = _rows_to_mma(s, R, NW, LM).to(gl.float32)
    d = acc - c_sum - gl.expand_dims(z, 1) * x_sum
    return y + gl.expand_dims(sf, 1) * d


@gluon.jit
def skinny_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                  M, N, K, G, stride_xm, stride_ym, ROW_WORDS, ZROW_WORDS, K_STEPS, STEPS_PER_SPLIT, SPLIT_K,
                  BITS: gl.constexpr, GROUP: gl.constexpr, R: gl.constexpr, NW: gl.constexpr,
                  D: gl.constexpr, MASK_K: gl.constexpr, HAS_BIAS: gl.constexpr):
    BR: gl.constexpr = 16 * R * NW  # weight rows a program
    # a chunk of D steps' words [BR, 4, BITS, D] (3 bits: each plane's [BR, 4, D]): thread 4 g + t
    # holds rows 2 g and 2 g + 1 of each of its warp's 16-row tiles, codes 32 t .. of every step
    if BITS == 3:
        LC: gl.constexpr = gl.BlockedLayout([2, 1, D], [8, 4, 1], [NW, 1, 1], [1, 2, 0])
        LR: gl.constexpr = gl.SliceLayout(2, LC)  # [BR, 4]: (row, t)
        LW: gl.constexpr = gl.BlockedLayout([2, 1, 16, 2], [8, 4, 1, 1], [NW, 1, 1, 1], [3, 2, 1, 0])
    else:
        PPW: gl.constexpr = 16 // BITS
        LC: gl.constexpr = gl.BlockedLayout([2, 1, BITS, D], [8, 4, 1, 1], [NW, 1, 1, 1], [2, 3, 1, 0])
        LR: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, LC))
        LW: gl.constexpr = gl.BlockedLayout([2, 1, BITS, PPW, 2], [8, 4, 1, 1, 1], [NW, 1, 1, 1, 1],
                                            [4, 3, 2, 1, 0])
        L3: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, LW))
    LS: gl.constexpr = gl.BlockedLayout([2, D], [8, 4], [NW, 1], [1, 0])  # [BR, D] per-row values
    # activations as int32 pairs [8 tokens, 64]: thread 4 g + t holds token g's pairs 16 t ..
    LX3: gl.constexpr = gl.BlockedLayout([1, 16, 2], [8, 4, 1], [1, NW, 1], [2, 1, 0])
    LX: gl.constexpr = gl.SliceLayout(2, LX3)
    MMA: gl.constexpr = gl.NVMMADistributedLayout([2, 0], [NW, 1], [16, 8])
    DA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    DB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    LM: gl.constexpr = gl.SliceLayout(1, MMA)

    x_ptr = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    i0 = pid_k * STEPS_PER_SPLIT
    i1 = gl.minimum(i0 + STEPS_PER_SPLIT, K_STEPS)

    rows = gl.minimum(pid_n * BR + gl.arange(0, BR, layout=gl.SliceLayout(1, LR)), N - 1)
    tids = gl.arange(0, 4, layout=gl.SliceLayout(0, LR))
    if BITS == 3:
        w_off = gl.expand_dims(gl.expand_dims(rows * ROW_WORDS, 1) + gl.expand_dims(tids, 0), 2)
        d_w = gl.expand_dims(gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, LC))), 0), 1)
    else:
        cs = gl.arange(0, BITS, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LC))))
        w_off = gl.expand_dims(gl.expand_dims(gl.expand_dims(rows * ROW_WORDS, 1) + gl.expand_dims(tids * BITS, 0), 2)
                               + gl.expand_dims(gl.expand_dims(cs, 0), 1), 3)
        d_w = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LC)))), 0), 1), 2)
    plane = ROW_WORDS // 3
    zplane = ZROW_WORDS // 3
    srows = gl.minimum(pid_n * BR + gl.arange(0, BR, layout=gl.SliceLayout(1, LS)), N - 1)
    srow = gl.expand_dims(srows * G, 1)
    zrow = gl.expand_dims(srows * ZROW_WORDS, 1)
    d_s = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LS)), 0)
    xm = gl.arange(0, 8, layout=gl.SliceLayout(1, LX))
    xk = gl.arange(0, 64, layout=gl.SliceLayout(0, LX))
    x_off = gl.expand_dims(xm * (stride_xm // 2), 1) + gl.expand_dims(xk, 0)
    x_mask_m = gl.expand_dims(xm < M, 1)
    a_const = _to_a(gl.reshape(_constant_rows(LW, BITS, NW), [16 * NW, 4, 16, 2]), 1, NW, DA)
    # the lanes holding rows g = 0 (C-weighted sums) and g = 1 (plain sums) of a token column
    n = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    src_p = gl.expand_dims(n // 2, 0)
    src_q = gl.expand_dims(4 + n // 2, 0)
    src_p, _ = gl.broadcast(src_p, gl.full([16 * NW, 8], 0, gl.int32, MMA))
    src_q, _ = gl.broadcast(src_q, gl.full([16 * NW, 8], 0, gl.int32, MMA))

    y = gl.zeros([BR, 8], gl.float32, MMA)
    # D steps of weights in flight while the D before them are computed; activations one step ahead
    words, s, zw = _load_chunk(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, d_w, d_s, G, i0, i1, plane, zplane,
                               BITS, GROUP, D)
    xv = _activations(x_ptr, x_off, x_mask_m, xk, K, i0, MASK_K)
    for c in range(i0, i1, D):
        nwords, ns, nzw = _load_chunk(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, d_w, d_s, G, c + D, i1, plane,
                                      zplane, BITS, GROUP, D)
        ss = _split_steps(s, D)
        if BITS == 3:
            w0s = _split_steps(words[0], D)
            w1s = _split_steps(words[1], D)
            w2s = _split_steps(words[2], D)
            z0s = _split_steps(zw[0], D)
            z1s = _split_steps(zw[1], D)
            z2s = _split_steps(zw[2], D)
        else:
            ws = _split_steps(words, D)
            zs = _split_steps(zw, D)
        for d in gl.static_range(D):
            step = c + d
            nxv = _activations(x_ptr, x_off, x_mask_m, xk, K, gl.minimum(step + 1, i1 - 1), MASK_K)
            grp = gl.minimum((step * 128) // GROUP, G - 1)
            if step < i1:
                if BITS == 3:
                    y = _step(y, (w0s[d], w1s[d], w2s[d]), ss[d], (z0s[d], z1s[d], z2s[d]), grp, xv, a_const,
                              src_p, src_q, LW, LX3, DA, DB, MMA, BITS, R, NW)
                else:
                    y = _step(y, gl.convert_layout(ws[d], L3, assert_trivial=True), ss[d], zs[d], grp, xv,
                              a_const, src_p, src_q, LW, LX3, DA, DB, MMA, BITS, R, NW)
            xv = nxv
        words, s, zw = nwords, ns, nzw

    m = gl.arange(0, BR, layout=LM)
    yn = gl.expand_dims(pid_n * BR + (m // 16) * 16 + 2 * (m % 8) + (m % 16) // 8, 1)
    ym = gl.expand_dims(n, 0)
    out_mask = (ym < M) & (yn < N)
    y_ptrs = y_ptr + ym * stride_ym + yn
    if SPLIT_K > 1:
        part = ws_ptr + ym * N + yn
        gl.store(part + pid_k * (8 * N), y, mask=out_mask)
        _cta_barrier()
        arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tot = gl.zeros([BR, 8], gl.float32, MMA)
            for sp in range(0, SPLIT_K):
                tot += gl.load(part + sp * (8 * N), mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += gl.load(b_ptr + yn + 0 * ym, mask=yn < N, other=0.0).to(gl.float32)
            gl.store(y_ptrs, tot.to(gl.float16), mask=out_mask)
            gl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
    else:
        if HAS_BIAS:
            y += gl.load(b_ptr + yn + 0 * ym, mask=yn < N, other=0.0).to(gl.float32)
        gl.store(y_ptrs, y.to(gl.float16), mask=out_mask)
