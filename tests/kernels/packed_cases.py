"""Shared cases of the kernel tests: random codes, scales and zeros, and a float64 ``W_hat``."""

from __future__ import annotations

import torch

SHAPES = [  # (N, K, group size)
    (40, 96, 32),
    (8, 128, 64),
    (24, 256, 128),
    (16, 4096, 128),
    (7, 100, 100),  # per-channel, K not a multiple of 32
    (3, 352, 352),
    (5, 160, 32),
]


def random_qsz(n: int, k: int, g: int, bits: int, seed: int = 0, device: str = "cpu"):
    """Uniform random codes and zeros, scales in [0.1, 1.1) / 64 (so outputs stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    s = ((torch.rand(n, k // g, generator=gen) + 0.1) / 64).half()
    z = torch.randint(0, 2**bits, (n, k // g), generator=gen, dtype=torch.uint8)
    return q.to(device), s.to(device), z.to(device)


def w_hat_f64(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g: int) -> torch.Tensor:
    """``(q - z) * s`` group by group, in float64."""
    q, s, z = q.cpu(), s.cpu(), z.cpu()
    n, k = q.shape
    w = torch.empty(n, k, dtype=torch.float64)
    for j in range(s.shape[1]):
        cols = slice(j * g, (j + 1) * g)
        w[:, cols] = (q[:, cols].double() - z[:, j:j + 1].double()) * s[:, j:j + 1].double()
    return w


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` in float64 (NaN if ``y`` has any)."""
    y, ref = y.double().cpu(), ref.double().cpu()
    return float((y - ref).norm() / ref.norm())


def assert_replays_match(cfg, bits: int, rows: int) -> None:
    """Two packed layers (1000 and 3000 x 4096, ``bits``, groups of 128) run with ``cfg`` on
    ``rows`` activation rows inside one captured CUDA graph: every replay, after new activations
    are copied in, equals the reference (the split-K workspace and arrival counters are reused by
    every launch and every replay)."""
    from hpsearch.kernels import matmul_reference, pack, packed_matmul

    ws = [pack(*random_qsz(n, 4096, 128, bits, seed=n, device="cuda"), bits, 128) for n in (1000, 3000)]
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.float16)
    for w in ws:  # warm-up: compiles, sizes the workspace
        packed_matmul(x, w, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [packed_matmul(x, w, config=cfg) for w in ws]
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        for y, w in zip(ys, ws):
            assert rel_err(y, matmul_reference(x, w)) < 2e-3


def interpreted(script: str, timeout: int = 900) -> dict:
    """Run ``tests/kernels/<script>`` in a child process under ``TRITON_INTERPRET=1`` (the
    interpreter is chosen when triton first compiles, so this process's triton is left as it is)
    and return the JSON object it prints: case id -> error, or the case's error message; under
    ``"bounds"``, the kernels that touched memory outside their tensors (``run_checked``)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(here / "run_checked.py"), str(here / script)], env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def assert_in_bounds(results: dict) -> None:
    """No interpreted kernel of the script read or wrote outside the tensors passed to it."""
    import pytest

    if isinstance(results["bounds"], str):
        pytest.skip(results["bounds"])
    assert results["bounds"] == [], f"kernels touched memory outside their tensors: {results['bounds']}"


def compile_gluon_sm90(fn, consts: dict, num_warps: int, aligned: bool = False):
    """A packed-matmul Gluon kernel (``_few_rows`` or ``_skinny``: the same arguments but their
    constexprs ``consts``) compiled for an H100 (sm_90) without a GPU; skips where this Triton has
    no Gluon. ``aligned``: as Triton's launcher specializes it for 16-byte aligned pointers and
    sizes and strides that are multiples of 16 (the shapes it is timed on)."""
    import pytest

    pytest.importorskip("triton.experimental.gluon")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    ints = ("M", "N", "K", "G", "stride_xm", "stride_ym", "ROW_WORDS", "ZROW_WORDS", "K_STEPS", "STEPS_PER_SPLIT",
            "SPLIT_K")
    sig = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "b_ptr": "*fp16",
           "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", **{name: "i32" for name in ints}}
    sig.update({name: "constexpr" for name in consts})
    attrs = {}
    if aligned:
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
                 for a in ("x_ptr", "qw_ptr", "s_ptr", "qz_ptr", "b_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "N", "K",
                           "stride_xm", "stride_ym", "ROW_WORDS")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()},
                         attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
