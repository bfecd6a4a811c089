"""The Gluon kernel for 1-8 rows with the weights as the MMA's A operand (``kernels/_skinny``).

On CPU: its code is compiled for an H100 (sm_90, no GPU needed) and checked for what the kernel is
for (operands straight from registers, one MMA a 16-row tile and 16 codes, plus the constant MMA a
step), and ``choose_config``'s choices for 2-8 rows are checked. On a GPU: it equals the reference
over bit-widths, group sizes, K off 128, 1-8 rows, row tiles, warps, depths, K splits and biases,
under CUDA-graph replay, and products it cannot take fall back to a kernel that can.
"""

from __future__ import annotations

import pytest
import torch
from hpsearch.kernels import KernelConfig, choose_config, matmul_reference, pack, packed_matmul
from packed_cases import assert_replays_match, compile_gluon_sm90, random_qsz, rel_err

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _triton_choices(monkeypatch):
    """These are the Gluon kernels' choices; ``test_mma_gemv`` has the CUDA kernel's, which takes 1-16
    rows first where it runs."""
    monkeypatch.setenv("HPSEARCH_CUDA_KERNELS", "0")


@pytest.fixture
def gluon_on(monkeypatch):
    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "1")


def _compile_sm90(bits: int, row_tiles: int, num_warps: int, depth: int):
    pytest.importorskip("triton.experimental.gluon")
    from hpsearch.kernels import _skinny_kernels

    consts = {"BITS": bits, "GROUP": 128, "R": row_tiles, "NW": num_warps, "D": depth, "MASK_K": True,
              "HAS_BIAS": True}
    return compile_gluon_sm90(_skinny_kernels.skinny_kernel, consts, num_warps)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("row_tiles,num_warps,depth", [(2, 1, 1), (1, 2, 2)])
def test_operands_come_from_registers(bits, row_tiles, num_warps, depth):
    compiled = _compile_sm90(bits, row_tiles, num_warps, depth)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    assert "local_alloc" not in ttgir and "ldmatrix" not in ptx
    # a step: 8 k16 blocks for each of a warp's row tiles, and 8 for the constant rows
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 8 * (row_tiles + 1) * depth


def test_choose_config_for_2_to_8_rows(monkeypatch):
    """Off the measured table, 2-8 rows at 2 bits (and 4 bits up to 4 rows) take ``skinny`` and the
    others ``mma``; the table's ``gl4`` / ``gl8`` entries (2-4 / 5-8 rows) win where they exist; one
    row keeps the GEMVs; ``HPSEARCH_FEW_ROWS=0`` turns both Gluon kernels off."""
    monkeypatch.delenv("HPSEARCH_FEW_ROWS", raising=False)
    for n, k in ((1000, 352), (5000, 2048), (3000, 14336)):
        for m in (2, 4, 8):
            cfg = choose_config(m, n, k, 2)
            assert cfg.kind == "skinny" and cfg.block_n % (16 * cfg.num_warps) == 0
            assert cfg.num_stages in (1, 2, 4) and k // (128 * cfg.split_k) >= 1
            assert choose_config(m, n, k, 3).kind == "mma"
            assert choose_config(m, n, k, 4).kind == ("skinny" if m <= 4 else "mma")
        assert choose_config(9, n, k, 2).kind == "mma"
        assert choose_config(1, n, k, 2).kind.startswith("gemv")
        assert choose_config(4, n, k, 2, skinny=False).kind == "mma"
    assert choose_config(3, 11008, 4096, 3).kind == "skinny"  # measured at 4 rows (run 37)
    assert choose_config(3, 4096, 4096, 4).kind == "mma"
    assert choose_config(6, 11008, 4096, 4).kind == "skinny"  # measured at 8 rows
    assert choose_config(6, 28672, 8192, 4).kind == "mma"
    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "0")
    assert choose_config(4, 11008, 4096, 2).kind == "dot"


def _cfg(row_tiles: int, split: int, num_warps: int, depth: int) -> KernelConfig:
    return KernelConfig("skinny", block_n=16 * row_tiles * num_warps, block_k=128, block_m=8, split_k=split,
                        num_warps=num_warps, num_stages=depth)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,g", [(1000, 4096, 128), (700, 4352, 256), (500, 4160, 4160), (72, 1000, 1000),
                                   (300, 11008, 128)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_matches_reference(bits, n, k, g, m, gluon_on):
    """Groups of 128, 256 or a whole row, K a multiple of 128 or not, N not a multiple of a program's
    rows; 1-4 row tiles, 1-2 warps, 1-4 steps together, K split 1-5 ways, with and without bias."""
    w = pack(*random_qsz(n, k, g, bits, seed=n + k + m, device="cuda"), bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    ref, ref_b = matmul_reference(x, w), matmul_reference(x, w, bias)
    cases = [(1, 1, 1, 1, None), (2, 3, 1, 2, bias), (1, 2, 2, 2, None), (2, 5, 1, 1, bias)]
    if bits != 3:
        cases += [(1, 4, 1, 4, None), (4, 2, 1, 1, bias)]
    for rt, split, nw, depth, b in cases:
        y = packed_matmul(x, w, b, config=_cfg(rt, split, nw, depth))
        assert rel_err(y, ref if b is None else ref_b) < 2e-3, (rt, split, nw, depth, b is not None)


@pytest.mark.gpu
@gpu
def test_groups_it_cannot_take_fall_back(gluon_on):
    """Groups of 64 codes split a step: the product runs on another kernel, still right."""
    from hpsearch.kernels import _skinny

    w = pack(*random_qsz(500, 1024, 64, 4, seed=3, device="cuda"), 4, 64)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    assert not _skinny.takes(x, 4, 64, 1024)
    assert rel_err(packed_matmul(x, w, config=_cfg(2, 2, 1, 1)), matmul_reference(x, w)) < 2e-3


@pytest.mark.gpu
@gpu
def test_split_k_under_cuda_graph_replay(gluon_on):
    assert_replays_match(_cfg(2, 4, 1, 2), bits=2, rows=4)
