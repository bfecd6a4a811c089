"""Search-space expansion against model structure, across architectures."""

from __future__ import annotations

import optuna
import pytest
from transformers import AutoConfig

from conftest import ARCHES, small_config
from hpsearch.errors import ConfigError
from hpsearch.space import SearchSpace
from hpsearch.structure import structure_from_config

SPACE = {
    "granularity": "layer",
    "layer": {
        "bits": {"choices": [2, 3, 4, 8, 16]},
        "group_size": {"choices": [32, 64, -1], "if": {"bits": [2, 3, 4, 8]}},
    },
    "fixed": {"method": "rtn"},
    "baselines": {"fp16": {"bits": 16}, "w4": {"bits": 4, "group_size": 64}},
}


@pytest.mark.parametrize("arch", ARCHES)
def test_structure_reads_blocks_and_linears_without_weights(arch):
    cfg = small_config(arch, 256)
    s = structure_from_config(cfg)
    assert s.n_blocks == 2
    assert s.hidden_size == 64 and s.n_heads == 4
    assert s.n_kv_heads == cfg.num_key_value_heads
    kinds = s.kinds()
    per_block = len(kinds)
    assert len(s.block_linears()) == 2 * per_block
    if arch == "phi3":
        assert set(kinds) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    else:
        assert {"self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"} <= set(kinds)
    assert any(li.block == -1 for li in s.linears) or s.tied_lm_head
    assert s.tied_lm_head == bool(getattr(cfg, "tie_word_embeddings", False))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("granularity,units_per_arch", [("model", lambda s: 1), ("block", lambda s: s.n_blocks),
                                                         ("layer_type", lambda s: len(s.kinds())),
                                                         ("layer", lambda s: len(s.block_linears()))])
def test_units_per_granularity(arch, granularity, units_per_arch):
    s = structure_from_config(small_config(arch, 256))
    space = SearchSpace.from_config({**SPACE, "granularity": granularity}, s)
    assert len(space.units) == units_per_arch(s)
    assert sum(len(m) for m in space.units.values()) == len(s.block_linears())


def test_conditional_params_and_plan_roundtrip():
    s = structure_from_config(small_config("llama", 256))
    space = SearchSpace.from_config(SPACE, s)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(10):
        trial = study.ask()
        params = space.suggest(trial)
        plan = space.to_plan(params)
        for unit, members in space.units.items():
            bits = params[f"bits.{unit}"]
            has_group = f"group_size.{unit}" in params
            assert has_group == (bits != 16)  # no group size for unquantized layers
            for li in members:
                assert plan.layers[li.name].bits == bits
                assert plan.layers[li.name].method == "rtn"
                if has_group:
                    assert plan.layers[li.name].group_size == params[f"group_size.{unit}"]
        assert space.to_plan(dict(trial.params)) == plan  # the job rebuilds the same plan
        study.tell(trial, 0.0)


def test_baselines_pin_every_unit():
    s = structure_from_config(small_config("qwen2", 256))
    space = SearchSpace.from_config(SPACE, s)
    w4 = space.baseline_params("w4")
    plan = space.to_plan(w4)
    assert {p.bits for p in plan.layers.values()} == {4}
    assert {p.group_size for p in plan.layers.values()} == {64}
    assert {p.bits for p in space.to_plan(space.baseline_params("fp16")).layers.values()} == {16}
    narrow = SearchSpace.from_config({**SPACE, "layer": {"bits": {"choices": [2, 3]}}}, s)
    with pytest.raises(ValueError, match="outside the space"):
        narrow.baseline_params("fp16")


@pytest.mark.parametrize("change,key,allowed", [
    ({"layer": {"bits": {"choices": [4, 5]}}}, "search.layer.bits.choices", "2, 3, 4, 8, 16"),
    ({"granularity": "row"}, "search.granularity", "model, block, layer_type, layer"),
    ({"layer": {"bitz": {"choices": [4]}}}, "search.layer.bitz", "bits"),
    ({"layer": {"group_size": {"choices": [0]}}}, "search.layer.group_size.choices", "-1"),
    ({"layer": {"bits": {"choices": [4]}, "group_size": {"choices": [32], "if": {"nope": [1]}}}}, "search.group_size.if", "not a field"),
])
def test_bad_space_is_one_line_error_naming_key(change, key, allowed):
    s = structure_from_config(small_config("llama", 256))
    with pytest.raises(ConfigError) as err:
        SearchSpace.from_config({**SPACE, **change}, s)
    message = str(err.value)
    assert message.startswith(key) and allowed in message and "\n" not in message


def test_structure_from_saved_config(tiny_model_dir):
    s = structure_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    assert s.model_type == "llama" and len(s.block_linears()) == 14
