"""RTN against an independent float64 reference; exact memory accounting on known shapes."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import small_config
from hpsearch.manifest import Manifest
from hpsearch.methods.grid import dequantize, quantize_rtn
from hpsearch.objectives.memory import kv_cache_bytes, linear_bytes, weight_bytes
from hpsearch.structure import structure_from_config


def rtn_reference(w: torch.Tensor, bits: int, g: int, sym: bool) -> torch.Tensor:
    """Textbook group-wise RTN in float64, one group at a time."""
    w = w.double()
    out = torch.empty_like(w)
    maxq = 2**bits - 1
    for n in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            x = w[n, start:start + g]
            if sym:
                scale = 2 * x.abs().max().item() / maxq
                scale = float(torch.tensor(scale).half())
                zero = (maxq + 1) // 2
            else:
                lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
                scale = (hi - lo) / maxq
                scale = float(torch.tensor(scale).half())
                zero = min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            out[n, start:start + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [8, 32])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_float64_reference(bits, g, sym):
    torch.manual_seed(bits * 100 + g)
    w = torch.randn(12, 64) * torch.rand(12, 1)
    qw = quantize_rtn(w, bits, g, sym)
    ref = rtn_reference(w, bits, g, sym)
    got = qw.dequantize(torch.float64)
    # float32 vs float64 rounding may flip a code exactly at a .5 boundary: allow one step there.
    step = qw.scale.double().repeat_interleave(g, dim=1)
    diff = (got - ref).abs()
    assert (diff <= 1e-6 + 1e-6 * ref.abs()).float().mean() > 0.99
    assert (diff <= step + 1e-6).all()
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 2**bits - 1
    assert torch.allclose(dequantize(qw.q, qw.scale, qw.zero, g), got.float())


def test_rtn_group_of_one_sign_does_not_saturate():
    w = torch.rand(4, 32) + 1.0  # every weight in [1, 2): all-positive groups
    qw = quantize_rtn(w, 4, 32, False)
    assert (qw.dequantize() - w).abs().max() <= qw.scale.float().max() / 2 + 1e-6


def test_rtn_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    errors = [(quantize_rtn(w, b, 32, False).dequantize() - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4


def test_linear_bytes_known_shapes():
    rec = {"out_features": 4096, "in_features": 11008, "bias": False}
    assert linear_bytes({**rec, "bits": 16}) == 4096 * 11008 * 2
    # 4-bit, g128, asymmetric: codes + fp16 scale + 4-bit zero per group
    groups = 4096 * 11008 // 128
    assert linear_bytes({**rec, "bits": 4, "group_size": 128, "sym": False}) == 4096 * 11008 // 2 + groups * 2 + groups // 2
    # 3-bit symmetric: zeros are implicit
    assert linear_bytes({**rec, "bits": 3, "group_size": 128, "sym": True}) == math.ceil(4096 * 11008 * 3 / 8) + groups * 2
    # per-channel 8-bit with a bias
    assert linear_bytes({**rec, "bias": True, "bits": 8, "group_size": 11008, "sym": False}) == 4096 * 11008 + 4096 * 2 + 4096 + 4096 * 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weight_bytes_uncompressed_is_two_bytes_per_parameter(arch):
    s = structure_from_config(small_config(arch, 256))
    manifest = Manifest.for_structure("x", s)
    assert weight_bytes(s, manifest) == 2 * s.n_params


def test_weight_bytes_counts_each_quantized_layer():
    s = structure_from_config(small_config("llama", 256))
    manifest = Manifest.for_structure("x", s)
    before = weight_bytes(s, manifest)
    li = s.block_linears()[0]
    manifest.update_layer(li.name, bits=4, group_size=32, sym=False)
    groups = li.numel // 32
    assert before - weight_bytes(s, manifest) == li.numel * 2 - (li.numel // 2 + groups * 2 + groups // 2)


def test_kv_cache_bytes_16bit_and_declared():
    s = structure_from_config(small_config("llama", 256))  # 2 blocks, 2 kv heads, head_dim 16
    assert kv_cache_bytes(s, None, batch=3, context=100) == 3 * 100 * 2 * 2 * 2 * 16 * 2
    kv = {"bytes_per_token": 40, "residual": 10, "residual_bytes_per_token": 256}
    assert kv_cache_bytes(s, kv, batch=2, context=100) == 2 * (90 * 40 + 10 * 256)
