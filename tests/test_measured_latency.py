"""Measured latency: formats per layer, the labelled roofline fallback on CPU, and (GPU) timings."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import small_config
from hpsearch.manifest import Manifest
from hpsearch.objectives.base import EvalContext
from hpsearch.objectives.latency import decode_seconds
from hpsearch.objectives.measured_latency import LayerTimer, MeasuredLatency, layer_format
from hpsearch.objectives.profiles import get_profile
from hpsearch.structure import structure_from_config


@pytest.mark.parametrize("record,fmt", [
    ({"bits": 16, "in_features": 64}, "dense"),
    ({"bits": 4, "group_size": 128, "in_features": 256}, "packed4g128"),
    ({"bits": 3, "group_size": None, "in_features": 96}, "packed3g96"),
    ({"bits": 16, "pattern": "2:4", "sparsity": 0.5, "in_features": 64}, "semi24"),
    ({"bits": 16, "pattern": "unstructured", "sparsity": 0.5, "in_features": 64}, "dense"),
])
def test_layer_format(record, fmt):
    assert layer_format(record) == fmt


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_without_cuda_it_is_the_labelled_roofline():
    s = structure_from_config(small_config("llama", 256))
    manifest = Manifest.for_structure("x", s)
    ctx = EvalContext(s, manifest, None, torch.device("cpu"), {})
    value = MeasuredLatency(profile="a100", context=64).evaluate(None, ctx)
    assert value == pytest.approx(decode_seconds(s, manifest, get_profile("a100"), 1, 64) * 1e3)
    assert ctx.attrs["latency_source"].startswith("roofline:a100")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_timings_are_cached_and_low_bits_are_faster(tmp_path):
    timer = LayerTimer(tmp_path / "lat.json", inner=10, repeats=5)
    dense = timer.layer_us(11008, 4096, "dense", 1)
    packed = timer.layer_us(11008, 4096, "packed4g128", 1)
    packed3 = timer.layer_us(11008, 4096, "packed3g128", 1)
    assert 0 < packed < dense and 0 < packed3 < dense
    # packed timings are keyed by the kernels that ran them: another build measures again
    assert all("@" in key for key in timer.times if "packed" in key)
    again = LayerTimer(tmp_path / "lat.json")
    assert again.layer_us(11008, 4096, "dense", 1) == dense  # from the cache file, not re-measured


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_grid_and_prefill_are_the_mean_of_their_rooflines():
    from hpsearch.objectives.latency import prefill_seconds

    s = structure_from_config(small_config("llama", 256))
    manifest = Manifest.for_structure("x", s)
    prof = get_profile("h100")
    ctx = EvalContext(s, manifest, None, torch.device("cpu"), {})
    value = MeasuredLatency(batch_size=[1, 4], context=[64, 128]).evaluate(None, ctx)
    expected = [decode_seconds(s, manifest, prof, b, c) * 1e3 for b in (1, 4) for c in (64, 128)]
    assert value == pytest.approx(sum(expected) / 4)
    assert set(ctx.attrs["latency_grid_ms"]) == {"decode b1 c64", "decode b1 c128", "decode b4 c64", "decode b4 c128"}
    ctx = EvalContext(s, manifest, None, torch.device("cpu"), {})
    value = MeasuredLatency(phase="prefill", prefill_tokens=32, batch_size=2).evaluate(None, ctx)
    assert value == pytest.approx(prefill_seconds(s, manifest, prof, 2, 32) * 1e3)


@pytest.mark.parametrize("kwargs,key", [
    ({"phase": "train"}, "phase"),
    ({"phase": "prefill"}, "prefill_tokens"),
    ({"batch_size": [1, 0]}, "batch_size"),
    ({"context": -1}, "context"),
])
def test_bad_settings_name_their_key(kwargs, key):
    from hpsearch.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        MeasuredLatency(**kwargs)


def test_a_bad_kernel_switch_is_refused_before_the_study(monkeypatch):
    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "on")
    with pytest.raises(ValueError, match="HPSEARCH_FEW_ROWS must be 0 .* got 'on'"):
        MeasuredLatency()


def test_rewound_static_cache_replays_the_same_decode_step():
    """Replaying a decode step (as a CUDA graph does) must keep writing the same cache position."""
    from transformers import AutoModelForCausalLM, StaticCache

    from hpsearch.objectives.measured_latency import rewind_static_cache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config("llama", 256)).eval()
    context = 8
    cache = StaticCache(config=model.config, max_cache_len=context + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1))
    with torch.no_grad():
        model(input_ids=ids[:, :context], past_key_values=cache, cache_position=torch.arange(context), use_cache=True)
        outs = []
        for _ in range(4):  # without the rewind the second step writes past the end of the cache
            rewind_static_cache(cache, context)
            outs.append(model(input_ids=ids[:, context:], past_key_values=cache,
                              cache_position=torch.tensor([context]), use_cache=True).logits)
        full = model(input_ids=ids).logits[:, -1:]
    for out in outs:
        torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)


def _mixed_manifest_and_timer(monkeypatch):
    """A 2-block Llama whose block linears are 4-bit but block 1's k_proj (3-bit), a timer that records
    its calls, and a packed copy's measured rest: 100 us, each gated MLP saving 3, each fused q/k/v 5."""
    from transformers import AutoModelForCausalLM

    from hpsearch.objectives import measured_latency as ml
    from hpsearch.structure import structure_of

    model = AutoModelForCausalLM.from_config(small_config("llama", 128)).eval()
    s = structure_of(model)
    manifest = Manifest.for_structure("x", s)
    for li in s.block_linears():
        manifest.update_layer(li.name, bits=4, group_size=32)
    manifest.update_layer("model.layers.1.self_attn.k_proj", bits=3, group_size=32)  # breaks q/k/v of block 1
    calls = []

    class Timer:
        device_name = "fake"

        def layer_us(self, n, k, fmt, m, dtype):
            calls.append((n, k, fmt, m))
            return 1.0

    entry = {"plain_us": 100.0, "how": "fake", "gated": ["model.layers.0.mlp", "model.layers.1.mlp"],
             "gated_saving_us": 3.0, "rope": ["model.layers.0.self_attn", "model.layers.1.self_attn"],
             "rope_saving_us": 5.0}
    monkeypatch.setattr(ml, "_fused_remainder", lambda *a, **k: entry)
    monkeypatch.setattr(ml, "_remainder_us", lambda *a, **k: (50.0, "dense fake"))
    objective = MeasuredLatency(context=64)
    objective._timer = Timer()
    return model, s, manifest, calls, objective


def test_packed_siblings_are_timed_as_one_launch(monkeypatch):
    """q/k/v and gate/up of one packed format are timed as the one layer they run as; a sibling of
    another format, and dense layers, are timed alone."""
    model, s, manifest, calls, objective = _mixed_manifest_and_timer(monkeypatch)
    ctx = EvalContext(s, manifest, None, torch.device("cpu"), {})
    ms, linears, remainder, how = objective._measure_ms(ctx, model, 1, 64, 1)
    calls = [c[:3] for c in calls]
    q, k = s.linear("model.layers.0.self_attn.q_proj"), s.linear("model.layers.0.self_attn.k_proj")
    gate = s.linear("model.layers.0.mlp.gate_proj")
    assert calls.count((q.out_features + 2 * k.out_features, q.in_features, "packed4g32")) == 1  # block 0's q/k/v
    assert calls.count((2 * gate.out_features, gate.in_features, "packed4g32")) == 2  # gate/up of both blocks
    # block 1: k alone at 3 bits, q and v alone at 4; q has o_proj's shape (two of those)
    assert (k.out_features, k.in_features, "packed3g32") in calls
    assert calls.count((k.out_features, k.in_features, "packed4g32")) == 1
    assert calls.count((q.out_features, q.in_features, "packed4g32")) == 3
    # every linear timed once, a fused run as one: 15 linears, block 0's q/k/v and both gate/ups fused
    assert len(calls) == len(s.linears) - 2 - 1 - 1 and linears == len(calls)
    # the rest: the packed copy's, less both gated MLPs and block 0's q/k/v (block 1's is not one run)
    assert remainder == 100.0 - 2 * 3.0 - 5.0 and ms == (linears + remainder) / 1e3
    assert "2 gated MLPs, 1 rotary/cache q/k/v" in how


def test_a_packed_copy_that_cannot_be_timed_falls_back_to_the_float16_rest(monkeypatch):
    from hpsearch.objectives import measured_latency as ml

    model, s, manifest, _calls, objective = _mixed_manifest_and_timer(monkeypatch)

    tries = []

    def broken(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ml, "_fused_remainder", broken)
    ctx = EvalContext(s, manifest, None, torch.device("cpu"), {})
    for _ in range(2):  # tried once a study, not once a trial
        _, _, remainder, how = objective._measure_ms(ctx, model, 1, 64, 1)
        assert remainder == 50.0 and how == "dense fake (a packed copy could not be timed: RuntimeError: out of memory)"
    assert len(tries) == 1


@pytest.mark.parametrize(("batch", "bits"), [(4, 4), (1, 16), (1, 8)])
def test_packed_passes_take_the_packed_rest_and_one_row_decode_its_savings(monkeypatch, batch, bits):
    """A float16 model takes the dense model's rest. Packed passes take the packed copy's plain rest;
    several rows run no fused epilogue, and 8-bit siblings run as one launch whose epilogues take the
    unfused steps: no saving is taken off for them."""
    model, s, manifest, _calls, objective = _mixed_manifest_and_timer(monkeypatch)
    for li in s.block_linears():
        manifest.update_layer(li.name, bits=bits, group_size=32)
    ctx = EvalContext(s, manifest, None, torch.device("cpu"), {})
    _, _, remainder, how = objective._measure_ms(ctx, model, batch, 64, 1)
    if bits == 16:
        assert (remainder, how) == (50.0, "dense fake")
    else:
        assert remainder == 100.0 and "0 gated MLPs, 0 rotary/cache q/k/v" in how


def test_siblings_default_to_none_when_the_forward_pass_fails():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, input_ids):
            raise RuntimeError("needs more than ids")

    assert MeasuredLatency(context=64)._sibling_groups(Broken(), 16) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_rest_is_measured_on_a_packed_copy(tmp_path):
    from transformers import AutoModelForCausalLM

    from hpsearch.objectives.measured_latency import _fused_remainder
    from hpsearch.structure import structure_of

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(small_config("llama", 256)).eval()
    s = structure_of(base)
    timer = LayerTimer(tmp_path / "lat.json", inner=5, repeats=5)
    entry = _fused_remainder(lambda: copy.deepcopy(base), s, timer, 1, 32, 1, torch.float16, lambda fmt: 0.0)
    blocks = len({li.block for li in s.block_linears()})
    assert len(entry["gated"]) == len(entry["rope"]) == blocks  # a Llama takes both fusions
    assert entry["plain_us"] > 0 and entry["plain_step_us"] == entry["plain_us"]  # no linears subtracted here
    rows4 = _fused_remainder(lambda: copy.deepcopy(base), s, timer, 4, 32, 1, torch.float16, lambda fmt: 0.0)
    assert rows4["gated"] == rows4["rope"] == [] and rows4["plain_us"] > 0  # four rows: no epilogue runs
    cached = [v for k, v in LayerTimer(tmp_path / "lat.json").times.items() if "fused-remainder" in k]
    assert cached == [entry, rows4]  # measured once each, then read from the timing cache


def test_the_packed_copy_is_packed_from_its_own_weights():
    """The copy whose rest is measured computes what the model does (so the fusions' checks judge a
    model, not noise): every block linear packed at 4 bits by round-to-nearest of its weights."""
    from transformers import AutoModelForCausalLM

    from hpsearch.kernels import PackedLinear
    from hpsearch.methods.grid import quantize_rtn
    from hpsearch.objectives.measured_latency import _pack_rtn
    from hpsearch.structure import structure_of

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config("llama", 128)).eval()
    s = structure_of(model)
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    _pack_rtn(model, {li.name for li in s.block_linears()}, 4, 128)
    layers = [model.get_submodule(li.name) for li in s.block_linears()]
    assert all(isinstance(m, PackedLinear) and m.bits == 4 for m in layers)
    assert isinstance(model.lm_head, torch.nn.Linear)  # only the block linears
    packed = model.model.layers[0].mlp.down_proj
    expected = quantize_rtn(down, 4, packed.group_size, sym=False).dequantize(torch.float32)
    x = torch.randn(2, down.shape[1])
    torch.testing.assert_close(packed(x), x @ expected.T, rtol=1e-4, atol=1e-4)
