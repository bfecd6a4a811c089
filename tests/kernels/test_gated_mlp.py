"""fuse_gated_mlps: which MLPs it takes, what it leaves, errors (CPU, the PyTorch reference path)."""

from __future__ import annotations

import pytest
import torch
from gated_cases import decode_logits, tiny_model
from hpsearch.kernels import (
    PackedLinear,
    fuse_gated_mlps,
    fuse_packed_siblings,
    packed_gated_matmul,
    unfuse_gated_mlps,
)
from packed_cases import random_qsz, rel_err
from torch import nn

EXAMPLE = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}


def gate(model) -> list[str]:
    """Siblings first, as pack_model and the decode bench do, then the gated MLPs."""
    fuse_packed_siblings(model, **EXAMPLE)
    return fuse_gated_mlps(model, **EXAMPLE)


def test_reference_path_fuses_and_restores():
    model = tiny_model("llama", layers=2)
    ref = decode_logits(model)
    fuse_packed_siblings(model, **EXAMPLE)
    state = model.state_dict()
    assert fuse_gated_mlps(model, **EXAMPLE) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert rel_err(decode_logits(model), ref) < 1e-3
    after = model.state_dict()  # the same tensors: only the MLPs' forward changed
    assert after.keys() == state.keys() and all(after[k].data_ptr() == v.data_ptr() for k, v in state.items())
    assert unfuse_gated_mlps(model) == 2
    assert all(type(b.mlp).__name__ == "LlamaMLP" for b in model.model.layers)
    assert rel_err(decode_logits(model), ref) < 1e-3


def test_a_float16_down_proj_is_fine():
    model = tiny_model("llama", layers=1)
    model.model.layers[0].mlp.down_proj = nn.Linear(128, 64, bias=False, dtype=torch.float16)
    ref = decode_logits(model)
    assert gate(model) == ["model.layers.0.mlp"]
    assert rel_err(decode_logits(model), ref) < 1e-3


def test_a_float16_gate_stays():
    model = tiny_model("llama", layers=1)
    model.model.layers[0].mlp.gate_proj = nn.Linear(64, 128, bias=False, dtype=torch.float16)
    assert gate(model) == []


def test_an_activation_that_is_not_silu_stays():
    model = tiny_model("llama", layers=1)
    model.model.layers[0].mlp.act_fn = nn.GELU()
    assert gate(model) == []


def test_an_mlp_whose_forward_is_not_the_gated_one_is_restored():
    model = tiny_model("llama", layers=1)
    mlp = model.model.layers[0].mlp

    class Scaled(type(mlp)):  # same modules, another forward: checking on the example input catches it
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp.__class__ = Scaled
    assert gate(model) == []
    assert type(mlp) is Scaled


def test_an_odd_row_count_is_refused():
    q, s, z = random_qsz(9, 64, 32, 4)
    layer = PackedLinear.from_quantized(q, s, z, 4, 32)
    with pytest.raises(ValueError, match="a gated product needs an even number of rows"):
        layer.gated(torch.randn(1, 64).half())
    with pytest.raises(ValueError, match="x has 32 features, the weight expects 64"):
        packed_gated_matmul(torch.randn(1, 32).half(), layer.qweight, layer.scales[:8], layer.qzeros[:8], None, 4,
                            32, 64)


def test_separate_gate_and_up_are_left_for_the_siblings_to_group():
    model = tiny_model("llama", layers=1)
    assert fuse_gated_mlps(model, **EXAMPLE) == []  # gate and up are still two layers
    assert gate(model) == ["model.layers.0.mlp"]


def test_an_example_of_zeros_still_checks_the_forward():
    # padding tokens may embed to zero: the check also runs a random input, which a wrong forward fails
    model = tiny_model("llama", layers=1)
    model.model.embed_tokens.weight.data[0] = 0
    mlp = model.model.layers[0].mlp

    class Scaled(type(mlp)):
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp.__class__ = Scaled
    assert gate(model) == []
