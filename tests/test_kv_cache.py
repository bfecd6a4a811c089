"""Quantized KV cache: the grid against float64, the two evaluation paths against each other and
against the model's own cache, memory accounting against what the cache really stores."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import small_config
from hpsearch.errors import ConfigError
from hpsearch.kvcache import QuantizedKVCache, chunk_logits, install, installed
from hpsearch.manifest import Manifest
from hpsearch.methods.kv_quant import KVFormat, exact_masks, fake_quantize_kv, quantize_kv, token_bytes
from hpsearch.objectives.memory import kv_cache_bytes
from hpsearch.plan import LayerPlan, Plan
from hpsearch.stages.base import StageContext
from hpsearch.stages.kv_cache import KVCache
from hpsearch.structure import structure_of

VOCAB = 256


def _model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(small_config(arch, VOCAB)).eval().requires_grad_(False)


def _ids(batch: int = 2, length: int = 80, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _chunked(model, ids, chunk, cache=None) -> torch.Tensor:
    return torch.cat([logits for _, logits in chunk_logits(model, ids, chunk, cache)], dim=1)


def _reference(x: torch.Tensor, bits: int, group: int, axis: str, sym: bool) -> torch.Tensor:
    """Textbook min-max RTN in float64, one group at a time (float16 scale and offset)."""
    x = x.double()
    rows = x.transpose(-1, -2) if axis == "channel" else x
    flat = rows.reshape(-1, rows.shape[-1])
    out = torch.empty_like(flat)
    maxq = 2**bits - 1
    for r in range(flat.shape[0]):
        for start in range(0, flat.shape[1], group):
            g = flat[r, start:start + group]
            if sym:
                scale = max(float(torch.tensor(2 * g.abs().max().item() / maxq).half()), 2.0**-24)
                zero = (maxq + 1) // 2
                out[r, start:start + group] = (torch.clamp(torch.round(g / scale) + zero, 0, maxq) - zero) * scale
            else:
                scale = max(float(torch.tensor((g.max() - g.min()).item() / maxq).half()), 2.0**-24)
                low = float(torch.tensor(g.min().item()).half())
                out[r, start:start + group] = torch.clamp(torch.round((g - low) / scale), 0, maxq) * scale + low
    out = out.reshape(rows.shape)
    return out.transpose(-1, -2) if axis == "channel" else out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("sym", [False, True])
def test_quantize_matches_float64_reference(bits, axis, sym):
    torch.manual_seed(bits)
    # channels of different ranges, some all of one sign (KIVI's outlier channels)
    x = torch.randn(2, 3, 16, 8) * torch.rand(1, 3, 1, 8) * 4 + torch.tensor([0, 0, 9, -7, 0, 0, 0, 20.0])
    group = 4 if axis == "channel" else 8
    got = fake_quantize_kv(x, bits, group, axis, sym).double()
    ref = _reference(x, bits, group, axis, sym)
    qkv = quantize_kv(x, bits, group, axis, sym)
    assert qkv.q.dtype == torch.uint8 and int(qkv.q.max()) <= 2**bits - 1 and qkv.tokens == 16
    # float32 vs float64 may flip a code exactly at a .5 boundary: one step at most, and rarely
    diff = (got - ref).abs()
    assert (diff <= 1e-5 * (1 + ref.abs())).double().mean() > 0.99
    assert diff.max() <= qkv.scale.float().max() + 1e-6


def test_channel_axis_leaves_partial_group_exact():
    x = torch.randn(1, 2, 10, 8)
    y = fake_quantize_kv(x, 2, 4, "channel", False)
    assert torch.equal(y[..., 8:, :], x[..., 8:, :]) and not torch.equal(y[..., :8, :], x[..., :8, :])


def test_exact_masks_follow_window_and_groups():
    fmt = KVFormat(k_bits=2, v_bits=2, group_size=4, layout="kivi", residual=3)
    exact_k, exact_v = exact_masks(12, 12, fmt, chunk=1)
    # query 10 saw a cache of 10 tokens: values 7.. exact; keys of group [4, 8) not complete below 7
    assert exact_v[10].nonzero().min().item() == 7
    assert exact_k[10].nonzero().min().item() == 4
    # query 11: window starts at 8, the key group [4, 8) is complete below it
    assert exact_k[11].nonzero().min().item() == 8
    # chunks of 4: queries 8..11 all saw 8 tokens
    _, exact_v = exact_masks(12, 12, fmt, chunk=4)
    assert all(exact_v[i].nonzero().min().item() == 5 for i in range(8, 12))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_16bit_cache_equals_models_own_cache_exactly(arch):
    model, ids = _model(arch), _ids()
    ours = _chunked(model, ids, 16, QuantizedKVCache([KVFormat()] * 2))
    theirs = _chunked(model, ids, 16, DynamicCache())
    assert torch.equal(ours, theirs)
    # a 16-bit stage installs nothing: the model's own attention, bit for bit
    before = model(input_ids=ids).logits
    _stage_apply(model, KVCache(k_bits=16, v_bits=16))
    assert not installed(model) and torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])  # mistral: 1 KV head (GQA 4:1)
@pytest.mark.parametrize("layout,k_bits,v_bits", [("kivi", 2, 2), ("per_token", 3, 4), ("kivi", 4, 16)])
@pytest.mark.parametrize("chunk", [1, 8])
def test_single_pass_and_chunked_cache_agree(arch, layout, k_bits, v_bits, chunk):
    model, ids = _model(arch), _ids(length=64)
    exact = model(input_ids=ids).logits
    fmt = KVFormat(k_bits=k_bits, v_bits=v_bits, group_size=8, layout=layout, residual=12)
    install(model, {0: fmt, 1: fmt}, chunk=chunk)
    single = model(input_ids=ids).logits
    cached = _chunked(model, ids, chunk)
    gap = (single - cached).abs().max().item()
    assert gap < 1e-5
    assert (single - exact).abs().max().item() > max(30 * gap, 1e-5)  # quantization is really read


def test_generate_reads_quantized_past_like_token_by_token_decoding():
    model = _model("llama")
    prompt = _ids(batch=1, length=24)
    install(model, {i: KVFormat(k_bits=2, v_bits=2, group_size=4, residual=4) for i in range(2)}, chunk=1)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cache, ids = QuantizedKVCache.for_model(model), prompt
    logits = _chunked(model, prompt, 1, cache)
    for _ in range(8):
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        logits = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert torch.equal(out, ids)


def test_error_shrinks_with_bits():
    model, ids = _model("llama"), _ids(length=64)
    exact = model(input_ids=ids).logits
    errors = []
    for bits in (2, 4, 8):
        install(model, {i: KVFormat(k_bits=bits, v_bits=bits, group_size=8, residual=8) for i in range(2)})
        errors.append((model(input_ids=ids).logits - exact).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] > 0


def _stage_apply(model, stage: KVCache, plan: Plan | None = None) -> Manifest:
    structure = structure_of(model)
    manifest = Manifest.for_structure("m", structure)
    stage.apply(model, plan or Plan(), StageContext(structure, manifest, None, torch.device("cpu")))
    return manifest


def test_stage_reads_global_and_per_layer_bits():
    model = _model("llama")
    structure = structure_of(model)
    k_proj = next(li.name for li in structure.linears if li.block == 1 and li.kind.endswith("k_proj"))
    plan = Plan(layers={k_proj: LayerPlan(extra=(("x_kv_k_bits", 8),))},
                model={"kv_k_bits": 4, "kv_v_bits": 2, "kv_v_bits.1": 3, "kv_residual": 16})
    manifest = _stage_apply(model, KVCache(), plan)
    kv = manifest.model["kv_cache"]
    assert kv["per_layer"] == [{"k_bits": 4, "v_bits": 2}, {"k_bits": 8, "v_bits": 3}]
    assert kv["k_bits"] == "mixed" and kv["residual"] == 16
    states = installed(model)
    assert states[1].fmt.k_bits == 8 and states[0].fmt.residual == 16
    with pytest.raises(ConfigError, match="kv_k_bits|k_bits"):
        _stage_apply(_model("llama"), KVCache(), Plan(model={"kv_k_bits": 5}))
    with pytest.raises(ConfigError, match="layout"):
        KVCache(layout="per_head")


def test_bytes_per_token_known_shapes():
    # Llama-2-7B geometry: 32 layers, 32 KV heads of 128; KIVI-2, G=32, float16 scale + offset
    fmt = KVFormat(k_bits=2, v_bits=2, group_size=32, layout="kivi", residual=128)
    b = token_bytes(fmt, 32, 128)
    values = 32 * 128
    assert b["exact"] == 2 * values * 2
    k = values * 2 / 8 + values / 32 * 4   # float16 scale and offset per channel per 32 tokens
    v = values * 2 / 8 + values / 32 * 4   # one pair per 32 channels of a token
    assert b["quantized"] == k + v and b["key_pending"] == values * 2 - k
    sym8 = token_bytes(KVFormat(k_bits=8, v_bits=16, group_size=128, layout="per_token", sym=True), 32, 128)
    assert sym8["quantized"] == values + 32 * 2 + values * 2 and sym8["key_pending"] == 0


@pytest.mark.parametrize("layout,k_bits,v_bits", [("kivi", 2, 4), ("per_token", 4, 8), ("kivi", 8, 16)])
def test_memory_formula_equals_bytes_the_cache_stores(layout, k_bits, v_bits):
    model = _model("llama")
    stage = KVCache(k_bits=k_bits, v_bits=v_bits, group_size=8, layout=layout, residual=16, dtype_bytes=4)
    manifest = _stage_apply(model, stage)
    structure = structure_of(model)
    for length in (16, 45, 64):
        cache = QuantizedKVCache.for_model(model)
        _chunked(model, _ids(batch=3, length=length), 7, cache)
        cache.compact()
        assert cache.stored_bytes() == kv_cache_bytes(structure, manifest.model["kv_cache"], 3, length)
    # and it is less than the 16-bit cache at the same shape
    assert kv_cache_bytes(structure, manifest.model["kv_cache"], 3, 64) < 3 * 64 * 2 * 2 * 2 * 16 * 4
