"""What an export says its checkpoint does not hold (the end-to-end export is in test_cli_sweeper.py)."""

from __future__ import annotations

from types import SimpleNamespace

from hpsearch.export import _runtime_only


def built(kv=None, lora=None):
    return SimpleNamespace(manifest=SimpleNamespace(model={"kv_cache": kv} if kv else {}),
                           ctx=SimpleNamespace(artifacts={"lora": lora} if lora else {}))


def test_a_quantized_kv_cache_and_unmerged_adapters_are_named():
    kv = {"k_bits": 4, "v_bits": 2, "layout": "kivi", "per_layer": [{"k_bits": 4, "v_bits": 2}, {"k_bits": 8, "v_bits": 4}]}
    lora = {"ranks": {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.mlp.up_proj": 4},
            "merged": ["model.layers.0.mlp.up_proj"]}
    notes = _runtime_only(built(kv, lora))
    assert notes[0] == ("KV cache quantized (keys/values bits per layer: 4/2, 8/4; layout kivi): applied when "
                        "decoding, by hpsearch.kvcache")
    assert notes[1].startswith("1 LoRA adapters left unmerged on compressed layers")


def test_a_16_bit_cache_and_merged_adapters_need_no_note():
    assert _runtime_only(built({"k_bits": 16, "v_bits": 16, "per_layer": [{"k_bits": 16, "v_bits": 16}]},
                               {"ranks": {"a": 8}, "merged": ["a"]})) == []
    assert _runtime_only(built()) == []
