"""The packed model computes what the fake-quantized model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import small_config
from hpsearch.manifest import Manifest
from hpsearch.packing import pack_model
from hpsearch.plan import LayerPlan, Plan
from hpsearch.stages.base import StageContext
from hpsearch.stages.quantize import Quantize
from hpsearch.stages.rtn import RTN
from hpsearch.structure import structure_of


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_logits_match_fake_quantized(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config(arch, 256)).eval()
    structure = structure_of(model)
    linears = structure.block_linears()
    bits = [2, 3, 4, 8]
    plan = Plan(layers={li.name: LayerPlan(bits=bits[i % 4], group_size=32 if i % 2 else -1) for i, li in enumerate(linears)})
    plan.layers[linears[0].name] = LayerPlan(bits=16)
    ctx = StageContext(structure, Manifest.for_structure("t", structure), None, torch.device("cpu"))
    Quantize(methods={"rtn": RTN()}).apply(model, plan, ctx)
    packed = copy.deepcopy(model)
    outcome = pack_model(packed, ctx.artifacts["quantized"])
    assert set(outcome.values()) == {"packed"} and len(outcome) == len(linears) - 1
    assert type(packed.get_submodule(linears[0].name)).__name__ == "Linear"
    assert type(packed.get_submodule(linears[1].name)).__name__ == "PackedLinear"
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref, got = model(ids).logits, packed(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_layer_changed_after_quantization_stays_dense():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config("llama", 256)).eval()
    structure = structure_of(model)
    name = structure.block_linears()[2].name
    plan = Plan(layers={name: LayerPlan(bits=4, group_size=32)})
    ctx = StageContext(structure, Manifest.for_structure("t", structure), None, torch.device("cpu"))
    Quantize(methods={"rtn": RTN()}).apply(model, plan, ctx)
    model.get_submodule(name).weight.data[0, 0] = 0.123  # e.g. pruned or tuned afterwards
    assert pack_model(model, ctx.artifacts["quantized"])[name].startswith("dense")


def test_packed_siblings_fused_give_the_same_logits():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config("llama", 256)).eval()
    structure = structure_of(model)
    plan = Plan(layers={li.name: LayerPlan(bits=4, group_size=32) for li in structure.block_linears()})
    ctx = StageContext(structure, Manifest.for_structure("t", structure), None, torch.device("cpu"))
    Quantize(methods={"rtn": RTN()}).apply(model, plan, ctx)
    ids = torch.randint(0, 256, (2, 16))
    packed = copy.deepcopy(model)
    outcome = pack_model(packed, ctx.artifacts["quantized"], example=ids[:1, :4])
    assert outcome["model.layers.0.self_attn.k_proj"] == ("packed, fused with q_proj+v_proj; rotary embedding and "
                                                         "KV-cache write in the same launch at decode steps")
    assert type(packed.model.layers[0].self_attn).__name__ == "RopeLlamaAttention"
    assert outcome["model.layers.1.mlp.up_proj"] == "packed, fused with gate_proj; silu(gate) * up in the same launch"
    assert type(packed.model.layers[1].mlp).__name__ == "GatedLlamaMLP"
    assert outcome["model.layers.0.self_attn.o_proj"] == "packed"
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
