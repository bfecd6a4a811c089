"""fuse_rope_attention and packed_qkv_rope: which attention modules it takes, what it leaves, errors
(CPU, the PyTorch reference path)."""

from __future__ import annotations

import pytest
import torch
from gated_cases import decode_logits, tiny_model
from hpsearch.kernels import (
    PackedLinear,
    fuse_gated_mlps,
    fuse_packed_siblings,
    fuse_rope_attention,
    packed_qkv_rope,
    unfuse_gated_mlps,
    unfuse_rope_attention,
)
from packed_cases import random_qsz, rel_err
from rope_cases import HEADS, rope_tables
from torch import nn

EXAMPLE = torch.zeros(1, 2, dtype=torch.long)


def rope(model) -> list[str]:
    """Siblings first, as pack_model and the decode bench do, then the attention modules."""
    fuse_packed_siblings(model, input_ids=EXAMPLE)
    return fuse_rope_attention(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_path_fuses_and_restores(arch):
    model = tiny_model(arch, layers=2)
    ref = decode_logits(model, steps=3, prompt=3)
    fuse_packed_siblings(model, input_ids=EXAMPLE)
    state = model.state_dict()
    assert fuse_rope_attention(model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert rel_err(decode_logits(model, steps=3, prompt=3), ref) < 2e-3
    after = model.state_dict()  # the same tensors: only the attention modules' forward changed
    assert after.keys() == state.keys() and all(after[k].data_ptr() == v.data_ptr() for k, v in state.items())
    assert unfuse_rope_attention(model) == 2
    assert all(not type(b.self_attn).__name__.startswith("Rope") for b in model.model.layers)
    assert rel_err(decode_logits(model, steps=3, prompt=3), ref) == 0.0


def test_gated_and_rope_fusions_undo_separately():
    model = tiny_model("llama", layers=1)
    fuse_packed_siblings(model, input_ids=EXAMPLE)
    assert fuse_gated_mlps(model, input_ids=EXAMPLE) == ["model.layers.0.mlp"]
    assert fuse_rope_attention(model) == ["model.layers.0.self_attn"]
    assert unfuse_gated_mlps(model) == 1
    assert type(model.model.layers[0].self_attn).__name__ == "RopeLlamaAttention"
    assert unfuse_rope_attention(model) == 1
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"


def test_other_caches_and_prefill_take_the_original_forward():
    from transformers import DynamicCache

    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))

    def dynamic_decode():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
            return model(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True).logits

    before = dynamic_decode()
    assert rope(model) == ["model.layers.0.self_attn"]
    assert torch.equal(dynamic_decode(), before)


def test_attention_with_per_head_norms_stays():
    # Qwen3 normalises each query and key head before rotary embedding: not the Llama-family steps
    model = tiny_model("qwen3", layers=1)
    assert rope(model) == []
    assert type(model.model.layers[0].self_attn).__name__ == "Qwen3Attention"


def test_interleaved_rotary_embedding_is_refused():
    # Cohere rotates pairs (2i, 2i + 1), not (d, d + head_dim / 2): the keys the check's step writes
    # differ, though a small random model's logits hardly move
    model = tiny_model("cohere", layers=1)
    assert rope(model) == []
    assert type(model.model.layers[0].self_attn).__name__ == "CohereAttention"


def test_clipped_projections_stay():
    model = tiny_model("olmo", layers=1)
    model.config.clip_qkv = 8.0
    assert rope(model) == []


def test_ungrouped_projections_stay():
    model = tiny_model("llama", layers=1)
    assert fuse_rope_attention(model) == []  # fuse_packed_siblings was not called


def test_a_float16_key_projection_stays():
    model = tiny_model("llama", layers=1)
    model.model.layers[0].self_attn.k_proj = nn.Linear(64, 32, bias=False, dtype=torch.float16)
    assert rope(model) == []


def test_an_attention_whose_forward_is_not_the_llama_one_is_restored():
    model = tiny_model("llama", layers=1)
    attention = model.model.layers[0].self_attn

    class Scaled(type(attention)):  # same modules, another forward: the decode check catches it
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return 2 * out, weights

    attention.__class__ = Scaled
    assert rope(model) == []
    assert type(attention) is Scaled


@pytest.mark.parametrize("batch", [1, 3])
def test_unfused_steps_are_transformers_rotary_embedding(batch):
    # CPU without the interpreter: the unfused steps, a batch of rows each at its own position, against
    # transformers' apply_rotary_pos_emb on the split product and a cache written by hand
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hq, hkv, d, k, g = HEADS[0]
    q, s, z = random_qsz((hq + 2 * hkv) * d, k, g, 4, seed=batch)
    bias = torch.randn((hq + 2 * hkv) * d).half()
    layer = PackedLinear.from_quantized(q, s, z, 4, g, bias=bias)
    x = (torch.randn(batch, 1, k) * 4).half()
    cos, sin = rope_tables(batch, d, 6)
    kc, vc = torch.zeros(batch, hkv, 8, d).half(), torch.zeros(batch, hkv, 8, d).half()
    got = layer.qkv_rope(x, cos, sin, kc, vc, torch.tensor(6), hq, hkv)
    y = layer(x).float()
    heads = [t.reshape(batch, 1, -1, d).transpose(1, 2) for t in y.split([hq * d, hkv * d, hkv * d], dim=-1)]
    q_ref, k_ref = apply_rotary_pos_emb(heads[0], heads[1], cos.float(), sin.float())
    assert rel_err(got, q_ref.transpose(1, 2).reshape(batch, 1, -1)) < 1e-3
    assert rel_err(kc[:, :, 6], k_ref[:, :, 0]) < 1e-3 and rel_err(vc[:, :, 6], heads[2][:, :, 0]) < 1e-3
    assert not kc[:, :, :6].any() and not kc[:, :, 7:].any() and not vc[:, :, :6].any() and not vc[:, :, 7:].any()


def test_bad_inputs_are_refused_with_the_name_and_what_is_allowed():
    hq, hkv, d, k, g = HEADS[0]
    q, s, z = random_qsz((hq + 2 * hkv) * d, k, g, 4)
    layer = PackedLinear.from_quantized(q, s, z, 4, g)
    cos, sin = rope_tables(1, d, 0)
    kc = torch.zeros(1, hkv, 4, d, dtype=torch.float16)
    pos = torch.tensor(1)
    x = torch.randn(1, 1, k).half()
    with pytest.raises(ValueError, match=r"x must be \[batch, 1, features\] \(one new token per row\), got \(1, 2, 96\)"):
        layer.qkv_rope(torch.randn(1, 2, k).half(), cos, sin, kc, kc.clone(), pos, hq, hkv)
    with pytest.raises(ValueError, match=r"not q/k/v heads of 16 \(4 \+ 2 x 1 heads"):
        layer.qkv_rope(x, cos, sin, kc[:, :1], kc[:, :1].clone(), pos, hq, 1)
    with pytest.raises(ValueError, match=r"k_cache and v_cache must be \[1, 2, length, 16\]"):
        layer.qkv_rope(x, cos, sin, kc, kc[:, :, :3].clone(), pos, hq, hkv)
    with pytest.raises(ValueError, match=r"cos and sin must be \[batch or 1, 1, 16\]"):
        layer.qkv_rope(x, cos[..., :8], sin[..., :8], kc, kc.clone(), pos, hq, hkv)
    with pytest.raises(ValueError, match="position must be a 0-dim integer tensor"):
        layer.qkv_rope(x, cos, sin, kc, kc.clone(), torch.tensor([1]), hq, hkv)
    with pytest.raises(ValueError, match="x has 64 features, the weight expects 96"):
        packed_qkv_rope(torch.randn(1, 1, 64).half(), layer.qweight, layer.scales, layer.qzeros, None, 4, g, k,
                        cos, sin, kc, kc.clone(), pos, hq, hkv)


def test_torch_compile_traces_the_fused_step_whole():
    # what the GPU's compiled decode relies on: dynamo follows the swapped forward (fullgraph) and the
    # step's graph calls the fused op, whose writes land in the cache as in eager mode
    from transformers import StaticCache

    model = tiny_model("llama", layers=1)
    assert rope(model) == ["model.layers.0.self_attn"]
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    results = []
    for compiled in (False, True):
        cache = StaticCache(config=model.config, max_cache_len=6)
        torch._dynamo.reset()

        def step(t, cache=cache):
            return model(input_ids=t, past_key_values=cache, use_cache=True).logits

        run = torch.compile(step, backend=backend, fullgraph=True) if compiled else step
        with torch.no_grad():
            model(input_ids=ids[:, :3], past_key_values=cache, use_cache=True)
            results.append((run(ids[:, 3:]), cache.layers[0].keys.clone(), cache.layers[0].cumulative_length.item()))
    calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("packed_qkv_rope" in c for c in calls), calls
    (eager, keys, length), (traced, traced_keys, traced_length) = results
    assert torch.equal(eager, traced) and torch.equal(keys, traced_keys) and length == traced_length == 4


def test_the_check_holds_the_first_layer_tight_and_allows_later_layers_their_rounding():
    from hpsearch.kernels._rope_attention import _disagree

    g = torch.Generator().manual_seed(0)
    before = [torch.randn(8, 32, generator=g) for _ in range(7)]  # logits, then k, v of three layers

    def drifted(index, rel):
        after = [t.clone() for t in before]
        after[index] = after[index] + rel * before[index].abs().max()
        return after

    assert not _disagree(before, drifted(5, 2e-2), 1e-2, 0.1)  # a deep layer: compounded rounding
    assert not _disagree(before, drifted(0, 2e-2), 1e-2, 0.1)  # the logits likewise
    assert _disagree(before, drifted(1, 2e-2), 1e-2, 0.1)  # the first layer's keys: a different rotation
    assert _disagree(before, drifted(2, 2e-2), 1e-2, 0.1)  # ... or value
    assert _disagree(before, drifted(0, 0.2), 1e-2, 0.1)  # logits far off: another computation
