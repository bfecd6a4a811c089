"""Choosing and launching the Triton kernels; the ``hpsearch::packed_matmul`` custom op.

The op is what :class:`~hpsearch.kernels.PackedLinear` calls: opaque to ``torch.compile`` (a fake
implementation gives its output shape), free of host synchronisation, and so capturable by CUDA
graphs once its kernels are compiled (call it once before capturing). It runs the Triton kernels
on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before the first call;
elsewhere it runs :func:`~hpsearch.kernels.matmul_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _few_rows, _mma_gemv, _skinny
from ._format import G_MULTIPLE, K_MULTIPLE, PackedWeight, padded
from ._reference import matmul_reference

__all__ = ["KernelConfig", "choose_config", "fingerprint", "packed_matmul", "triton_enabled"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch. ``kind`` is ``"gemv"``, ``"gemv_words"``, ``"gemv_asm"`` or
    ``"gemv_h2"`` (one activation row per program; the last three turn fields into floats in
    place, ``gemv_asm`` with inline PTX, ``gemv_h2`` two codes per float16-pair instruction, see
    ``_triton_kernels``; ``gemv_h2`` falls back to ``gemv_asm`` for activations it cannot take),
    ``"dot"`` (tensor cores, several rows), ``"mma"`` (tensor cores fed from registers, 2-16 rows,
    2, 3, 4 and 8 bits, see ``_few_rows``; ``num_stages`` is the steps of weights loaded ahead, 1 or 2)
    or ``"skinny"`` (the weights as the MMA's A operand, 1-8 rows, 2, 3 and 4 bits in groups of a
    multiple of 128, see ``_skinny``; ``block_n`` is ``16 * row tiles * num_warps`` weight rows a
    program, ``num_stages`` the steps of weights loaded together, 1, 2 or 4). Both Gluon kinds are
    off with ``HPSEARCH_FEW_ROWS=0``: products they cannot take, or all while they are off, run the
    Triton kernels. ``x_shared`` (``"mma"`` only): each program first copies the activations of its
    K range into shared memory once, instead of every warp reading them every step; it holds when a
    split is at most ``_few_rows.MAX_SHARED_STEPS`` steps, and ``num_stages`` may then be 1, 2 or 4.
    ``"cuda"``: the CUDA C tensor-core kernel of ``_mma_gemv`` (1-16 rows, 2, 3, 4 and 8 bits; a block
    takes ``block_n`` = 16 weight rows and splits K across ``num_warps`` warps, 1-16, each requesting its
    weights ``num_stages`` steps ahead, 1 or 2); products it
    cannot take (or all, where it cannot be built or ``HPSEARCH_CUDA_KERNELS=0``) run the Triton
    kernels."""

    kind: str
    block_n: int
    block_k: int
    block_m: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    x_shared: bool = False


def choose_config(m: int, n: int, k: int, bits: int, few_rows: bool | None = None,
                  skinny: bool = True, cuda: bool | None = None) -> KernelConfig:
    """The tile sizes used for an ``[m, k] x [n, k]^T`` product at ``bits``.

    A measured table (``HPSEARCH_KERNEL_TUNING``: a JSON file written by
    ``python -m hpsearch.bench kernels --sweep --tuning-out PATH``, else the H100 table shipped in
    :mod:`._tuned`) wins for the shapes it holds; otherwise a rule that keeps about four programs
    per SM in flight. See ``kernels/NOTES.md`` for the measurements. ``few_rows``: whether 2-16 rows
    at 2, 3 and 4 bits may take the Gluon kernels (default: unless ``HPSEARCH_FEW_ROWS=0`` turned
    them off); ``skinny``: whether 2-8 rows may take ``"skinny"`` among them; ``cuda``: whether 1-16
    rows take the CUDA kernel ``"cuda"`` (default: ``HPSEARCH_CUDA_KERNELS``, ``auto`` where the
    table's ``cu1:`` / ``cu16:`` entries give it the shape, ``1`` everywhere; ``True`` everywhere;
    where it cannot run, :func:`packed_matmul` falls back to the Triton choice).
    """
    bucket = 1 if m == 1 else (16 if m <= 16 else 0)
    if few_rows is None:
        few_rows = _few_rows.enabled()
    if cuda is None:
        everywhere = _mma_gemv.mode() == "1"
        cuda = _mma_gemv.enabled()
    else:
        everywhere = cuda
    if cuda and bucket:
        tuned = _tuned_table().get(f"cu{bucket}:{k}x{n}:{bits}")
        if tuned is not None:
            return KernelConfig(**tuned)
        if everywhere:
            return cuda_config(m, n, k, bits)
    few_rows = few_rows and bucket == 16 and bits in (2, 3, 4)
    if few_rows and skinny and m <= _skinny.MAX_ROWS:
        # 2-4 and 5-8 rows: either Gluon kernel, whichever measured faster (at 4 and at 8 rows)
        tuned = _tuned_table().get(f"gl{4 if m <= 4 else 8}:{k}x{n}:{bits}")
        if tuned is not None:
            return KernelConfig(**tuned)
        if bits == 2 or (bits == 4 and m <= 4):
            # kernels/NOTES.md run 37: at 4 rows "skinny" beat "mma" by 16-33% at 2 bits and 3-16% at
            # 4 bits on Llama shapes (at 8 rows 4 bits, not on 8192x28672); two row tiles a warp,
            # K split 4 ways (about 1400-1800 one-warp programs on 4096x11008 and 8192x28672)
            steps = max(1, k // 128)
            split = 4 if steps >= 16 else max(1, steps // 4)
            return KernelConfig("skinny", block_n=32, block_k=128, block_m=8, split_k=split, num_warps=1,
                                num_stages=1)
    tuned = _tuned_table().get(f"{'mma' if few_rows else ''}{bucket}:{k}x{n}:{bits}") if bucket else None
    if tuned is not None:
        return KernelConfig(**tuned)
    if m == 1:
        if bits <= 4:
            # kernels/NOTES.md runs 6 and 9-14: long runs of each row per load win; the float16-pair
            # kernel does best on 8 rows x 4096 codes, unpipelined (every word of a program's rows
            # is in flight at once). Split K only when too few row tiles fill the GPU.
            bn, bk, stages = 8, 4096, 1
        else:
            bn, bk, stages = 16, 1024, 3  # gemv_asm (runs 6-11)
        tiles = max(1, -(-n // bn))
        split = 1
        while split < 8 and tiles * split < 264 and k // (bk * split * 2) >= 1:
            split *= 2
        kind = "gemv_h2" if bits <= 4 else "gemv_asm"
        return KernelConfig(kind, block_n=bn, block_k=bk, split_k=split, num_stages=stages)
    if few_rows:
        # kernels/NOTES.md run 38: the activations copied to shared memory once a program, K split
        # into at most 12 steps a program (8-11 won on Llama shapes), 128 columns unless that
        # leaves fewer than two programs an SM, two steps of weights ahead (one at 3 bits, whose
        # registers would halve the programs an SM)
        steps = max(1, -(-k // 128))
        split = 1
        while steps > 12 * split and split < 16:
            split *= 2
        per_split = -(-steps // split)
        tiles = -(-n // 128)
        bn = 128 if tiles * split >= 264 else 64
        return KernelConfig("mma", block_n=bn, block_k=128, block_m=16, split_k=split,
                            num_stages=1 if bits == 3 else 2, x_shared=per_split <= _few_rows.MAX_SHARED_STEPS)
    if m <= 16:
        tiles = max(1, -(-n // 64))
        split = 1
        while split < 8 and tiles * split < 528 and k // (128 * split * 2) >= 4:
            split *= 2
        return KernelConfig("dot", block_n=64, block_k=128, block_m=16, split_k=split, num_stages=3)
    if m <= 64:
        return KernelConfig("dot", block_n=128, block_k=128, block_m=64, num_warps=4, num_stages=3)
    return KernelConfig("dot", block_n=128, block_k=64, block_m=128, num_warps=8, num_stages=3)


def cuda_config(m: int, n: int, k: int, bits: int) -> KernelConfig:
    """The ``"cuda"`` launch of an ``[m, k] x [n, k]^T`` product (1-16 rows) off the measured table:
    enough warps a block that the GPU holds about 4096 of them (the first version's best on an H200
    held 2700-7200: kernels/NOTES.md run 40), no more than the product has steps of K."""
    blocks = -(-n // 16)
    steps = -(-k // _mma_gemv.step_codes(bits))
    warps = 1
    while warps < _mma_gemv.MAX_WARPS and blocks * warps < 4096 and 2 * warps <= steps:
        warps *= 2
    return KernelConfig("cuda", block_n=16, block_k=_mma_gemv.step_codes(bits), block_m=8 if m <= 8 else 16,
                        num_warps=warps)


@functools.cache
def fingerprint() -> str:
    """A short hash of what decides how fast a packed layer runs: the format's and kernels' source,
    the tile table in use and Triton's version. Timings cached under it (the measured-latency
    objective's) go stale, and are measured again, when any of these change."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("_format.py", "_pack.py", "_triton_kernels.py", "_launch.py", "_few_rows.py", "_few_rows_kernels.py",
                 "_skinny.py", "_skinny_kernels.py", "_mma_gemv.py", "_mma_gemv.cu"):
        h.update((here / name).read_bytes())
    h.update(json.dumps(_tuned_table(), sort_keys=True).encode())
    h.update(b"few-rows" if _few_rows.enabled() else b"")
    h.update(f"cuda={_mma_gemv.mode()}".encode())
    try:
        import triton

        h.update(triton.__version__.encode())
    except ImportError:
        pass
    return h.hexdigest()[:12]


@functools.cache
def _tuned_table() -> dict[str, dict]:
    path = os.environ.get("HPSEARCH_KERNEL_TUNING")
    if path:
        with open(path) as f:
            return json.load(f)
    from ._tuned import H100

    return H100


def _fit_block_k(block_k: int, k_pad: int, group_size: int, per_channel: bool,
                 multi_group: bool = False, tail: bool = False) -> int | None:
    """Tile length: the largest power of two <= block_k dividing k_pad (per channel) or the group;
    with ``multi_group`` (kernels that take one scale per word) a whole number of power-of-two
    groups of at least 32 codes may share a tile; with ``tail`` too (kernels that mask a last,
    partial tile) it need not divide k_pad (11008 = 86 groups of 128 takes tiles of 1024)."""
    bk = 1 << (max(block_k, 32).bit_length() - 1)
    if multi_group and not per_channel and group_size >= 32 and group_size & (group_size - 1) == 0:
        while bk > group_size:
            if k_pad % bk == 0 or (tail and bk < 2 * k_pad):
                return bk
            bk //= 2
    limit = k_pad if per_channel else group_size
    while bk >= 32:
        if limit % bk == 0 and k_pad % bk == 0:
            return bk
        bk //= 2
    return None


@functools.cache
def _kernels():
    from . import (
        _triton_kernels,  # deferred: triton is optional and reads TRITON_INTERPRET on import
    )

    return _triton_kernels


def triton_enabled(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on ``device``."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        k = _kernels()
    except ImportError:
        return False
    return type(k.gemv_kernel).__name__ == "InterpretedFunction"


def _launch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
            bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
            config: KernelConfig | None, gated: bool = False, rope: RotaryTarget | None = None) -> torch.Tensor | None:
    """``x2 [M, K] @ W_hat.T`` with the Triton kernels, or ``None`` if no tile size fits the groups.

    ``gated``: ``silu(gate) * up`` of the two halves of the rows, in ``gemv_h2_kernel``'s epilogue
    (see ``_gated``); ``rope``: the rows are ``[q | k | v]`` heads, the rotated query is returned
    and the key and value written to ``rope``'s caches (``gemv_h2_rope_kernel``, see ``_rope``).
    ``None`` is returned where those kernels do not run."""
    m, k = x2.shape
    n, g = scales.shape
    k_pad = padded(k, K_MULTIPLE)
    cfg = config or choose_config(m, n, k_pad, bits)
    per_channel = group_size >= in_features
    if cfg.kind == "cuda":
        if not (gated or rope is not None) and _mma_gemv.takes(x2, bits, group_size, in_features):
            return _mma_gemv.launch(x2, qweight, scales, qzeros, bias, bits, group_size, in_features,
                                    cfg.num_warps, cfg.num_stages).to(x2.dtype)
        cfg = choose_config(m, n, k_pad, bits, cuda=False)  # the fused epilogues are gemv_h2's
    if cfg.kind == "gemv_h2" and not _pairs_readable(x2, bits):
        cfg = dataclasses.replace(cfg, kind="gemv_asm")
    if gated or rope is not None:
        if cfg.kind != "gemv_h2" or cfg.block_n % 2:
            return None
        cfg = dataclasses.replace(cfg, split_k=1)  # the epilogue needs whole sums
        while rope is not None and (rope.head_dim // 2) % (cfg.block_n // 2):  # a program's pairs in one head
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    if cfg.kind == "skinny":
        if _skinny.takes(x2, bits, group_size, in_features):
            return _skinny.launch(x2, qweight, scales, qzeros, bias, bits, group_size, in_features,
                                  cfg.block_n // (16 * cfg.num_warps), cfg.split_k, cfg.num_warps, cfg.num_stages)
        cfg = choose_config(m, n, k_pad, bits, skinny=False, cuda=False)
    if cfg.kind == "mma":
        if _few_rows.takes(x2, bits, group_size, in_features):
            return _few_rows.launch(x2, qweight, scales, qzeros, bias, bits, group_size, in_features, cfg.block_n,
                                    cfg.split_k, cfg.num_warps, cfg.num_stages,
                                    cfg.x_shared)  # float16, as x2 (takes)
        cfg = choose_config(m, n, k_pad, bits, few_rows=False, cuda=False)
    if cfg.kind in ("gemv_words", "gemv_asm") and bits == 3:  # no in-place fields in 3-bit units
        cfg = dataclasses.replace(cfg, kind="gemv")
    bk = _fit_block_k(cfg.block_k, k_pad, group_size, per_channel,
                      multi_group=cfg.kind in ("gemv_words", "gemv_asm", "gemv_h2", "dot"), tail=cfg.kind == "gemv_h2")
    if bk is None:
        return None
    kern = _kernels()
    split_k = max(1, min(cfg.split_k, triton_cdiv(k_pad, bk)))
    if split_k > 1:  # partial sums are added atomically: float16 natively, others in float32
        acc_dtype = x2.dtype if x2.dtype == torch.float16 else torch.float32
        y = torch.zeros((m, n), dtype=acc_dtype, device=x2.device)
    elif rope is not None:
        y = torch.empty((m, rope.q_heads * rope.head_dim), dtype=x2.dtype, device=x2.device)
    else:
        y = torch.empty((m, n // 2 if gated else n), dtype=x2.dtype, device=x2.device)
    b = bias if bias is not None else scales  # any valid pointer; unused without HAS_BIAS
    common = {"N": n, "K": k, "K_PAD": k_pad, "G": g, "G_PAD": padded(g, G_MULTIPLE),
              "stride_xm": x2.stride(0), "stride_ym": y.stride(0), "BITS": bits,
              "GROUP": 0 if per_channel else group_size, "HAS_BIAS": bias is not None,
              "MASK_K": k != k_pad or k_pad % bk != 0, "BLOCK_N": cfg.block_n, "BK": bk, "SPLIT_K": split_k,
              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    groups_per_tile = bk // group_size if not per_channel and bk > group_size else 1
    if cfg.kind in ("gemv", "gemv_words", "gemv_asm", "gemv_h2"):
        grid = (triton_cdiv(n, cfg.block_n), split_k, m)
        common["NUM_STAGES"] = common.pop("num_stages")
        if cfg.kind == "gemv":
            kern.gemv_kernel[grid](x2, qweight, scales, qzeros, b, y, **common)
        else:  # inline PTX runs on CUDA only (the interpreter takes the Triton body)
            asm = cfg.kind != "gemv_words" and x2.is_cuda
            if rope is not None:
                _launch_rope(kern, x2, qweight, scales, qzeros, b, y, rope, cfg, asm, groups_per_tile,
                             k_pad % bk != 0, common)
            elif cfg.kind == "gemv_h2":
                if gated:  # a program makes block_n // 2 outputs
                    grid = (triton_cdiv(n // 2, cfg.block_n // 2), split_k, m)
                kern.gemv_h2_kernel[grid](x2, qweight, scales, qzeros, b, y, ASM=asm, GT=groups_per_tile,
                                          TAIL=k_pad % bk != 0, GATED=gated, **common)
            else:
                kern.gemv_words_kernel[grid](x2, qweight, scales, qzeros, b, y, ASM=asm, GT=groups_per_tile, **common)
    elif cfg.kind == "dot":
        grid = (triton_cdiv(n, cfg.block_n), triton_cdiv(m, cfg.block_m), split_k)
        upcast = x2.device.type == "cpu" and x2.dtype != torch.float16  # interpreter: see dot_kernel
        f16x2 = x2.is_cuda and x2.dtype == torch.float16
        kern.dot_kernel[grid](x2, qweight, scales, qzeros, b, y, M=m, BLOCK_M=cfg.block_m, UPCAST=upcast,
                              F16X2=f16x2, GT=groups_per_tile, **common)
    else:
        raise ValueError(f"config.kind must be 'gemv', 'gemv_words', 'gemv_asm', 'gemv_h2', 'dot', 'mma', 'skinny' or 'cuda', "
                         f"got {cfg.kind!r}")
    return y.to(x2.dtype)


@dataclass(frozen=True)
class RotaryTarget:
    """Where ``gemv_h2_rope_kernel`` puts a fused ``[q | k | v]`` product (see ``_rope``): the token's
    rotary tables ``cos``/``sin`` (``[batch, 1, head_dim]``), the caches ``[batch, kv_heads, length,
    head_dim]`` and the 0-dim int64 position written."""

    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    position: torch.Tensor
    q_heads: int
    kv_heads: int
    head_dim: int


def _launch_rope(kern, x2, qweight, scales, qzeros, b, q, rope: RotaryTarget, cfg: KernelConfig, asm: bool,
                 groups_per_tile: int, tail: bool, common: dict) -> None:
    args = {key: value for key, value in common.items() if key not in ("stride_ym", "SPLIT_K")}
    kc = rope.k_cache
    grid = (triton_cdiv(common["N"] // 2, cfg.block_n // 2), 1, x2.shape[0])
    kern.gemv_h2_rope_kernel[grid](
        x2, qweight, scales, qzeros, b, q, kc, rope.v_cache, rope.cos, rope.sin, rope.position,
        stride_qm=q.stride(0), stride_cb=kc.stride(0), stride_ch=kc.stride(1), stride_cs=kc.stride(2),
        stride_rm=rope.cos.stride(0) if rope.cos.shape[0] > 1 else 0, Q_HEADS=rope.q_heads,
        KV_HEADS=rope.kv_heads, HEAD_DIM=rope.head_dim, ASM=asm, GT=groups_per_tile, TAIL=tail,
        **args)


def _pairs_readable(x2: torch.Tensor, bits: int) -> bool:
    """Whether ``gemv_h2`` takes this product: float16 activations read as int32 pairs (even row
    length and stride, 4-byte aligned) and codes of at most 4 bits."""
    return (x2.dtype == torch.float16 and bits in (2, 3, 4) and x2.shape[1] % 2 == 0 and x2.stride(0) % 2 == 0
            and x2.data_ptr() % 4 == 0)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("hpsearch::packed_matmul", mutates_args=())
def _packed_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      qzeros: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                      in_features: int) -> torch.Tensor:
    return _matmul(x, qweight, scales, qzeros, bias, bits, group_size, in_features, None)


@_packed_matmul_op.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


def _matmul(x, qweight, scales, qzeros, bias, bits, group_size, in_features, config):
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = None
    if triton_enabled(x.device) and x2.shape[0] > 0:
        y = _launch(x2, qweight, scales, qzeros, bias, bits, group_size, in_features, config)
    if y is None:
        w = PackedWeight(qweight, scales, qzeros, bits, group_size, in_features)
        y = matmul_reference(x2, w, bias)
    return y.reshape(*x.shape[:-1], scales.shape[0])


def packed_matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ W_hat.T (+ bias)`` for ``x [..., K]`` float16/bfloat16, as ``x.dtype``.

    Args:
        x: activations on the weight's device.
        w: the packed weight.
        bias: optional ``[N]`` bias.
        config: tile sizes; ``None`` picks them with :func:`choose_config`. A given config bypasses
            the custom op (for benchmarks and tests).
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.in_features}")
    if config is not None:
        return _matmul(x, w.qweight, w.scales, w.qzeros, bias, w.bits, w.group_size, w.in_features, config)
    return torch.ops.hpsearch.packed_matmul(x, w.qweight, w.scales, w.qzeros, bias, w.bits,
                                            w.group_size, w.in_features)
