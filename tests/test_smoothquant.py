"""SmoothQuant: smoothing lowers W8A8 layer error with activation outliers; the stage's forward."""

from __future__ import annotations

import copy

import pytest
import torch

from hpsearch.methods.smoothquant import quantize_per_token, smooth_scales, w8a8_output
from hpsearch.stages.smoothquant import SmoothQuant


def _outlier_layer(seed: int, n: int = 64, k: int = 128, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.05
    X = torch.randn(tokens, k, generator=g)
    X[:, torch.randperm(k, generator=g)[:3]] *= 60.0  # the systematic outlier channels of LLMs
    return W, X


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("a_bits", [8, 6])
def test_smoothing_reduces_w8a8_error(seed, a_bits):
    W, X = _outlier_layer(seed)
    ref = X @ W.T
    ones = torch.ones(W.shape[1])
    plain = (w8a8_output(X, W, ones, 8, a_bits) - ref).pow(2).mean()
    s = smooth_scales(X.abs().amax(0), W.abs().amax(0), 0.5)
    smooth = (w8a8_output(X, W, s, 8, a_bits) - ref).pow(2).mean()
    assert smooth < 0.5 * plain


def test_per_token_quantization_is_per_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0]])
    q = quantize_per_token(x, 8)
    assert torch.allclose(q[0], x[0], atol=2.0 / 127 / 2 + 1e-6)  # row 0 keeps its own fine scale
    assert q[0, 1] == -2.0 and q[1, 0] == 100.0


def test_stage_forward_close_to_fp_and_manifest(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from hpsearch.calib import capture
    from hpsearch.calib._store import CachedCalibration
    from hpsearch.manifest import Manifest
    from hpsearch.plan import LayerPlan, Plan
    from hpsearch.stages.base import StageContext
    from hpsearch.structure import structure_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    structure = structure_of(model)
    names = [li.name for li in structure.linears]
    ids = torch.randint(0, 200, (4, 32))
    stats, aliases = capture(model, ids, names, batch_size=2, device=torch.device("cpu"))
    calibration = CachedCalibration("k", stats, aliases, None, {})
    keep = "model.layers.1.mlp.down_proj"
    plan = Plan({li.name: LayerPlan(bits=16 if li.name == keep else 8, method="smoothquant")
                 for li in structure.block_linears()}, model={"sq_alpha": 0.6})
    ctx = StageContext(structure, Manifest.for_structure("m", structure), None, torch.device("cpu"), calibration=calibration)
    assert SmoothQuant().requires(plan) == frozenset({"max_abs"})
    q = copy.deepcopy(model)
    summary = SmoothQuant().apply(q, plan, ctx)
    assert summary["layers"] == len(plan.layers) - 1 and summary["alpha"] == 0.6
    assert type(q.get_submodule(keep)).__name__ == "Linear"
    assert type(q.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "W8A8Linear"
    assert ctx.manifest.layers["model.layers.0.self_attn.q_proj"]["bits"] == 8
    # q/k/v share the smoothing factor, as when it is folded into the norm before them
    qkv = [ctx.artifacts["quantized"][f"model.layers.0.self_attn.{p}_proj"].in_scale for p in "qkv"]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = q(input_ids=ids).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
