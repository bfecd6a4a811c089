"""Tile sizes measured best on an H100 80GB HBM3 (torch 2.11, triton 3.6), group size 128.

Written from ``python -m hpsearch.bench kernels --sweep --tuning-out tuned.json`` (2026-11-22, sessions 3-4):
one-row entries for 2-4 bits from run 14 (``gemv_h2``, 3-bit units), 8 bits from run 20 (``gemv_asm``); 16-row entries for 4
bits from run 8 (tensor cores over tiles of several groups), other bits from run 4 (``kernels/NOTES.md``), and
since session 9 the 4-bit ones from run 32 (``_few_rows``; 2 bits take the rule);
keyed ``"{M bucket}:{K}x{N}:{bits}"`` (bucket 1: one row; 16: two to sixteen rows). Shapes not listed
fall back to the rule in :func:`._launch.choose_config`.
"""

H100: dict[str, dict] = {
    # run 32 (session 9): the Gluon kernel of _few_rows, 4 bits; 2 bits follow choose_config's rule
    "16:11008x4096:4": {"kind": "mma", "block_n": 128, "block_k": 128, "block_m": 16,
        "split_k": 8, "num_warps": 4, "num_stages": 2},
    "16:4096x11008:4": {"kind": "mma", "block_n": 128, "block_k": 128, "block_m": 16,
        "split_k": 4, "num_warps": 4, "num_stages": 1},
    "16:4096x4096:4": {"kind": "mma", "block_n": 128, "block_k": 128, "block_m": 16,
        "split_k": 8, "num_warps": 4, "num_stages": 1},
    "16:8192x28672:4": {"kind": "mma", "block_n": 128, "block_k": 128, "block_m": 16,
        "split_k": 1, "num_warps": 4, "num_stages": 2},
    "16:11008x4096:3": {"kind": "dot", "block_n": 64, "block_k": 128, "block_m": 16,
        "split_k": 8, "num_warps": 4, "num_stages": 3},
    "16:11008x4096:8": {"kind": "dot", "block_n": 64, "block_k": 128, "block_m": 16,
        "split_k": 8, "num_warps": 4, "num_stages": 3},
    "16:4096x11008:3": {"kind": "dot", "block_n": 128, "block_k": 128, "block_m": 16,
        "split_k": 4, "num_warps": 4, "num_stages": 3},
    "16:4096x11008:8": {"kind": "dot", "block_n": 64, "block_k": 128, "block_m": 16,
        "split_k": 2, "num_warps": 4, "num_stages": 3},
    "16:4096x4096:3": {"kind": "dot", "block_n": 64, "block_k": 128, "block_m": 16,
        "split_k": 8, "num_warps": 4, "num_stages": 3},
    "16:4096x4096:8": {"kind": "dot", "block_n": 64, "block_k": 128, "block_m": 16,
        "split_k": 8, "num_warps": 4, "num_stages": 3},
    "16:8192x28672:3": {"kind": "dot", "block_n": 64, "block_k": 128, "block_m": 16,
        "split_k": 4, "num_warps": 4, "num_stages": 3},
    "16:8192x28672:8": {"kind": "dot", "block_n": 64, "block_k": 128, "block_m": 16,
        "split_k": 1, "num_warps": 4, "num_stages": 3},
    "1:11008x4096:2": {"block_k": 4096, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:11008x4096:3": {"block_k": 4096, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:11008x4096:4": {"block_k": 2048, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:11008x4096:8": {"block_k": 1024, "block_m": 1, "block_n": 16, "kind": "gemv_asm", "num_stages": 3, "num_warps": 4,
        "split_k": 2},
    "1:4096x11008:2": {"block_k": 2048, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:4096x11008:3": {"block_k": 4096, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:4096x11008:4": {"block_k": 8192, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:4096x11008:8": {"block_k": 512, "block_m": 1, "block_n": 32, "kind": "gemv_asm", "num_stages": 3, "num_warps": 4,
        "split_k": 1},
    "1:4096x4096:2": {"block_k": 4096, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:4096x4096:3": {"block_k": 4096, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:4096x4096:4": {"block_k": 2048, "block_m": 1, "block_n": 4, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:4096x4096:8": {"block_k": 1024, "block_m": 1, "block_n": 8, "kind": "gemv_asm", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:8192x28672:2": {"block_k": 2048, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:8192x28672:3": {"block_k": 4096, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:8192x28672:4": {"block_k": 4096, "block_m": 1, "block_n": 8, "kind": "gemv_h2", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
    "1:8192x28672:8": {"block_k": 1024, "block_m": 1, "block_n": 8, "kind": "gemv_asm", "num_stages": 1, "num_warps": 4,
        "split_k": 1},
}
