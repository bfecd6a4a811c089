"""Triton kernels against the reference under ``TRITON_INTERPRET=1`` (run as a script, in a fresh
process: the interpreter must be chosen before triton compiles anything).

Prints one JSON object: case id -> relative error (or the error message).
"""

from __future__ import annotations

import json
import os
import sys

# (id, bits, N, K, group size, M, config kind, split_k, dtype, bias)
CASES = [
    (f"b{bits}-{n}x{k}g{g}-m{m}-{kind}-s{split}-{dt}{'-bias' if bias else ''}", bits, n, k, g, m, kind, split, dt, bias)
    for bits in (2, 3, 4, 8)
    for (n, k, g, m, kind, split, dt, bias) in [
        (40, 96, 32, 1, "gemv", 1, "float16", False),
        (40, 96, 32, 5, "dot", 1, "float16", True),
        (33, 256, 128, 2, "gemv", 2, "bfloat16", True),
        (33, 256, 128, 17, "dot", 2, "bfloat16", False),
        (24, 100, 100, 1, "gemv", 1, "float16", False),
        (24, 100, 100, 3, "dot", 1, "float16", False),
        (40, 96, 32, 2, "gemv_words", 1, "float16", True),
        (33, 256, 128, 1, "gemv_words", 2, "bfloat16", False),
        (24, 100, 100, 1, "gemv_words", 1, "float16", False),
        (40, 96, 32, 1, "gemv_asm", 2, "float16", True),
        (40, 96, 32, 1, "gemv_words-bk128", 1, "float16", False),
        (33, 256, 64, 2, "gemv_words-bk256", 2, "bfloat16", True),
        (40, 96, 32, 1, "gemv_h2", 1, "float16", True),
        (33, 256, 128, 1, "gemv_h2", 2, "float16", False),
        (24, 100, 100, 1, "gemv_h2", 1, "float16", False),
        (40, 96, 32, 1, "gemv_h2-bk128", 1, "float16", False),
        (33, 512, 64, 1, "gemv_h2-bk256", 2, "float16", True),
        (33, 256, 64, 1, "gemv_h2", 1, "bfloat16", False),
        (20, 1376, 32, 1, "gemv_h2-bk256", 2, "float16", True),  # 43 groups: a last tile past K
        (20, 352, 32, 1, "gemv_h2-bk256", 1, "float16", False),
        (12, 1024, 32, 1, "gemv", 1, "float16", False),  # 32 groups: zeros 30 and 31 of a 3-bit unit
        (12, 1024, 32, 3, "dot", 1, "bfloat16", False),
        (40, 96, 32, 6, "dot-bk128", 1, "float16", True),
        (33, 512, 64, 9, "dot-bk256", 2, "bfloat16", False),
        (40, 96, 32, 5, "mma", 1, "float16", True),  # Gluon does not interpret: these run "dot"
        (33, 256, 128, 16, "mma", 2, "bfloat16", False),
    ]
]


#: (bits, K) run with the default one-row tile, through the custom op
DEFAULT_TILE_K = [(3, 896), (4, 14336), (2, 3200)]


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from hpsearch.kernels import (
        KernelConfig,
        PackedLinear,
        matmul_reference,
        pack,
        packed_matmul,
        triton_enabled,
    )
    from packed_cases import random_qsz, rel_err

    assert triton_enabled(torch.device("cpu"))
    out = {}
    for cid, bits, n, k, g, m, kind, split, dt, with_bias in CASES:
        try:
            q, s, z = random_qsz(n, k, g, bits, seed=len(out))
            w = pack(q, s, z, bits, g)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(getattr(torch, dt))
            bias = torch.randn(n).to(x.dtype) if with_bias else None
            kind, _, bk = kind.partition("-bk")  # "-bkN": a tile of N codes (several groups)
            cfg = KernelConfig(kind, block_n=32, block_k=int(bk or 128), block_m=16, split_k=split)
            y = packed_matmul(x, w, bias, config=cfg)
            assert y.dtype == x.dtype and y.shape == (m, n)
            out[cid] = rel_err(y, matmul_reference(x, w, bias))
        except Exception as e:  # noqa: BLE001 - reported per case
            out[cid] = f"{type(e).__name__}: {e}"
    # the custom op (what PackedLinear calls) dispatches to the interpreted kernels on CPU
    layer = PackedLinear.from_quantized(*random_qsz(16, 64, 32, 4), 4, 32)
    x = torch.randn(2, 64).half()
    out["packed_linear_op"] = rel_err(layer(x), matmul_reference(x, layer.packed))
    # K = 96 pads to 128: the last tile of a group-32 row lies past the row's 3 groups. Scales are
    # a view of a longer buffer whose tail is NaN, so a read past the row's last group shows.
    q, s, z = random_qsz(8, 96, 32, 4, seed=3)
    storage = torch.full((s.numel() + 64,), float("nan"), dtype=torch.float16)
    storage[: s.numel()] = s.flatten()
    w = pack(q, s, z, 4, 32)
    w = type(w)(w.qweight, storage[: s.numel()].view(8, 3), w.qzeros, 4, 32, 96)
    for kind, m in (("gemv", 1), ("gemv_words", 1), ("gemv_h2", 1), ("dot", 3)):
        x = torch.randn(m, 96).half()
        cfg = KernelConfig(kind, block_n=32, block_k=128, block_m=16)
        out[f"scale_tail_{kind}"] = rel_err(packed_matmul(x, w, config=cfg), matmul_reference(x, w))
    x1 = torch.randn(1, 64).half()  # one row: the default rule's multi-group GEMV
    out["packed_linear_op_m1"] = rel_err(layer(x1), matmul_reference(x1, layer.packed))
    # the default one-row tile (8 rows x 4096 codes) on K of other models: shorter than a tile
    # (Qwen2-0.5B), 3.5 tiles (Mistral's down_proj), not a multiple of 1024
    for bits, k in DEFAULT_TILE_K:
        w = pack(*random_qsz(8, k, 128, bits, seed=k), bits, 128)
        x = torch.randn(1, k).half()
        out[f"default_tile_b{bits}_k{k}"] = rel_err(packed_matmul(x, w), matmul_reference(x, w))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
