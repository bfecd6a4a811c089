"""The latency-assembly bench: its plans and its refusals (the measurement itself needs a GPU)."""

from __future__ import annotations

import pytest

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
])
def test_bad_options_are_refused_before_any_model_is_built(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
