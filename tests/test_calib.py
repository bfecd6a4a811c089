"""Calibration statistics: soundness, content-addressed caching, no forward pass when warm."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import hpsearch.calib as calib
from hpsearch.calib import CalibConfig, StatsAccumulator, cache_root, calibration_for, calibration_key, capture
from hpsearch.manifest import Manifest
from hpsearch.plan import LayerPlan, Plan
from hpsearch.stages.base import StageContext
from hpsearch.stages.gptq import GPTQ
from hpsearch.stages.quantize import Quantize
from hpsearch.stages.rtn import RTN
from hpsearch.structure import structure_of


@pytest.fixture(scope="module")
def small(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "value", "(", ")", ":"]
    path = tmp_path_factory.mktemp("corpus") / "calib.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(20000)))
    return str(path)


@pytest.fixture(autouse=True)
def fresh_process_caches():
    calib._store.cache_clear()
    calib._quant_cache.cache_clear()
    yield


def _ctx(model, tokenizer, cache_dir: Path, corpus: str, **calib_overrides) -> StageContext:
    structure = structure_of(model)
    cfg = {"source": corpus, "n_samples": 4, "seq_len": 32, "seed": 0, "batch_size": 2, "cache_dir": str(cache_dir),
           "progress": False, **calib_overrides}
    return StageContext(structure, Manifest.for_structure("m", structure), tokenizer, torch.device("cpu"),
                        calib=cfg, source_model=model)


def _forward_counter(model) -> tuple[list[int], object]:
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_running_mean_hessian_matches_float64():
    torch.manual_seed(0)
    batches = [torch.randn(3, 17, 8) * 5 + 2 for _ in range(5)]
    acc = StatsAccumulator(8, torch.device("cpu"))
    for b in batches:
        acc.add_batch(b)
    X = torch.cat([b.reshape(-1, 8) for b in batches]).double()
    assert acc.n == X.shape[0]
    torch.testing.assert_close(acc.H.double(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.mean_abs.double(), X.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.max_abs.double(), X.abs().amax(0))


def test_capture_matches_inputs_and_aliases(small):
    names = [n for n, m in small.named_modules() if isinstance(m, torch.nn.Linear)]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [small.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).double())) for n in names]
    ids = torch.randint(0, 100, (4, 16))
    for i in range(0, 4, 2):
        small(input_ids=ids[i : i + 2], use_cache=False)
    for h in handles:
        h.remove()
    stats, aliases = capture(small, ids, names, batch_size=2, device=torch.device("cpu"))
    assert aliases["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert aliases["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        X = torch.cat(seen[name])
        torch.testing.assert_close(stats[name].hessian.double(), X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5)
        assert stats[name].n_tokens == 64


def test_keys_change_with_everything_they_depend_on(small, tokenizer, corpus, tmp_path):
    import copy

    base = CalibConfig(source=corpus, n_samples=4, seq_len=32)
    key, _ = calibration_key(small, base, tokenizer)
    assert calibration_key(small, CalibConfig(source=corpus, n_samples=4, seq_len=32, cache_dir="/x", batch_size=1),
                           tokenizer)[0] == key
    for changed in (dict(n_samples=5), dict(seq_len=33), dict(seed=1), dict(source="embedded:valid"),
                    dict(sequential=True)):
        cfg = CalibConfig(**{"source": corpus, "n_samples": 4, "seq_len": 32, **changed})
        assert calibration_key(small, cfg, tokenizer)[0] != key, changed
    other = copy.deepcopy(small)
    other.model.layers[1].mlp.down_proj.weight.data[3, 5] += 1e-3
    assert calibration_key(other, base, tokenizer)[0] != key
    edited = tmp_path / "c.txt"
    edited.write_text(Path(corpus).read_text())
    k1 = calibration_key(small, CalibConfig(source=str(edited)), tokenizer)[0]
    edited.write_text(Path(corpus).read_text() + " more")
    assert calibration_key(small, CalibConfig(source=str(edited)), tokenizer)[0] != k1


def test_warm_trial_runs_no_calibration_forward(small, tokenizer, corpus, tmp_path, monkeypatch):
    import copy

    plan_a = Plan({li.name: LayerPlan(bits=4, group_size=32, method="gptq") for li in structure_of(small).block_linears()})
    plan_b = Plan({n: LayerPlan(bits=3, group_size=32, method="gptq") for n in plan_a.layers})
    plan_c = Plan({n: LayerPlan(bits=4 if i % 2 else 3, group_size=32, method="gptq") for i, n in enumerate(plan_a.layers)})
    stage = Quantize(methods={"gptq": GPTQ(), "rtn": RTN()})
    calls, handle = _forward_counter(small)
    try:
        def trial(plan):
            ctx = _ctx(small, tokenizer, tmp_path, corpus)
            ctx.calibration = calibration_for(ctx, stage.requires(plan))
            model = copy.deepcopy(small)
            summary = stage.apply(model, plan, ctx)
            return model, summary

        trial(plan_a)
        trial(plan_b)
        cold_calls = calls[0]
        assert cold_calls == 2  # 4 samples / batch 2: one capture, then nothing
        model_c, summary = trial(plan_c)  # all choices made before, in other combinations
        assert calls[0] == cold_calls and summary["cached_by_method"]["gptq"] == len(plan_c.layers)

        # a new worker process: only the disk is warm; no forward and no GPTQ either
        calib._store.cache_clear()
        calib._quant_cache.cache_clear()

        def boom(*a, **k):
            raise AssertionError("GPTQ ran in a warm trial")

        monkeypatch.setattr("hpsearch.stages.gptq.gptq_quantize", boom)
        model_c2, _ = trial(plan_c)
        assert calls[0] == cold_calls
        for n in plan_c.layers:
            assert torch.equal(model_c.get_submodule(n).weight, model_c2.get_submodule(n).weight)
    finally:
        handle.remove()


def test_stale_entries_never_used(small, tokenizer, corpus, tmp_path):
    import copy
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    ctx = _ctx(small, tokenizer, tmp_path, corpus)
    calls, handle = _forward_counter(small)
    first = calibration_for(ctx, {"hessian"})
    assert calls[0] > 0
    handle.remove()
    # a changed model gets its own entry, computed on the changed model
    other = copy.deepcopy(small)
    other.model.layers[0].self_attn.o_proj.weight.data.mul_(2)
    calls2, handle2 = _forward_counter(other)
    second = calibration_for(_ctx(other, tokenizer, tmp_path, corpus), {"hessian"})
    handle2.remove()
    assert calls2[0] > 0 and second.key != first.key
    # a file under the right name whose metadata describes something else is recomputed, not read
    calib._store.cache_clear()
    path = tmp_path / "calib" / f"{first.key}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["hpsearch"])
    meta["describes"]["n_samples"] = 999
    name = "model.layers.0.self_attn.q_proj::hessian"
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(path), metadata={"hpsearch": json.dumps(meta)})
    calls3, handle3 = _forward_counter(small)
    third = calibration_for(ctx, {"hessian"})
    handle3.remove()
    assert calls3[0] > 0
    assert third.layer("model.layers.0.self_attn.q_proj").hessian.abs().sum() > 0


def test_quantized_weight_cache_keys_follow_options(small, tokenizer, corpus, tmp_path):
    import copy

    plan = Plan({li.name: LayerPlan(bits=4, group_size=32, method="gptq") for li in structure_of(small).block_linears()})
    results = []
    for gptq in (GPTQ(), GPTQ(percdamp=0.1), GPTQ()):
        stage = Quantize(methods={"gptq": gptq})
        ctx = _ctx(small, tokenizer, tmp_path, corpus)
        ctx.calibration = calibration_for(ctx, stage.requires(plan))
        results.append(stage.apply(copy.deepcopy(small), plan, ctx)["cached_by_method"]["gptq"])
    assert results == [0, 0, len(plan.layers)]
    # another calibration set: new statistics, new quantized weights
    stage = Quantize(methods={"gptq": GPTQ()})
    ctx = _ctx(small, tokenizer, tmp_path, corpus, seed=7)
    ctx.calibration = calibration_for(ctx, stage.requires(plan))
    assert stage.apply(copy.deepcopy(small), plan, ctx)["cached_by_method"]["gptq"] == 0


def test_sequential_mode_sees_quantized_inputs(small, tokenizer, corpus, tmp_path):
    import copy

    plan = Plan({li.name: LayerPlan(bits=2, group_size=32, method="gptq") for li in structure_of(small).block_linears()})
    stage = Quantize(methods={"gptq": GPTQ()})
    ctx = _ctx(small, tokenizer, tmp_path, corpus, sequential=True)
    ctx.calibration = calibration_for(ctx, stage.requires(plan))
    assert ctx.calibration.sequential
    model = copy.deepcopy(small)
    summary = stage.apply(model, plan, ctx)
    assert summary["cached_by_method"]["gptq"] == 0 and not (tmp_path / "quantized").exists()
    seq_h = ctx.calibration.layer("model.layers.1.self_attn.q_proj").hessian
    cached = calibration_for(_ctx(small, tokenizer, tmp_path, corpus), {"hessian"})
    h0 = cached.layer("model.layers.0.self_attn.q_proj").hessian
    torch.testing.assert_close(ctx.calibration.layer("model.layers.0.self_attn.q_proj").hessian, h0, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(seq_h, cached.layer("model.layers.1.self_attn.q_proj").hessian, rtol=1e-3, atol=1e-6)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HPSEARCH_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv("HPSEARCH_CACHE")
    assert cache_root() == Path("~/.cache/hpsearch").expanduser()
    from hpsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="calib.n_sample"):
        CalibConfig.from_mapping({"n_sample": 3})
    with pytest.raises(ConfigError, match="calib.seq_len"):
        CalibConfig.from_mapping({"seq_len": 0})


def test_baseline_logits_cached(small, tmp_path):
    ids = torch.randint(0, 100, (3, 16))
    calls, handle = _forward_counter(small)
    a = calib.baseline_logits(small, ids, calib_cfg={"cache_dir": str(tmp_path)}, batch_size=2)
    n = calls[0]
    b = calib.baseline_logits(small, ids, calib_cfg={"cache_dir": str(tmp_path)}, batch_size=2)
    handle.remove()
    assert n == 2 and calls[0] == n and torch.equal(a, b) and a.shape == (3, 16, small.config.vocab_size)


def test_kl_objective_zero_for_itself_positive_when_compressed(small, tokenizer, tmp_path, corpus):
    import copy

    from hpsearch.objectives.base import EvalContext
    from hpsearch.objectives.kl import KL

    structure = structure_of(small)
    kl = KL(source=corpus, seq_len=32, max_tokens=64, batch_size=2, cache_dir=str(tmp_path))
    ectx = EvalContext(structure, Manifest.for_structure("m", structure), tokenizer, torch.device("cpu"), {},
                       source_model=small)
    assert abs(kl.evaluate(small, ectx)) < 1e-3
    q = copy.deepcopy(small)
    stage = Quantize(methods={"rtn": RTN()})
    stage.apply(q, Plan({li.name: LayerPlan(bits=2, group_size=32) for li in structure.block_linears()}),
                StageContext(structure, Manifest.for_structure("m", structure), tokenizer, torch.device("cpu")))
    assert kl.evaluate(q, ectx) > 1e-3
