"""The Gluon kernel of ``_few_rows`` (layouts and the k order are explained there).

Imported only through ``_few_rows._gluon``: a Triton without Gluon's ``mma_v2`` raises here and the
Triton tensor-core kernel is used instead. Gluon kernels do not run under ``TRITON_INTERPRET``; the
CPU tests compile this one for sm_90 and check its code (``tests/kernels/test_few_rows.py``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

# renamed to ``barrier`` after Triton 3.6
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# ``cp.async`` to shared memory: renamed ``async_load`` after Triton 3.6
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.constexpr_function
def _pairs_asm(bits):
    mask = ((1 << bits) - 1) * 65537
    # (w & mask) | 0x64006400 is the pair as float16 (1024 + q); minus (1024 + z) is exact; times s
    # rounds once, as the reference does
    return ("{ .reg .b32 t; lop3.b32 t, $1, " + str(mask) + ", 0x64006400, 0xEA; "
            "sub.f16x2 t, t, $3; mul.f16x2 $0, t, $5; }")


@gluon.jit
def _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, i, plane, zplane, BITS: gl.constexpr,
             GROUP: gl.constexpr):
    """Step ``i``'s words [BN, 4, BITS] and each thread's scale and packed zero word. At 3 bits a
    thread's 32 codes are one unit (``_format``): its three words, one a plane ``plane`` words apart,
    as [BN, 4, 2, 2] (the third twice), and likewise the three words of its zero's unit."""
    P: gl.constexpr = 32 // BITS
    grp = gl.expand_dims(gl.minimum((i * 128 + 32 * tids) // GROUP, G - 1), 0)
    s = gl.load(s_ptr + srow + grp)
    if BITS == 3:
        at = qw_ptr + w_off + i * 4
        w2 = gl.load(at + 2 * plane)
        words = gl.join(gl.join(gl.load(at), gl.load(at + plane)), gl.join(w2, w2))
        zat = qz_ptr + zrow + grp // 32
        z2 = gl.load(zat + 2 * zplane)
        zw = gl.join(gl.join(gl.load(zat), gl.load(zat + zplane)), gl.join(z2, z2))
    else:
        words = gl.load(qw_ptr + w_off + i * (4 * BITS))
        zw = gl.load(qz_ptr + zrow + grp // P)
    return words, s, zw, grp


@gluon.jit
def _three(words, L: gl.constexpr):
    """The three words joined by ``_weights`` at 3 bits, each [BN, 4] in layout ``L`` (where they
    were loaded)."""
    a, b = gl.split(words)
    w0, w1 = gl.split(a)
    w2, _ = gl.split(b)
    return (gl.convert_layout(w0, L, assert_trivial=True), gl.convert_layout(w1, L, assert_trivial=True),
            gl.convert_layout(w2, L, assert_trivial=True))


@gluon.jit
def _unit_zero(zw, grp, L: gl.constexpr):
    """Zero ``grp % 32`` of the 3-bit unit whose words ``_weights`` joined into ``zw`` (``_format``:
    pair ``j`` of a unit is in word ``j // 5`` at bits ``3 (j % 5)`` and ``16 + 3 (j % 5)``, zeros 30
    and 31 in the three words' spare bits 15 and 31)."""
    z0, z1, z2 = _three(zw, L)
    return _zero_of_unit(z0, z1, z2, grp)


@gluon.jit
def _zero_of_word(zw, grp, BITS: gl.constexpr):
    """Zero ``grp`` from its packed word ``zw`` at 2, 4 or 8 bits (its slot as the codes', ``_format``)."""
    P: gl.constexpr = 32 // BITS
    c = grp % P
    slot = c // 2 + (c % 2) * (P // 2)
    return (zw >> (slot * BITS)) & ((1 << BITS) - 1)


@gluon.jit
def _zero_of_unit(z0, z1, z2, grp):
    """Zero ``grp % 32`` of the 3-bit unit held by the words ``z0, z1, z2`` (see ``_unit_zero``)."""
    r = grp % 32
    j = r // 2
    hi = (r % 2) * 16
    main = gl.where(j < 5, z0, gl.where(j < 10, z1, z2))
    z = (main >> (hi + 3 * (j % 5))) & 7
    spare = ((z0 >> (15 + hi)) & 1) | (((z1 >> (15 + hi)) & 1) << 1) | (((z2 >> (15 + hi)) & 1) << 2)
    return gl.where(r >= 30, spare, z)


@gluon.jit
def _activations(x_ptr, x_off, x_mask_m, xk, K, i, MASK_K: gl.constexpr):
    """Step ``i``'s activations as int32 float16 pairs [rows, 64] (rows past M and codes past K are 0)."""
    if MASK_K:
        return gl.load(x_ptr + x_off + i * 64, mask=x_mask_m & gl.expand_dims(i * 128 + 2 * xk < K, 0), other=0)
    return gl.load(x_ptr + x_off + i * 64, mask=x_mask_m, other=0)


@gluon.jit
def _step(acc, words, s, zw, grp, xv, shift, LW: gl.constexpr, LX3: gl.constexpr, DA: gl.constexpr,
          DB: gl.constexpr, BITS: gl.constexpr, BLOCK_N: gl.constexpr):
    L2W: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, LW))  # [BN, 4] at 3 bits
    if BITS == 3:
        z = _unit_zero(zw, grp, L2W)
    else:
        z = _zero_of_word(zw, grp, BITS)
    zz = (z | 0x6400) * 65537  # (1024 + z) twice, as float16 bits
    ss = (s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) * 65537
    if BITS == 3:
        # [BN, 4, 16 pairs, 2]: pair j of the unit from word j // 5 shifted by 3 (j % 5), pair 15
        # from the spare bits (the selects and shifts fold: j is a register index)
        w0, w1, w2 = _three(words, L2W)
        w0 = gl.expand_dims(gl.expand_dims(w0, 2), 3)
        w1 = gl.expand_dims(gl.expand_dims(w1, 2), 3)
        w2 = gl.expand_dims(gl.expand_dims(w2, 2), 3)
        j = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LW)))), 0), 1), 3)
        spare = ((w0 >> 15) & 0x00010001) | ((w1 >> 14) & 0x00020002) | ((w2 >> 13) & 0x00040004)
        pw = gl.where(j == 15, spare, gl.where(j < 5, w0, gl.where(j < 10, w1, w2)) >> (3 * (j % 5)))
        pw, _ = gl.broadcast(pw, gl.full([1, 1, 1, 2], 0, gl.int32, LW))
        zz4 = gl.expand_dims(gl.expand_dims(zz, 2), 3)
        ss4 = gl.expand_dims(gl.expand_dims(ss, 2), 3)
        pw, zz4 = gl.broadcast(pw, zz4)
        pw, ss4 = gl.broadcast(pw, ss4)
        f = gl.inline_asm_elementwise(_pairs_asm(BITS), "=r,r,r,r,r,r,r", [pw, zz4, ss4], dtype=gl.float16,
                                      is_pure=True, pack=2)
    else:
        # [BN, 4, BITS, pairs a word, 2]: every pair twice (one asm call makes a pair of float16 elements)
        w5 = gl.expand_dims(gl.expand_dims(words, 3), 4) >> shift
        w5, _ = gl.broadcast(w5, gl.full([1, 1, 1, 1, 2], 0, gl.int32, LW))
        zz5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(zz, 2), 3), 4)
        ss5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(ss, 2), 3), 4)
        w5, zz5 = gl.broadcast(w5, zz5)
        w5, ss5 = gl.broadcast(w5, ss5)
        f = gl.inline_asm_elementwise(_pairs_asm(BITS), "=r,r,r,r,r,r,r", [w5, zz5, ss5], dtype=gl.float16,
                                      is_pure=True, pack=2)
    # a thread's pair j (codes 32 t + 2 j + e) is the operand's k = 16 (j // 2) + 8 (j % 2) + 2 t + e
    f = gl.reshape(f, [BLOCK_N, 4, 8, 2, 2])
    f = gl.permute(f, [2, 3, 1, 4, 0])
    b = gl.convert_layout(gl.reshape(f, [128, BLOCK_N]), DB, assert_trivial=True)
    x3 = gl.expand_dims(xv, 2)
    x3, _ = gl.broadcast(x3, gl.full([1, 1, 2], 0, gl.int32, LX3))
    xh = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x3], dtype=gl.float16, is_pure=True, pack=2)
    xh = gl.permute(gl.reshape(xh, [16, 4, 8, 2, 2]), [0, 2, 3, 1, 4])
    a = gl.convert_layout(gl.reshape(xh, [16, 128]), DA, assert_trivial=True)
    return mma_v2(a, b, acc)


@gluon.jit
def _x_from_shared(xs, j, NW: gl.constexpr, LX: gl.constexpr):
    """Step ``j`` (of the program's) activations [16, 64] from the shared copy (see ``_x_to_shared``)."""
    L32: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [1, NW], [1, 0])
    v = xs.index(j).load(L32)
    return gl.convert_layout(gl.reshape(v, [16, 64]), LX, assert_trivial=True)


@gluon.jit
def _x_to_shared(x_ptr, stride_xm, M, K, i0, i1, XSTEPS: gl.constexpr, NW: gl.constexpr, MASK_K: gl.constexpr):
    """The program's activations, steps ``i0 .. i1 - 1`` as int32 pairs, into shared memory, once:
    step ``j`` is a [32, 32] tile whose row ``2 m + h`` holds token ``m``'s pairs ``32 h ..`` of the
    step, swizzled so that the per-step reads (lanes ``t`` 64 bytes apart) hit distinct banks."""
    SX: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 8, [1, 0])
    xs = gl.allocate_shared_memory(gl.int32, [XSTEPS, 32, 32], SX)
    LC: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NW, 1], [1, 0])
    rr = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(1, LC)), 1)
    cc = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LC)), 0)
    tok = rr // 2
    at = x_ptr + tok * (stride_xm // 2) + 32 * (rr % 2) + cc
    for j in gl.static_range(XSTEPS):
        mask = (tok < M) & (i0 + j < i1)
        if MASK_K:
            mask = mask & ((i0 + j) * 128 + 2 * (32 * (rr % 2) + cc) < K)
        _async_load(xs.index(j), at + (i0 + j) * 64, mask=mask)
    async_copy.commit_group()
    return xs


@gluon.jit
def few_rows_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                    M, N, K, G, stride_xm, stride_ym, ROW_WORDS, ZROW_WORDS, K_STEPS, STEPS_PER_SPLIT, SPLIT_K,
                    BITS: gl.constexpr, GROUP: gl.constexpr, BLOCK_N: gl.constexpr, NW: gl.constexpr,
                    MASK_K: gl.constexpr, HAS_BIAS: gl.constexpr, PREFETCH: gl.constexpr,
                    XSTEPS: gl.constexpr = 0):
    WPT: gl.constexpr = BITS  # words a thread loads a step
    PPW: gl.constexpr = 16 // BITS  # code pairs a word holds
    if BITS == 3:
        # a unit's 16 code pairs [BN, 4, 16, 2]: lane 4 g + t holds row g (of each 8-row tile), unit t
        LW: gl.constexpr = gl.BlockedLayout([1, 1, 16, 2], [8, 4, 1, 1], [NW, 1, 1, 1], [3, 2, 1, 0])
        L2: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, LW))  # [BN, 4]: (row, t)
    else:
        # words [BN, 4, WPT] and their pairs: lane 4 g + t holds row g (of each 8-row tile), codes 32 t ..
        LW: gl.constexpr = gl.BlockedLayout([1, 1, WPT, PPW, 2], [8, 4, 1, 1, 1], [NW, 1, 1, 1, 1],
                                            [4, 3, 2, 1, 0])
        L4: gl.constexpr = gl.SliceLayout(4, LW)
        L3: gl.constexpr = gl.SliceLayout(3, L4)
        L2: gl.constexpr = gl.SliceLayout(2, L3)  # [BN, 4]: (row, t)
    # activations as int32 pairs [16, 64]: lane 4 g + t holds rows g and g + 8, pairs 16 t ..; every
    # warp holds all of them (the MMA's A operand is shared by the warps' column tiles)
    LX3: gl.constexpr = gl.BlockedLayout([1, 16, 2], [8, 4, 1], [1, NW, 1], [2, 1, 0])
    LX: gl.constexpr = gl.SliceLayout(2, LX3)
    MMA: gl.constexpr = gl.NVMMADistributedLayout([2, 0], [1, NW], [16, 8])
    DA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    DB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)

    x_ptr = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    i0 = pid_k * STEPS_PER_SPLIT
    i1 = gl.minimum(i0 + STEPS_PER_SPLIT, K_STEPS)

    rows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L2)), N - 1)
    tids = gl.arange(0, 4, layout=gl.SliceLayout(0, L2))
    if BITS == 3:
        w_off = gl.expand_dims(rows * ROW_WORDS, 1) + gl.expand_dims(tids, 0)  # plane 0's word of unit t
        shift = 0
    else:
        cs = gl.arange(0, WPT, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        w_off = gl.expand_dims(gl.expand_dims(rows * ROW_WORDS, 1) + gl.expand_dims(tids * WPT, 0), 2) \
            + gl.expand_dims(gl.expand_dims(cs, 0), 1)
        ps = gl.arange(0, PPW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        shift = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(ps * BITS, 0), 1), 2), 4)
    plane = ROW_WORDS // 3  # 3 bits: words from one plane of a row to the next (``_format``)
    zplane = ZROW_WORDS // 3
    zrow = gl.expand_dims(rows * ZROW_WORDS, 1)
    srow = gl.expand_dims(rows * G, 1)
    xm = gl.arange(0, 16, layout=gl.SliceLayout(1, LX))
    xk = gl.arange(0, 64, layout=gl.SliceLayout(0, LX))
    x_off = gl.expand_dims(xm * (stride_xm // 2), 1) + gl.expand_dims(xk, 0)
    x_mask_m = gl.expand_dims(xm < M, 1)

    acc = gl.zeros([16, BLOCK_N], gl.float32, MMA)
    if XSTEPS > 0:
        # activations read once a program, not once a warp and step (run 35's L1 traffic; run 38)
        xs = _x_to_shared(x_ptr, stride_xm, M, K, i0, i1, XSTEPS, NW, MASK_K)
        # PREFETCH steps of weights computed while the next PREFETCH are in flight (registers the
        # activations no longer take)
        wa, sa, za, ga = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, i0, plane, zplane, BITS, GROUP)
        if PREFETCH >= 2:
            wb, sb, zb, gb = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, gl.minimum(i0 + 1, i1 - 1),
                                      plane, zplane, BITS, GROUP)
        if PREFETCH == 4:
            wc, sc, zc, gc = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, gl.minimum(i0 + 2, i1 - 1),
                                      plane, zplane, BITS, GROUP)
            wd, sd, zd, gd = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, gl.minimum(i0 + 3, i1 - 1),
                                      plane, zplane, BITS, GROUP)
        async_copy.wait_group(0)
        _cta_barrier()
        for i in range(i0, i1, PREFETCH):
            we, se, ze, ge = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G,
                                      gl.minimum(i + PREFETCH, i1 - 1), plane, zplane, BITS, GROUP)
            if PREFETCH >= 2:
                wf, sf, zf, gf = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G,
                                          gl.minimum(i + PREFETCH + 1, i1 - 1), plane, zplane, BITS, GROUP)
            if PREFETCH == 4:
                wg, sg, zg, gg = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G,
                                          gl.minimum(i + 6, i1 - 1), plane, zplane, BITS, GROUP)
                wh, sh, zh, gh = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G,
                                          gl.minimum(i + 7, i1 - 1), plane, zplane, BITS, GROUP)
            acc = _step(acc, wa, sa, za, ga, _x_from_shared(xs, i - i0, NW, LX), shift, LW, LX3, DA, DB, BITS,
                        BLOCK_N)
            if PREFETCH >= 2:
                if i + 1 < i1:
                    acc = _step(acc, wb, sb, zb, gb, _x_from_shared(xs, i + 1 - i0, NW, LX), shift, LW, LX3, DA,
                                DB, BITS, BLOCK_N)
            if PREFETCH == 4:
                if i + 2 < i1:
                    acc = _step(acc, wc, sc, zc, gc, _x_from_shared(xs, i + 2 - i0, NW, LX), shift, LW, LX3, DA,
                                DB, BITS, BLOCK_N)
                if i + 3 < i1:
                    acc = _step(acc, wd, sd, zd, gd, _x_from_shared(xs, i + 3 - i0, NW, LX), shift, LW, LX3, DA,
                                DB, BITS, BLOCK_N)
            wa, sa, za, ga = we, se, ze, ge
            if PREFETCH >= 2:
                wb, sb, zb, gb = wf, sf, zf, gf
            if PREFETCH == 4:
                wc, sc, zc, gc = wg, sg, zg, gg
                wd, sd, zd, gd = wh, sh, zh, gh
    elif PREFETCH == 1:
        # the next step's loads go out before this step's arithmetic (the last step reloads itself)
        w, s, zw, grp = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, i0, plane, zplane, BITS, GROUP)
        xv = _activations(x_ptr, x_off, x_mask_m, xk, K, i0, MASK_K)
        for i in range(i0, i1):
            nxt = gl.minimum(i + 1, i1 - 1)
            nw_, ns, nzw, ngrp = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, nxt, plane, zplane, BITS, GROUP)
            nxv = _activations(x_ptr, x_off, x_mask_m, xk, K, nxt, MASK_K)
            acc = _step(acc, w, s, zw, grp, xv, shift, LW, LX3, DA, DB, BITS, BLOCK_N)
            w, s, zw, grp, xv = nw_, ns, nzw, ngrp, nxv
    else:
        # two steps ahead: a loop of step pairs whose odd last step is skipped (more registers; it
        # pays on long K loops, run 32)
        wa, sa, za, ga = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, i0, plane, zplane, BITS, GROUP)
        xa = _activations(x_ptr, x_off, x_mask_m, xk, K, i0, MASK_K)
        i0b = gl.minimum(i0 + 1, i1 - 1)
        wb, sb, zb, gb = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, i0b, plane, zplane, BITS, GROUP)
        xb = _activations(x_ptr, x_off, x_mask_m, xk, K, i0b, MASK_K)
        for i in range(i0, i1, 2):
            ic = gl.minimum(i + 2, i1 - 1)
            idd = gl.minimum(i + 3, i1 - 1)
            wc, sc, zc, gc = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, ic, plane, zplane, BITS, GROUP)
            xc = _activations(x_ptr, x_off, x_mask_m, xk, K, ic, MASK_K)
            wd, sd, zd, gd = _weights(qw_ptr, s_ptr, qz_ptr, w_off, srow, zrow, tids, G, idd, plane, zplane, BITS, GROUP)
            xd = _activations(x_ptr, x_off, x_mask_m, xk, K, idd, MASK_K)
            acc = _step(acc, wa, sa, za, ga, xa, shift, LW, LX3, DA, DB, BITS, BLOCK_N)
            if i + 1 < i1:
                acc = _step(acc, wb, sb, zb, gb, xb, shift, LW, LX3, DA, DB, BITS, BLOCK_N)
            wa, sa, za, ga, xa = wc, sc, zc, gc, xc
            wb, sb, zb, gb, xb = wd, sd, zd, gd, xd

    ym = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
    yn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA))
    out_mask = gl.expand_dims(ym < M, 1) & gl.expand_dims(yn < N, 0)
    y_ptrs = y_ptr + gl.expand_dims(ym * stride_ym, 1) + gl.expand_dims(yn, 0)
    if SPLIT_K > 1:
        # each split stores its partial tile; the last to arrive at this column tile adds them up
        part = ws_ptr + gl.expand_dims(ym * N, 1) + gl.expand_dims(yn, 0)
        gl.store(part + pid_k * (16 * N), acc, mask=out_mask)
        _cta_barrier()  # every thread's partial is written before the arrival is counted
        arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tot = gl.zeros([16, BLOCK_N], gl.float32, MMA)
            for sp in range(0, SPLIT_K):
                tot += gl.load(part + sp * (16 * N), mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += gl.expand_dims(gl.load(b_ptr + yn, mask=yn < N, other=0.0).to(gl.float32), 0)
            gl.store(y_ptrs, tot.to(gl.float16), mask=out_mask)
            gl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(b_ptr + yn, mask=yn < N, other=0.0).to(gl.float32), 0)
        gl.store(y_ptrs, acc.to(gl.float16), mask=out_mask)
