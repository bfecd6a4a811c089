"""Packed siblings (q/k/v, gate/up) run as one layer: same logits, fewer launches, compile-traceable."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import small_config
from hpsearch.kernels import PackedLinear, PackedSibling, PackedSiblings, fuse_packed_siblings


def _packed(arch: str, bits_of=lambda name: 4, bias_on: str = "") -> torch.nn.Module:
    """A tiny model of ``arch`` whose block linears are packed from random codes."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config(arch, 128)).eval()
    gen = torch.Generator().manual_seed(1)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            n, k = module.weight.shape
            b = bits_of(name)
            q = torch.randint(0, 2**b, (n, k), dtype=torch.uint8, generator=gen)
            s = (torch.rand(n, k // 32, generator=gen) * 0.1 / 2**b + 1e-3).half()
            z = torch.randint(0, 2**b, (n, k // 32), dtype=torch.uint8, generator=gen)
            bias = torch.randn(n, generator=gen) if bias_on and name.endswith(bias_on) else None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear.from_quantized(q, s, z, b, 32, bias=bias))
    return model


def _groups(layers: int, attn: tuple[str, ...], mlp: tuple[str, ...]) -> list[tuple[str, ...]]:
    out = []
    for i in range(layers):
        if attn:
            out.append(tuple(f"model.layers.{i}.self_attn.{p}" for p in attn))
        if mlp:
            out.append(tuple(f"model.layers.{i}.mlp.{p}" for p in mlp))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_fused_siblings_give_the_same_logits(arch):
    model = _packed(arch, bias_on="k_proj")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    fused = fuse_packed_siblings(model, ids[:, :4])
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if arch == "phi3":  # q/k/v and gate/up are one linear each already: nothing shares an input
        assert fused == []
        return
    assert fused == _groups(2, ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, PackedSibling) and isinstance(attn.fused_q_proj_k_proj_v_proj, PackedSiblings)
    assert attn.k_proj.out_features == attn.k_proj.group.bounds[2] - attn.k_proj.group.bounds[1]
    # the weights live once, in the group (the state dict has no per-sibling copies)
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.linear.qweight" in keys
    assert not any(k.startswith("model.layers.0.self_attn.k_proj.") for k in keys)


def test_only_compatible_neighbours_are_fused():
    """k_proj at 3 bits (another format) splits q/k/v: v stays alone, q alone, gate/up still fuse."""
    model = _packed("llama", bits_of=lambda name: 3 if name.endswith("k_proj") else 4)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    fused = fuse_packed_siblings(model, ids)
    assert fused == _groups(2, (), ("gate_proj", "up_proj"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_a_sibling_called_with_another_input_computes_again():
    model = _packed("llama")
    fuse_packed_siblings(model, torch.randint(0, 128, (1, 4)))
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(3, 64), torch.randn(3, 64)
    q = attn.q_proj(x)
    k_other = attn.k_proj(other)  # not the input q saw: no stale reuse
    group = attn.fused_q_proj_k_proj_v_proj
    with torch.no_grad():
        full = group.linear(other)
    torch.testing.assert_close(k_other, full[:, group.bounds[1]:group.bounds[2]])
    torch.testing.assert_close(q, group.linear(x)[:, :group.bounds[1]])


def test_fused_model_traces_as_one_graph():
    """``torch.compile(fullgraph=True)`` takes the shared output (no graph break, no recompile)."""
    model = _packed("llama")
    ids = torch.randint(0, 128, (1, 6))
    fuse_packed_siblings(model, ids)
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 7])
def test_fused_siblings_on_the_gpu_kernels(tokens):
    """The Triton kernels (one-row GEMV at 1 token, tensor cores at 7) give the same logits fused."""
    model = _packed("llama").half().cuda()
    ids = torch.randint(0, 128, (1, tokens), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    assert fuse_packed_siblings(model, ids)
    with torch.no_grad():
        got = model(ids).logits.float()
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
