"""MSE-optimal clipping of the grid: never above min-max on the Hessian-weighted layer error, and
the GPTQ / AWQ options that use it."""

from __future__ import annotations

import pytest
import torch

from hpsearch.errors import ConfigError
from hpsearch.methods.awq import awq_search
from hpsearch.methods.clip import mse_clip_grid, shrink_grid
from hpsearch.methods.gptq import gptq_quantize, output_error
from hpsearch.methods.grid import dequantize, fit_grid, quantize, quantize_rtn
from hpsearch.stages.awq import AWQ
from hpsearch.stages.gptq import GPTQ


def _layer(n: int, k: int, seed: int, tokens: int = 512):
    """Heavy-tailed weights (clipping pays) and correlated inputs with outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.02
    W[torch.rand(n, k, generator=g) < 0.03] *= 6.0
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = torch.randn(tokens, k, generator=g) @ mix
    X[:, torch.randperm(k, generator=g)[:3]] *= 8.0
    return W, (X.T @ X / tokens).float(), X.abs().mean(0)


def _rtn_on(W, grid, bits, group):
    scale, zero = grid
    return dequantize(quantize(W, scale, zero, bits, group), scale, zero, group)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 16, False), (4, 64, True), (2, 32, False), (8, 32, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_never_above_min_max(bits, group, sym, seed):
    W, H, _ = _layer(16, 128, seed)
    minmax = output_error(W, quantize_rtn(W, bits, group, sym).dequantize(), H)
    clipped = output_error(W, _rtn_on(W, mse_clip_grid(W, H, bits, group, sym), bits, group), H)
    assert clipped <= minmax * (1 + 1e-6)
    if bits <= 4:  # heavy tails: shrinking the range pays
        assert clipped < minmax


def test_clip_grid_format_and_identity():
    W, H, _ = _layer(8, 64, 3)
    scale, zero = mse_clip_grid(W, H, 4, 32, False, shrinks=(1.0,))
    ref_scale, ref_zero = fit_grid(W, 4, 32, False)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    scale, zero = mse_clip_grid(W, H, 4, 32, False)
    assert scale.shape == zero.shape == (8, 2) and float(zero.max()) <= 15 and float(scale.min()) > 0
    assert torch.equal(scale.half().float(), scale)  # float16 values, as stored
    assert shrink_grid(4, 0.5) == (1.0, 0.875, 0.75, 0.625, 0.5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_clip(act_order, bits):
    W, H, _ = _layer(24, 128, seed=bits)
    rtn = output_error(W, quantize_rtn(W, bits, 32, False).dequantize(), H)
    plain = gptq_quantize(W, H, bits, 32, False, act_order=act_order)
    clipped = gptq_quantize(W, H, bits, 32, False, act_order=act_order, clip_shrinks=shrink_grid(20, 0.5))
    assert output_error(W, clipped.dequantize(), H) < rtn
    # a search over {1} is the min-max grid: the result is GPTQ's own
    same = gptq_quantize(W, H, bits, 32, False, act_order=act_order, clip_shrinks=(1.0,))
    torch.testing.assert_close(same.dequantize(), plain.dequantize())


def test_awq_clip_at_most_awq():
    W, H, mean_abs = _layer(32, 128, seed=5)
    _, alpha, err = awq_search(W, H, mean_abs, 3, 32, False)
    qw, alpha_c, err_c = awq_search(W, H, mean_abs, 3, 32, False, clip_shrinks=shrink_grid(20, 0.5))
    assert alpha_c == alpha and qw.in_scale is not None
    assert err_c == pytest.approx(output_error(W, qw.dequantize(), H), rel=1e-5)
    assert err_c < err


def test_stage_options_and_config_errors():
    gptq, awq = GPTQ(), AWQ()
    assert gptq.options()["act_order"] and gptq.options()["static_groups"] and gptq.options()["clip_steps"] == 20
    assert "clip_steps" not in GPTQ(clip_search=False).options()  # off: the min-max cache key as before
    assert awq.options()["clip_max_shrink"] == 0.5
    with pytest.raises(ConfigError, match="clip_steps"):
        GPTQ(clip_steps=0)
    with pytest.raises(ConfigError, match="clip_max_shrink"):
        AWQ(clip_max_shrink=1.0)
