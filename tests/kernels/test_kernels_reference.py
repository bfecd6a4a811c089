"""The PyTorch references against float64 arithmetic written out here."""

from __future__ import annotations

import pytest
import torch
from hpsearch.kernels import SUPPORTED_BITS, dequantize, matmul_reference, pack
from packed_cases import SHAPES, random_qsz, rel_err, w_hat_f64


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n,k,g", SHAPES[:5])
def test_dequantize(bits, n, k, g):
    q, s, z = random_qsz(n, k, g, bits, seed=1)
    w = pack(q, s, z, bits, g)
    ref = w_hat_f64(q, s, z, g)
    assert torch.equal(dequantize(w, torch.float32).double(), ref)  # exact in float32
    torch.testing.assert_close(dequantize(w), ref.half(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_matmul_reference(dtype, bits):
    n, k, g = 40, 96, 32
    q, s, z = random_qsz(n, k, g, bits, seed=2)
    w = pack(q, s, z, bits, g)
    x = torch.randn(3, 5, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref = x.double() @ w_hat_f64(q, s, z, g).T + bias.double()
    y = matmul_reference(x, w, bias)
    assert y.dtype == dtype and y.shape == (3, 5, n)
    err = rel_err(y, ref)
    assert err < {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
