"""The latency-assembly bench: its plans and its refusals (the measurement itself needs a GPU)."""

from __future__ import annotations

import pytest
from conftest import refusal

from hpsearch.bench.latency_assembly import plan_bits, run

NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_plans_give_every_block_linear_a_bit_width():
    assert set(plan_bits("uniform3", NAMES).values()) == {3}
    assert set(plan_bits("fp16", NAMES).values()) == {16}
    mixed = plan_bits("attn8_mlp4", NAMES)
    assert {mixed[n] for n in NAMES if "self_attn" in n} == {8} and {mixed[n] for n in NAMES if "mlp" in n} == {4}
    drawn = plan_bits("mixed", NAMES)
    assert drawn == plan_bits("mixed", NAMES) and set(drawn.values()) <= {2, 3, 4, 8} and len(set(drawn.values())) > 1
    with pytest.raises(ValueError, match="plan: 'uniform'"):
        plan_bits("uniform", NAMES)


@pytest.mark.parametrize(("argv", "message"), [
    (["--plans", "uniform4,w5"], "--plans: ['w5'] not known; allowed: fp16, uniform2"),
    (["--kv-heads", "3"], "--kv-heads must divide the 32 query heads"),
    (["--batch", "0"], "--batch must be at least 1, got 0"),
])
def test_bad_options_are_refused_before_any_model_is_built(argv, message, capsys):
    assert message in refusal(run, argv, capsys)


def test_random_packing_follows_the_plan_and_runs():
    import torch
    from conftest import small_config
    from transformers import AutoModelForCausalLM

    from hpsearch.kernels import PackedLinear
    from hpsearch.bench.decode import pack_random

    model = AutoModelForCausalLM.from_config(small_config("llama", 128)).eval()
    plan = {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.down_proj": 16, "model.layers.1.mlp.up_proj": 2}
    assert pack_random(model, plan, 32) == 2
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLinear) and q.bits == 3 and q.group_size == 32
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[1].mlp.up_proj, PackedLinear)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits).all()
