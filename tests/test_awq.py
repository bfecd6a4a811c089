"""AWQ: the scale search never loses to unscaled quantization and helps with salient channels."""

from __future__ import annotations

import pytest
import torch

from hpsearch.methods.awq import awq_scales, awq_search
from hpsearch.methods.gptq import gptq_quantize, output_error
from hpsearch.methods.grid import quantize_rtn


def _layer(seed: int, n: int = 32, k: int = 128, tokens: int = 1024):
    """Inputs with a few salient channels (large |x|), as in LLM activations."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.05
    X = torch.randn(tokens, k, generator=g)
    X[:, torch.randperm(k, generator=g)[:4]] *= 20.0
    return W, X.T @ X / tokens, X.abs().mean(0)


@pytest.mark.parametrize("bits,group", [(3, 32), (4, 32), (4, 128), (3, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_awq_reduces_layer_error_vs_rtn(bits, group, seed):
    W, H, mean_abs = _layer(seed)
    rtn = output_error(W, quantize_rtn(W, bits, group, False).dequantize(), H)
    qw, alpha, err = awq_search(W, H, mean_abs, bits, group, False)
    assert qw.in_scale is not None and qw.in_scale.dtype == torch.float16
    assert err == pytest.approx(output_error(W, qw.dequantize(), H))
    assert err < rtn and alpha > 0


def test_awq_with_gptq_inner_at_most_gptq_with_same_scale():
    W, H, mean_abs = _layer(3)
    qw, alpha, err = awq_search(W, H, mean_abs, 3, 32, False,
                                final=lambda w, h: gptq_quantize(w, h, 3, 32, False))
    rtn_awq = awq_search(W, H, mean_abs, 3, 32, False)[2]
    assert err <= rtn_awq
    # the scaled problem is solved exactly in the scaled basis: y = Q(W s) (x / s)
    s = qw.in_scale.float()
    torch.testing.assert_close(qw.dequantize(), (qw.dequantize() * s) / s)


def test_alpha_zero_is_rtn():
    W, H, mean_abs = _layer(4)
    s = awq_scales(mean_abs, 0.0)
    assert torch.equal(s, torch.ones_like(s))
    qw, alpha, err = awq_search(W, H, mean_abs, 4, 32, False, grid=(0.0,))
    torch.testing.assert_close(qw.dequantize(), quantize_rtn(W, 4, 32, False).dequantize())
