"""The CUDA C tensor-core kernel for 1-16 rows (``kernels/_mma_gemv.cu``).

On CPU: the source compiles with nvcc for an H100 (sm_90, no GPU needed; skipped without nvcc)
without real spills (at most 8 bytes in one variant), the launcher refuses bad arguments, ``HPSEARCH_CUDA_KERNELS`` is validated, products it
cannot take are reported as such, and the dispatch falls back to the Triton kernels. On a GPU: it
equals the reference over bit-widths, group sizes (32 to a whole row), K and N off every multiple,
1-16 rows, warps and biases, it is exact to the fake-quantized float16 weights where it scales in
float16, it runs under CUDA-graph replay, and ``packed_matmul`` sends 1-16 rows to it.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from hpsearch.kernels import KernelConfig, choose_config, dequantize, matmul_reference, pack, packed_matmul
from hpsearch.kernels import _mma_gemv
from packed_cases import assert_replays_match, random_qsz, rel_err

@pytest.fixture
def cuda_on(monkeypatch):
    monkeypatch.setenv("HPSEARCH_CUDA_KERNELS", "1")


@pytest.mark.skipif(_mma_gemv.nvcc() is None, reason="needs nvcc (CUDA toolkit)")
def test_compiles_for_sm90_without_real_spills(tmp_path):
    out = tmp_path / "k.cubin"
    proc = subprocess.run([_mma_gemv.nvcc(), "-O3", "-cubin", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v",
                           "-o", str(out), str(_mma_gemv._SOURCE)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stderr
    # 4 bit-widths x 2 token tiles x 2 scale placements x 2 depths
    assert report.count("Compiling entry function") == 32
    spills = [int(line.split("bytes spill stores")[0].split(",")[-1]) for line in report.splitlines()
              if "bytes spill stores" in line]
    assert len(spills) == 32 and max(spills) <= 8, spills  # ptxas keeps one 8-bit variant at 64 registers


@pytest.mark.skipif(_mma_gemv.nvcc() is None, reason="needs nvcc (CUDA toolkit)")
def test_builds_a_loadable_library(tmp_path):
    path = _mma_gemv.build("90", tmp_path / "lib.so")
    import ctypes

    lib = ctypes.CDLL(str(path))
    assert hasattr(lib, "hps_mma_gemv")
    # refused before any launch: warps, rows or depth out of range, an unknown bit-width
    lib.hps_mma_gemv.restype = ctypes.c_int
    lib.hps_mma_gemv.argtypes = _mma_gemv.ARGTYPES
    args = [4, 1, 0, 1] + [None] * 6 + [1, 16, 128, 1, 7, 128, 16, 16, 16, 16, 16, None]
    assert lib.hps_mma_gemv(*args) != 0  # 0 warps
    args[2] = 4
    args[10] = 17  # 17 rows
    assert lib.hps_mma_gemv(*args) != 0
    args[10], args[3] = 1, 3  # depth 3
    assert lib.hps_mma_gemv(*args) != 0
    args[3], args[0] = 1, 5  # 5 bits
    assert lib.hps_mma_gemv(*args) != 0


def test_env_switch_is_validated(monkeypatch):
    monkeypatch.setenv("HPSEARCH_CUDA_KERNELS", "yes")
    with pytest.raises(ValueError, match="HPSEARCH_CUDA_KERNELS='yes' is not allowed; allowed: 'auto'"):
        choose_config(1, 11008, 4096, 4)
    monkeypatch.setenv("HPSEARCH_CUDA_KERNELS", "0")
    assert not _mma_gemv.enabled()
    assert choose_config(1, 11008, 4096, 4).kind != "cuda"
    monkeypatch.setenv("HPSEARCH_CUDA_KERNELS", "1")
    assert _mma_gemv.enabled()
    monkeypatch.delenv("HPSEARCH_CUDA_KERNELS")
    assert _mma_gemv.mode() == "auto"


def test_auto_takes_only_the_tables_shapes(monkeypatch, tmp_path):
    """By default the CUDA kernel runs where the measured table gives it the shape (``cu1:`` /
    ``cu16:`` entries), the Triton / Gluon kernels elsewhere."""
    import json

    from hpsearch.kernels import _launch

    table = {"cu1:4096x11008:4": {"kind": "cuda", "block_n": 16, "block_k": 128, "block_m": 8, "num_warps": 4,
                                  "num_stages": 2}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("HPSEARCH_KERNEL_TUNING", str(path))
    monkeypatch.delenv("HPSEARCH_CUDA_KERNELS", raising=False)
    _launch._tuned_table.cache_clear()
    try:
        assert choose_config(1, 11008, 4096, 4) == KernelConfig(**table["cu1:4096x11008:4"])
        assert choose_config(1, 11008, 4096, 2).kind.startswith("gemv")
        assert choose_config(16, 11008, 4096, 4).kind != "cuda"
        assert choose_config(1, 11008, 4096, 4, cuda=False).kind.startswith("gemv")
        monkeypatch.setenv("HPSEARCH_CUDA_KERNELS", "0")
        assert choose_config(1, 11008, 4096, 4).kind.startswith("gemv")
    finally:
        _launch._tuned_table.cache_clear()


def test_choose_config_sends_1_to_16_rows_to_it(cuda_on):
    for m in (1, 5, 16):
        for n, k in ((1000, 352), (11008, 4096), (4096, 11008), (28672, 8192)):
            for bits in (2, 3, 4, 8):
                cfg = choose_config(m, n, k, bits)
                assert cfg.kind == "cuda" and 1 <= cfg.num_warps <= _mma_gemv.MAX_WARPS
                assert cfg.num_warps & (cfg.num_warps - 1) == 0
    assert choose_config(17, 11008, 4096, 4).kind == "dot"
    assert choose_config(1, 11008, 4096, 4, cuda=False).kind.startswith("gemv")


def test_takes_only_what_it_can_run(cuda_on):
    x = torch.randn(1, 256, dtype=torch.float16)
    assert not _mma_gemv.takes(x, 4, 128, 256)  # CPU tensors run the Triton kernels or the reference
    if torch.cuda.is_available():
        xc = x.cuda()
        assert not _mma_gemv.takes(xc, 5, 128, 256)
        assert not _mma_gemv.takes(xc.bfloat16(), 4, 128, 256)
        assert not _mma_gemv.takes(xc, 4, 96, 256)  # groups of a power of two
        assert not _mma_gemv.takes(xc, 8, 8, 256)  # groups of at least one chunk
        assert not _mma_gemv.takes(torch.randn(17, 256, device="cuda", dtype=torch.float16), 4, 128, 256)
        assert not _mma_gemv.takes(torch.randn(2, 300, device="cuda", dtype=torch.float16)[:, 2:258], 4, 128, 256)


def test_cpu_products_fall_back(cuda_on):
    q, s, z = random_qsz(24, 256, 128, 4)
    w = pack(q, s, z, 4, 128)
    x = torch.randn(3, 256, dtype=torch.float16)
    cfg = KernelConfig("cuda", block_n=16, block_k=128, block_m=8, num_warps=4)
    assert rel_err(packed_matmul(x, w, config=cfg), matmul_reference(x, w)) < 2e-3


def test_launch_refuses_bad_warps_and_depths():
    with pytest.raises(ValueError, match="warps=0 is not allowed; allowed: 1-16"):
        _mma_gemv.launch(torch.empty(1, 8), None, torch.empty(1, 1), None, None, 4, 128, 8, 0)
    with pytest.raises(ValueError, match="depth=3 is not allowed; allowed: 1 or 2"):
        _mma_gemv.launch(torch.empty(1, 8), None, torch.empty(1, 1), None, None, 4, 128, 8, 4, 3)


CASES = [  # (N, K, group size): N and K off every multiple, per-channel, groups 32 to 256
    (40, 96, 32), (8, 128, 64), (24, 256, 128), (16, 4096, 128), (7, 100, 100), (3, 352, 352), (5, 160, 32),
    (33, 1000, 8), (100, 11008, 128), (48, 1024, 256), (19, 2048, 64), (64, 4096, 4096)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,g", CASES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.usefixtures("cuda_on")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_reference(bits, n, k, g, m):
    q, s, z = random_qsz(n, k, g, bits, seed=n * 7 + k + bits, device="cuda")
    w = pack(q, s, z, bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(n, device="cuda", dtype=torch.float16) if m in (3, 9) else None
    ref = matmul_reference(x, w, bias)
    if not _mma_gemv.takes(x, bits, g, k):
        assert (g & (g - 1)) or g < _mma_gemv.chunk_codes(bits) or (m > 1 and k % 8), (n, k, g)
        return
    for warps, depth in ((1, 1), (3, 2), (4, 1), (16, 2)):
        y = _mma_gemv.launch(x, w.qweight, w.scales, w.qzeros, bias, bits, g, k, warps, depth)
        assert y.shape == (m, n) and y.dtype == torch.float16
        assert rel_err(y, ref) < 1e-3, (warps, depth, rel_err(y, ref))
    cfg = KernelConfig("cuda", block_n=16, block_k=_mma_gemv.step_codes(bits), block_m=16, num_warps=4)
    assert rel_err(packed_matmul(x, w, bias, config=cfg), ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float16_scaling_is_exact_to_the_fake_quantized_weights(bits, cuda_on):
    """Groups of 32 codes (not whole steps) scale each pair in float16: the products are those of the
    fake-quantized float16 weights, summed in float32 (one-hot activations read single weights)."""
    n, k, g = 48, 512, 32 if bits != 8 else 16
    q, s, z = random_qsz(n, k, g, bits, seed=3, device="cuda")
    w = pack(q, s, z, bits, g)
    x = torch.zeros(16, k, device="cuda", dtype=torch.float16)
    cols = torch.randperm(k)[:16]
    x[torch.arange(16), cols] = 1.0
    y = _mma_gemv.launch(x, w.qweight, w.scales, w.qzeros, None, bits, g, k, 4)
    assert torch.equal(y, dequantize(w)[:, cols.cuda()].T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,rows", [(4, 1), (2, 16), (3, 5), (8, 1)])
def test_replays_under_cuda_graphs(bits, rows, cuda_on):
    cfg = KernelConfig("cuda", block_n=16, block_k=_mma_gemv.step_codes(bits), block_m=16, num_warps=8,
                       num_stages=2)
    assert_replays_match(cfg, bits, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_matmul_sends_few_rows_to_it(cuda_on, monkeypatch):
    q, s, z = random_qsz(300, 4096, 128, 4, device="cuda")
    w = pack(q, s, z, 4, 128)
    calls = []
    real = _mma_gemv.launch
    monkeypatch.setattr(_mma_gemv, "launch", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for m in (1, 7, 16, 17):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        assert rel_err(packed_matmul(x, w), matmul_reference(x, w)) < 2e-3
    assert calls == [1, 7, 16]
