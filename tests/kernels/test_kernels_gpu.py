"""The Triton kernels on a GPU against the reference: every bit-width, dtype and M of interest."""

from __future__ import annotations

import pytest
import torch
from hpsearch.kernels import PackedLinear, matmul_reference, pack, packed_matmul
from packed_cases import random_qsz, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,g", [(1000, 4096, 128), (40, 96, 32)])
def test_packed_matmul_matches_reference(dtype, m, bits, n, k, g):
    if k == 96 and dtype == torch.bfloat16:
        pytest.skip("the small shape runs in float16 only")
    q, s, z = random_qsz(n, k, g, bits, seed=bits * 1000 + m, device="cuda")
    w = pack(q, s, z, bits, g)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    y = packed_matmul(x, w, bias)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, matmul_reference(x, w, bias)) < TOL[dtype]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_per_channel_and_unaligned_k(bits, m):
    q, s, z = random_qsz(72, 352, 352, bits, device="cuda")
    w = pack(q, s, z, bits, 352)
    x = torch.randn(m, 352, device="cuda", dtype=torch.float16)
    assert rel_err(packed_matmul(x, w), matmul_reference(x, w)) < TOL[torch.float16]


def test_cuda_graph_replay_equals_eager():
    layer = PackedLinear.from_quantized(*random_qsz(512, 1024, 128, 4, device="cuda"), 4, 128)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    eager = layer(x)  # compiles the kernel before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, layer(x))
    assert not torch.equal(y, eager)


@pytest.mark.parametrize("kind", ["gemv", "gemv_words", "gemv_asm", "gemv_h2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("split", [1, 4])
def test_gemv_kernels_match_reference(kind, bits, split):
    from hpsearch.kernels import KernelConfig

    q, s, z = random_qsz(1000, 4096, 128, bits, seed=bits, device="cuda")
    w = pack(q, s, z, bits, 128)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    bias = torch.randn(1000, device="cuda", dtype=torch.float16)
    y = packed_matmul(x, w, bias, config=KernelConfig(kind, block_n=128, block_k=128, split_k=split, num_stages=3))
    assert rel_err(y, matmul_reference(x, w, bias)) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block_k,group", [(512, 128), (256, 64), (1024, 128)])
@pytest.mark.parametrize("kind,m", [("gemv_asm", 1), ("gemv_h2", 1), ("dot", 16), ("dot", 5)])
def test_tiles_of_several_groups(kind, m, bits, block_k, group):
    from hpsearch.kernels import KernelConfig

    q, s, z = random_qsz(1000, 4096, group, bits, seed=bits + block_k, device="cuda")
    w = pack(q, s, z, bits, group)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    dot = kind == "dot"  # its tiles are staged in shared memory: smaller ones for 1024 codes
    cfg = KernelConfig(kind, block_n=32 if dot else 64, block_k=block_k, block_m=16, split_k=2,
                       num_stages=2 if dot else 3)
    assert rel_err(packed_matmul(x, w, config=cfg), matmul_reference(x, w)) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [4096, 352, 11008])
def test_gemv_h2_large_activations_and_odd_shapes(bits, k):
    """Float16 partial sums of (q - z) x: activation outliers in the hundreds stay accurate; K not a
    multiple of the tile (352), several-group tiles that do not divide K (11008 = 86 groups)."""
    from hpsearch.kernels import KernelConfig

    q, s, z = random_qsz(700, k, 32 if k == 352 else 128, bits, seed=k + bits, device="cuda")
    w = pack(q, s, z, bits, 32 if k == 352 else 128)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    x[0, ::97] = 400.0  # outliers, as in some models' MLP inputs
    y = packed_matmul(x, w, config=KernelConfig("gemv_h2", block_n=32, block_k=1024, num_stages=3))
    assert torch.isfinite(y).all()
    assert rel_err(y, matmul_reference(x, w)) < TOL[torch.float16]


def _shipped_rows():
    from hpsearch.kernels._tuned import H100

    return sorted(H100)


@pytest.mark.parametrize("key", _shipped_rows())
def test_every_shipped_tile_matches_reference(key, monkeypatch):
    """Each row of the shipped H100 table (kernels/_tuned.py), at its own shape: the tiles users get
    (``mma16`` rows and the ``gl4`` / ``gl8`` rows of 4 and 8 tokens through the Gluon kernels, ``16``
    rows with them turned off)."""
    bucket, shape, bits = key.split(":")
    gluon = bucket.startswith(("mma", "gl"))
    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "1" if gluon else "0")
    bucket = bucket.removeprefix("mma").removeprefix("gl")
    k, n = (int(v) for v in shape.split("x"))
    bits, m = int(bits), int(bucket)
    q, s, z = random_qsz(n, k, 128, bits, seed=n + k + bits, device="cuda")
    w = pack(q, s, z, bits, 128)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    assert rel_err(packed_matmul(x, w), matmul_reference(x, w)) < TOL[torch.float16]
