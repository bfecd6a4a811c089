"""LoRA recovery: the compressed base stays bit-identical, only adapters learn, runs reproduce
under a seed, the disabled branch adds nothing, packed layers take adapters, objectives count them."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import small_config
from hpsearch.objectives.latency import _linear_flops_per_token
from hpsearch.objectives.memory import weight_bytes
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.manifest import Manifest
from hpsearch.methods.lora import adapter_ranks, distillation_loss, lr_factor, text_windows
from hpsearch.plan import LayerPlan, Plan
from hpsearch.stages.base import StageContext
from hpsearch.stages.lora import LoRARecovery
from hpsearch.stages.quantize import Quantize
from hpsearch.stages.rtn import RTN
from hpsearch.structure import structure_of

FAST = {"loss": "lm", "steps": 4, "batch_size": 2, "seq_len": 32, "time_budget_s": None, "progress": False,
        "source": "embedded:valid", "lr": 5e-3}


@pytest.fixture(scope="module")
def pristine(tokenizer):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(small_config("llama", len(tokenizer))).eval()
    model.requires_grad_(False)
    return model


def _compressed(pristine, tokenizer, bits=3, seed=0, **model_plan):
    """A trial's copy of the model, RTN-quantized at ``bits`` (the up projections left in 16 bits
    and magnitude-pruned 50%), with its context."""
    model = copy.deepcopy(pristine)
    structure = structure_of(model)
    manifest = Manifest.for_structure("tiny", structure)
    ctx = StageContext(structure, manifest, tokenizer, torch.device("cpu"), seed=seed)
    layers = {li.name: LayerPlan(bits=16 if li.kind == "mlp.up_proj" else bits, group_size=32)
              for li in structure.block_linears()}
    plan = Plan(layers=layers, model=dict(model_plan))
    Quantize(methods={"rtn": RTN()}).apply(model, plan, ctx)
    for li in structure.block_linears():
        if li.kind == "mlp.up_proj":  # a pruning mask: the smallest half of the weights at zero
            w = model.get_submodule(li.name).weight.data
            w[w.abs() < w.abs().median()] = 0
            manifest.update_layer(li.name, sparsity=0.5, pattern="unstructured")
    return model, plan, ctx


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not an adapter, under its pre-LoRA name."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


# -- pure functions ---------------------------------------------------------------------------
@pytest.mark.parametrize("layer_ranks, model_plan, default, expected", [
    ({}, {}, 16, {"a": 16, "b": 16}),                      # the stage default
    ({}, {"lora_rank": 8}, 16, {"a": 8, "b": 8}),           # model-wide plan value wins
    ({"a": 4}, {"lora_rank": 8}, 16, {"a": 4, "b": 8}),     # a layer's own rank wins
    ({"a": 4}, {"lora_rank": 0}, 16, {"a": 4}),             # per-layer search: zeros stay zeros
    ({}, {"lora_rank": 0}, 16, {}),
])
def test_adapter_ranks(layer_ranks, model_plan, default, expected):
    from hpsearch.structure import LinearInfo

    linears = [LinearInfo(n, 0, n, 8, 8, False) for n in ("a", "b")]
    plan = Plan(layers={n: LayerPlan(lora_rank=r) for n, r in layer_ranks.items()}, model=model_plan)
    assert adapter_ranks(plan, linears, default) == expected


def test_lr_factor_warms_up_then_decays():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:])) and f[-1] < 0.01


def test_text_windows_are_seeded_blocks(tokenizer):
    text = "def f(x):\n    return x + 1\n" * 200

    def encode(chunks):
        return tokenizer(chunks, add_special_tokens=False)["input_ids"]

    a = text_windows(text, encode, 5, 16, torch.Generator().manual_seed(1))
    b = text_windows(text, encode, 5, 16, torch.Generator().manual_seed(1))
    assert a.shape == (5, 16) and torch.equal(a, b)


# -- the stage --------------------------------------------------------------------------------
def test_base_bit_identical_and_only_adapters_change(pristine, tokenizer):
    model, plan, ctx = _compressed(pristine, tokenizer)
    before = _base_state(model)
    codes = {n: qw.q.clone() for n, qw in ctx.artifacts["quantized"].items()}
    summary = LoRARecovery(rank=8, adapter_dtype="float32", **FAST).apply(model, plan, ctx)
    after = _base_state(model)
    assert before.keys() == after.keys()
    for k in before:  # quantized values and pruning masks exactly as compressed
        assert torch.equal(before[k], after[k]), k
    for n, qw in ctx.artifacts["quantized"].items():
        assert torch.equal(codes[n], qw.q)
        assert torch.equal(model.get_submodule(n).base_layer.weight, qw.dequantize(torch.float32))
    adapters = _adapter_state(model)
    assert adapters and all(torch.count_nonzero(v) > 0 for k, v in adapters.items() if "lora_B" in k)
    assert summary["layers"] == 14 and summary["steps"] == 4 and summary["params"] == sum(v.numel() for v in adapters.values())
    assert not any(p.requires_grad for p in model.parameters())
    # the trial keeps evaluating the same object, with the arguments the objectives pass
    ids = torch.randint(0, 100, (1, 8))
    assert model(input_ids=ids, use_cache=False).logits.shape == (1, 8, len(tokenizer))


def test_recovery_is_reproducible_under_a_seed(pristine, tokenizer):
    runs = []
    for _ in range(2):
        model, plan, ctx = _compressed(pristine, tokenizer, seed=3)
        torch.manual_seed(123 + len(runs))  # the caller's RNG state must not matter
        LoRARecovery(rank=4, dropout=0.1, **FAST).apply(model, plan, ctx)
        runs.append((_adapter_state(model), ctx.artifacts["lora"]["loss_last"]))
    (a, la), (b, lb) = runs
    assert la == lb and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, plan, ctx = _compressed(pristine, tokenizer, seed=4)
    LoRARecovery(rank=4, dropout=0.1, **FAST).apply(other, plan, ctx)
    assert not all(torch.equal(a[k], v) for k, v in _adapter_state(other).items())


@pytest.mark.parametrize("model_plan, stage_args", [({"lora": False, "lora_rank": 16}, {}), ({"lora_rank": 0}, {}),
                                                     ({}, {"enabled": False})])
def test_disabled_branch_adds_no_parameters(pristine, tokenizer, model_plan, stage_args):
    model, plan, ctx = _compressed(pristine, tokenizer, **model_plan)
    names = [n for n, _ in model.named_parameters()]
    before = _base_state(model)
    out = LoRARecovery(**{**FAST, **stage_args}).apply(model, plan, ctx)
    assert out == {"enabled": False} and [n for n, _ in model.named_parameters()] == names
    assert all(torch.equal(before[k], v) for k, v in _base_state(model).items())
    assert "lora_adapters" not in ctx.manifest.model.get("extra_bytes", {})
    assert all(r["lora_rank"] == 0 for r in ctx.manifest.layers.values())


def test_objectives_count_adapters(pristine, tokenizer):
    model, plan, ctx = _compressed(pristine, tokenizer, lora_rank=8)
    bytes_before = weight_bytes(ctx.structure, ctx.manifest)
    flops_before = _linear_flops_per_token(ctx.structure, ctx.manifest)
    LoRARecovery(**{**FAST, "steps": 1}).apply(model, plan, ctx)
    expected = sum(8 * (li.in_features + li.out_features) for li in ctx.structure.block_linears())
    assert ctx.manifest.model["extra_bytes"]["lora_adapters"] == 2 * expected  # float16 adapters
    assert weight_bytes(ctx.structure, ctx.manifest) - bytes_before == 2 * expected
    assert _linear_flops_per_token(ctx.structure, ctx.manifest) - flops_before == pytest.approx(2 * expected)
    assert {r["lora_rank"] for n, r in ctx.manifest.layers.items() if ".layers." in n} == {8}
    assert all(p.dtype == torch.float16 for n, p in model.named_parameters() if "lora_" in n)


def test_merge_folds_only_dense_unquantized_layers(pristine, tokenizer):
    model, plan, ctx = _compressed(pristine, tokenizer)
    for li in ctx.structure.block_linears():  # make up_proj dense 16-bit: the one mergeable kind
        if li.kind == "mlp.up_proj":
            ctx.manifest.update_layer(li.name, sparsity=0.0)
    unmerged_model, _, uctx = _compressed(pristine, tokenizer)
    for li in uctx.structure.block_linears():
        if li.kind == "mlp.up_proj":
            uctx.manifest.update_layer(li.name, sparsity=0.0)
    LoRARecovery(rank=4, adapter_dtype="float32", merge=True, **FAST).apply(model, plan, ctx)
    LoRARecovery(rank=4, adapter_dtype="float32", merge=False, **FAST).apply(unmerged_model, plan, uctx)
    merged = {n for n, r in ctx.manifest.layers.items() if r.get("lora_merged")}
    assert merged == {li.name for li in ctx.structure.block_linears() if li.kind == "mlp.up_proj"}
    assert all(type(model.get_submodule(n)) is nn.Linear for n in merged)
    ids = torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(model(input_ids=ids).logits, unmerged_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    per_layer = {n: 4 * (r["in_features"] + r["out_features"]) for n, r in ctx.manifest.layers.items() if ".layers." in n}
    assert ctx.manifest.model["extra_bytes"]["lora_adapters"] == 4 * sum(v for n, v in per_layer.items() if n not in merged)


def test_distillation_from_the_uncompressed_model(pristine, tokenizer, tmp_path):
    model, plan, ctx = _compressed(pristine, tokenizer)
    with pytest.raises(ConfigError, match="kd needs"):
        LoRARecovery(**{**FAST, "loss": "kd"}).apply(model, plan, ctx)
    # A damage that rank-4 adapters can undo: a rank-1 perturbation of every down projection.
    model = copy.deepcopy(pristine)
    structure = structure_of(model)
    ctx = StageContext(structure, Manifest.for_structure("tiny", structure), tokenizer, torch.device("cpu"),
                       source_model=pristine)
    gen = torch.Generator().manual_seed(0)
    for li in structure.block_linears():
        if li.kind == "mlp.down_proj":
            w = model.get_submodule(li.name).weight.data
            w += 0.05 * torch.randn(w.shape[0], 1, generator=gen) @ torch.randn(1, w.shape[1], generator=gen)
    text = "def main(argv):\n    return parse(argv)\n"
    (tmp_path / "train.txt").write_text(text * 400)
    ids = torch.tensor(tokenizer(text * 8)["input_ids"][:64])[None]

    def kl() -> float:
        with torch.no_grad():
            return float(distillation_loss(model(input_ids=ids).logits, pristine(input_ids=ids).logits))

    before = kl()
    stage = LoRARecovery(rank=4, **{**FAST, "loss": "kd", "steps": 16, "lr": 3e-3, "source": str(tmp_path / "train.txt")})
    summary = stage.apply(model, Plan(), ctx)
    assert summary["loss"] == "kd" and kl() < 0.7 * before  # closer to the uncompressed model
    logits = torch.randn(2, 5, 11)
    assert float(distillation_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(2, 5, 11))) > 0


def test_config_errors():
    with pytest.raises(ConfigError, match="held-out"):
        LoRARecovery(source="embedded:test")
    with pytest.raises(ConfigError, match="base"):
        LoRARecovery(base="int4")
    with pytest.raises(ConfigError, match="loss"):
        LoRARecovery(loss="mse")
    with pytest.raises(ConfigError, match="adapter_dtype"):
        LoRARecovery(adapter_dtype="int8")


def test_nf4_base_on_cpu_keeps_the_compressed_base(pristine, tokenizer):
    model, plan, ctx = _compressed(pristine, tokenizer)
    before = _base_state(model)
    summary = LoRARecovery(base="nf4", **{**FAST, "steps": 1}).apply(model, plan, ctx)
    assert summary["base"].startswith("compressed")
    assert all(torch.equal(before[k], v) for k, v in _base_state(model).items())


# -- packed layers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels():
    return pytest.importorskip("hpsearch.kernels")


def _pack_layers(kernels, model: nn.Module, ctx: StageContext, kinds: tuple[str, ...]) -> list[str]:
    names = []
    for li in ctx.structure.block_linears():
        if li.kind not in kinds:
            continue
        qw = ctx.artifacts["quantized"][li.name]
        packed = kernels.PackedLinear.from_quantized(qw.q, qw.scale, qw.zero, qw.bits, qw.group_size)
        parent, _, child = li.name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
        names.append(li.name)
    return names


def test_packed_linear_takes_adapters_and_stays_packed(pristine, tokenizer, kernels):
    model, plan, ctx = _compressed(pristine, tokenizer)
    names = _pack_layers(kernels, model, ctx, ("self_attn.q_proj", "mlp.down_proj"))
    buffers = {n: [b.clone() for b in model.get_submodule(n).buffers()] for n in names}
    summary = LoRARecovery(rank=4, **FAST).apply(model, plan, ctx)
    assert summary["packed_registered"] and summary["layers"] == 14
    for n in names:
        layer = model.get_submodule(n)
        assert type(layer).__name__ == "PackedLoraLinear" and isinstance(layer.base_layer, kernels.PackedLinear)
        assert all(torch.equal(a, b) for a, b in zip(buffers[n], layer.base_layer.buffers()))
        assert torch.count_nonzero(layer.lora_B["default"].weight) > 0  # it learned through the packed base


def test_packed_base_input_gradient_matches_dense(kernels):
    from hpsearch.methods.lora_packed import _PackedBase

    torch.manual_seed(0)
    q = torch.randint(0, 8, (24, 64), dtype=torch.uint8)
    s = torch.rand(24, 2).half() * 0.1 + 0.01
    z = torch.randint(0, 8, (24, 2), dtype=torch.uint8)
    layer = kernels.PackedLinear.from_quantized(q, s, z, 3, 32)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    w = kernels.dequantize(layer.packed, torch.float32).double()
    y = _PackedBase.apply(x.float(), layer)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g.double() @ w, rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(gx.sum()))


# -- CUDA: QLoRA's NF4 base, packed layers under the Triton kernels -------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _on_cuda(pristine, tokenizer, dtype):
    model, plan, ctx = _compressed(pristine, tokenizer)
    model.to("cuda", dtype)
    ctx.device = torch.device("cuda")
    return model, plan, ctx


@pytest.mark.gpu
@cuda
def test_qlora_nf4_base_on_cuda(pristine, tokenizer):
    bnb = pytest.importorskip("bitsandbytes")
    model, plan, ctx = _on_cuda(pristine, tokenizer, torch.bfloat16)
    dense = [li.name for li in ctx.structure.block_linears() if li.kind == "mlp.up_proj"]
    ctx.manifest.update_layer(dense[0], sparsity=0.0)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in dense}
    before = _base_state(model)
    summary = LoRARecovery(base="nf4", rank=4, **FAST).apply(model, plan, ctx)
    assert summary["base"] == "nf4" and summary["steps"] == 4
    for n in dense:  # the 16-bit layers got an NF4 base, exactly bnb's quantization of the weight
        base = model.get_submodule(n).base_layer
        assert isinstance(base, bnb.nn.Linear4bit) and ctx.manifest.layers[n]["method"] == "nf4"
        codes, _ = bnb.functional.quantize_4bit(originals[n].cuda(), quant_type="nf4", compress_statistics=True)
        assert torch.equal(base.weight.data, codes)
    after = _base_state(model)
    for k, v in before.items():  # the layers compressed before stay bit-identical
        if not any(k.startswith(n + ".") for n in dense):
            assert torch.equal(v, after[k]), k
    ids = torch.randint(0, 1000, (1, 16), device="cuda")
    assert torch.isfinite(model(input_ids=ids, use_cache=False).logits.float()).all()


@pytest.mark.gpu
@cuda
def test_packed_lora_trains_on_cuda(pristine, tokenizer, kernels):
    model, plan, ctx = _on_cuda(pristine, tokenizer, torch.float16)
    names = _pack_layers(kernels, model, ctx, ("self_attn.q_proj", "mlp.down_proj"))
    for n in names:
        model.get_submodule(n).to("cuda")
    buffers = {n: [b.clone() for b in model.get_submodule(n).buffers()] for n in names}
    summary = LoRARecovery(rank=4, **FAST).apply(model, plan, ctx)
    assert summary["packed_registered"] and math.isfinite(summary["loss_last"])
    for n in names:
        layer = model.get_submodule(n)
        assert type(layer).__name__ == "PackedLoraLinear"
        assert all(torch.equal(a, b) for a, b in zip(buffers[n], layer.base_layer.buffers()))
        assert torch.count_nonzero(layer.lora_B["default"].weight) > 0
