"""The Gluon kernel for 2-16 rows (``kernels/_few_rows``).

On CPU: its code is compiled for an H100 (sm_90, no GPU needed) and checked for what the kernel is
for (the MMA operands come straight from registers: nothing staged in shared memory but, with
``x_shared``, the activations, copied once a program), and the launcher's choices are checked. On a GPU: it equals the reference over bit-widths, shapes, row
counts, K splits, prefetch depths and biases, and under CUDA-graph replay.
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
def few_rows_on(monkeypatch):
    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "1")


def _compile_sm90(bits: int, prefetch: int, x_steps: int = 0, block_n: int = 128):
    """The kernel compiled for sm_90 with a tile of 4 warps (with ``x_steps``: for aligned operands and
    K a multiple of 128, the Llama shapes, where the activation copies are 16-byte vectors)."""
    pytest.importorskip("triton.experimental.gluon")
    from hpsearch.kernels import _few_rows_kernels

    consts = {"BITS": bits, "GROUP": 128, "BLOCK_N": block_n, "NW": 4, "MASK_K": not x_steps, "HAS_BIAS": True,
              "PREFETCH": prefetch, "XSTEPS": x_steps}
    return compile_gluon_sm90(_few_rows_kernels.few_rows_kernel, consts, 4, aligned=x_steps > 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_operands_come_from_registers(bits, prefetch):
    """Without ``x_shared``."""
    compiled = _compile_sm90(bits, prefetch)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    # nothing of a step goes through shared memory (the Triton kernel's dequantized tile does)
    assert "local_alloc" not in ttgir and "ldmatrix" not in ptx
    # a step is 4 warps' 128 columns x 128 codes: per warp 4 column tiles x 8 k16 blocks
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 32 * prefetch


@pytest.mark.parametrize("bits,prefetch,block_n", [(2, 2, 128), (3, 1, 128), (4, 2, 128), (4, 4, 64), (2, 4, 64)])
def test_activations_copied_to_shared_memory_once(bits, prefetch, block_n):
    """``x_shared``: the program's steps of activations are copied to shared memory asynchronously
    before the loop (two 16-byte ``cp.async`` a thread and step), then read each step with 16-byte
    shared loads (8 a step: a thread's 16 pairs of two rows); every step still MMAs from
    registers, and the loop holds no global activation load."""
    steps = 8
    compiled = _compile_sm90(bits, prefetch, steps, block_n)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    assert ttgir.count("ttg.async_copy_global_to_local") == steps and "ldmatrix" not in ptx
    assert ptx.count("cp.async.cg.shared.global") == 2 * steps and "cp.async.ca" not in ptx
    assert ptx.count("ld.shared.v4.b32") == 8 * prefetch
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == block_n // 4 * prefetch
    # the swizzle (row r's 16-byte chunk c at c ^ (r % 8)) is in the layout of the allocation
    assert "#ttg.swizzled_shared<{vec = 4, perPhase = 1, maxPhase = 8" in ttgir


def test_on_by_default_and_off_with_0(monkeypatch):
    """2-16 rows at 2, 3 and 4 bits take the kernel unless ``HPSEARCH_FEW_ROWS=0``; 8 bits keep the
    Triton tensor-core kernel either way (no faster there, run 32)."""
    from hpsearch.kernels import _few_rows

    monkeypatch.delenv("HPSEARCH_FEW_ROWS", raising=False)
    assert _few_rows.enabled()
    for bits, kind in ((2, "mma"), (3, "mma"), (4, "mma"), (8, "dot")):
        assert choose_config(16, 11008, 4096, bits).kind == kind
        assert choose_config(4, 1000, 352, bits, skinny=False).kind == kind
    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "0")
    assert not _few_rows.enabled()
    for bits in (2, 3, 4, 8):
        assert choose_config(16, 11008, 4096, bits).kind == "dot"


def test_a_bad_switch_is_refused(monkeypatch):
    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "yes")
    with pytest.raises(ValueError, match="HPSEARCH_FEW_ROWS must be 0 .* got 'yes'"):
        choose_config(16, 11008, 4096, 4)


@pytest.mark.parametrize("m", [2, 9, 16])
def test_choose_config_sends_few_rows_at_2_3_and_4_bits_to_it(m, few_rows_on):
    from hpsearch.kernels import _few_rows

    for bits in (2, 3, 4):
        for n, k in ((11008, 4096), (4096, 11008), (1000, 352), (28672, 8192)):
            cfg = choose_config(m, n, k, bits, skinny=False)  # 2-8 rows may take ``skinny`` (test_skinny)
            assert cfg.kind == "mma" and cfg.block_n % 32 == 0 and cfg.num_stages in (1, 2, 4)
            assert cfg.split_k == 1 or k // (128 * cfg.split_k) >= 1
            # the activations through shared memory off the table (1000x352) and where it won on the
            # table (not at 3 bits on 8192x28672 and 11008x4096), a split at most MAX_SHARED_STEPS
            # steps then
            assert cfg.x_shared == (bits != 3 or (n, k) not in ((28672, 8192), (4096, 11008)))
            assert not cfg.x_shared or -(-k // 128) <= cfg.split_k * _few_rows.MAX_SHARED_STEPS
    assert choose_config(m, 11008, 4096, 8).kind == "dot"
    assert choose_config(17, 11008, 4096, 4).kind == "dot"
    assert choose_config(1, 11008, 4096, 4).kind.startswith("gemv")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,g,m", [(1000, 4096, 128, 1), (1000, 4096, 128, 16), (200, 320, 32, 5),
                                     (1000, 4160, 64, 16), (72, 256, 256, 3), (24, 1000, 1000, 7)])
def test_matches_reference(bits, n, k, g, m, few_rows_on):
    """Groups of 32 to a whole row, K a multiple of 128 or not, 1 to 16 rows; K split 1-4 ways,
    one, two or four steps ahead, with and without bias, 4 or 8 warps, the activations read by every
    warp or copied to shared memory once (``x_shared``; a split of 32 steps is over the limit and
    reads them per warp)."""
    w = pack(*random_qsz(n, k, g, bits, seed=n + k + m, device="cuda"), bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    ref, ref_b = matmul_reference(x, w), matmul_reference(x, w, bias)
    for split, ahead, bn, nw, b, shared in ((1, 1, 128, 4, None, False), (3, 2, 128, 4, bias, False),
                                            (2, 1, 64, 8, bias, False), (4, 4, 64, 4, bias, True),
                                            (2, 2, 128, 4, None, True), (3, 1, 256, 8, bias, True),
                                            (1, 4, 64, 4, None, True)):
        cfg = KernelConfig("mma", block_n=bn, block_k=128, block_m=16, split_k=split, num_warps=nw, num_stages=ahead,
                           x_shared=shared)
        assert rel_err(packed_matmul(x, w, b, config=cfg), ref if b is None else ref_b) < 2e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shared", [False, True])
def test_split_k_under_cuda_graph_replay(shared, few_rows_on):
    """With ``x_shared`` each replay copies the new activations to shared memory."""
    cfg = KernelConfig("mma", block_n=128, block_k=128, block_m=16, split_k=4, num_stages=2 if shared else 1,
                       x_shared=shared)
    assert_replays_match(cfg, bits=4, rows=16)


@pytest.mark.gpu
@gpu
def test_workspace_first_needed_during_capture(few_rows_on):
    w = pack(*random_qsz(2000, 2048, 128, 2, seed=5, device="cuda"), 2, 128)
    cfg = KernelConfig("mma", block_n=64, block_k=128, block_m=16, split_k=8)
    x = torch.randn(3, 2048, device="cuda", dtype=torch.float16)
    packed_matmul(x, w, config=KernelConfig("mma", block_n=64, block_k=128, block_m=16, split_k=2))  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a stream of its own: its workspace is allocated here
        y = packed_matmul(x, w, config=cfg)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, matmul_reference(x, w)) < 2e-3
