"""LoRA / QLoRA recovery: low-rank adapters trained on top of the compressed model.

The compressed weights stay frozen exactly as the earlier stages left them (quantized values,
pruning masks, packed ``PackedLinear`` codes); only the adapters ``A, B`` of
``h = W_hat x + (alpha / r) B A x`` learn (Hu et al. 2021, https://arxiv.org/abs/2106.09685,
Equation 3; QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, Equation 5). They are
trained with the causal-LM loss on calibration text, never on the held-out split.

Ranks come from the plan (see :func:`hpsearch.methods.lora.adapter_ranks`); model-wide plan
values ``lora`` (on/off), ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_lr`` and
``lora_steps`` override the stage's config, so a search can sweep them.

The adapters are put into the model in place with peft's ``inject_adapter_in_model`` (no
``PeftModel`` wrapper: the trial keeps evaluating the same object, which still takes
``input_ids`` and ``use_cache``). Training is a plain loop over the adapter parameters rather than
``transformers.Trainer``: a recovery run is a few hundred steps inside a trial, and Trainer would
add a dataset wrapper, output directories and checkpoints in the trial's folder, reporting
integrations (it starts W&B runs of its own when wandb is installed), global reseeding, and a
callback for the time budget; the loop below is AdamW, warm-up and cosine decay, gradient clipping,
a seeded batch order and a tqdm bar.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from typing import Any

import torch
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.methods.lora import (
    adapter_flops_per_token,
    adapter_params,
    adapter_ranks,
    distillation_loss,
    lr_factor,
    text_windows,
)
from hpsearch.plan import Plan
from hpsearch.stages.base import Stage, StageContext
from hpsearch.textdata import load_text

__all__ = ["LoRARecovery"]

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_BASES = ("compressed", "nf4")
_HELD_OUT = ("embedded:test",)
#: Model-wide plan keys -> the stage setting they override.
_PLAN_KEYS = {"lora": "enabled", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_lr": "lr",
              "lora_steps": "steps"}


class LoRARecovery(Stage):
    """Train LoRA adapters on the compressed model to recover what compression lost.

    Args:
        enabled: run the stage (``plan.model["lora"]`` overrides); disabled adds no parameters.
        rank: adapter rank where the plan gives none (``plan.model["lora_rank"]``, a layer's
            ``lora_rank``); 0 adds no adapter.
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input during training.
        rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
        targets: layer kinds that get adapters (``self_attn.q_proj``, ``mlp.down_proj``...);
            ``None`` is every linear inside the decoder blocks.
        lr: AdamW learning rate of the adapters.
        weight_decay: AdamW weight decay of the adapters.
        warmup: share of the steps spent warming the learning rate up.
        steps: optimizer steps.
        time_budget_s: wall-clock cap on training (``None``: steps only). The schedule is fitted
            to the steps the budget allows after the first ones; a run that the budget stops is not
            bit-reproducible, a run that the steps stop is.
        batch_size, seq_len: blocks of ``seq_len`` tokens per step.
        source: training text (:mod:`hpsearch.textdata`); ``None`` is the calibration set's source
            (``calib.source``, else ``embedded:train``). The held-out ``embedded:test`` is refused.
        max_grad_norm: gradient clipping (0: none).
        base: ``compressed`` (the frozen base is the compressed model as it is) or ``nf4``
            (QLoRA: layers left in 16 bits get a bitsandbytes NF4 base first; needs CUDA and
            bitsandbytes, on CPU the base stays the compressed weights in 16/32 bits).
        adapter_dtype: dtype the adapters are stored and served in after training (they train in
            float32); the memory objective counts them at this dtype.
        merge: fold adapters into the layers whose base is dense and unquantized (then they cost
            nothing at inference); adapters on compressed layers always stay unmerged.
        loss: ``lm`` (next-token cross-entropy on the text) or ``kd`` (distillation: KL from the
            uncompressed model's next-token distribution on the same text, which the trial holds
            as ``ctx.source_model``; one extra forward pass a step, a denser signal per token).
        progress: show a tqdm progress bar on stderr.
    """

    def __init__(self, *, enabled: bool = True, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                 rslora: bool = False, targets: list[str] | None = None, lr: float = 2e-3,
                 weight_decay: float = 0.0, warmup: float = 0.05, steps: int = 100,
                 time_budget_s: float | None = 120.0, batch_size: int = 4, seq_len: int = 128,
                 source: str | None = None, max_grad_norm: float = 1.0, base: str = "compressed",
                 adapter_dtype: str = "float16", merge: bool = False, loss: str = "kd",
                 progress: bool = True) -> None:
        if rank < 0:
            raise ConfigError("stages.lora.rank", f"{rank} is not allowed; allowed: 0 (no adapter) or a positive rank")
        if base not in _BASES:
            raise ConfigError("stages.lora.base", f"{base!r} is not allowed; allowed: {', '.join(_BASES)}")
        if adapter_dtype not in _DTYPES:
            raise ConfigError("stages.lora.adapter_dtype", f"{adapter_dtype!r} is not allowed; allowed: {', '.join(_DTYPES)}")
        _check_source(source)
        if loss not in _LOSSES:
            raise ConfigError("stages.lora.loss", f"{loss!r} is not allowed; allowed: {', '.join(_LOSSES)}")
        if steps < 1 or batch_size < 1 or seq_len < 2:
            raise ConfigError("stages.lora", "steps and batch_size must be >= 1 and seq_len >= 2")
        if time_budget_s is not None and time_budget_s <= 0:
            raise ConfigError("stages.lora.time_budget_s", "must be positive, or null for no budget")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= warmup < 1.0:
            raise ConfigError("stages.lora", "dropout and warmup must be in [0, 1)")
        self.enabled, self.rank, self.alpha, self.dropout, self.rslora = enabled, rank, alpha, dropout, rslora
        self.targets = list(targets) if targets else None
        self.lr, self.weight_decay, self.warmup, self.steps = lr, weight_decay, warmup, steps
        self.time_budget_s, self.batch_size, self.seq_len, self.source = time_budget_s, batch_size, seq_len, source
        self.max_grad_norm, self.base, self.adapter_dtype, self.merge = max_grad_norm, base, adapter_dtype, merge
        self.loss, self.progress = loss, progress

    # -- settings ----------------------------------------------------------------------------
    def settings(self, plan: Plan) -> dict[str, Any]:
        """The stage's settings with the plan's model-wide overrides applied."""
        s = {"enabled": self.enabled, "alpha": self.alpha, "dropout": self.dropout, "lr": self.lr,
             "steps": self.steps}
        for key, setting in _PLAN_KEYS.items():
            if key in plan.model and plan.model[key] is not None:
                s[setting] = type(s[setting])(plan.model[key]) if setting != "enabled" else bool(plan.model[key])
        return s

    def ranks(self, plan: Plan, ctx: StageContext) -> dict[str, int]:
        """Layer name -> adapter rank for this plan (empty when the stage is off)."""
        linears = ctx.structure.block_linears()
        if self.targets is not None:
            kinds = set(ctx.structure.kinds())
            unknown = [t for t in self.targets if t not in kinds]
            if unknown:
                raise ConfigError("stages.lora.targets", f"{unknown[0]!r} is not a layer kind of this model; "
                                                         f"allowed: {', '.join(sorted(kinds))}")
            linears = tuple(li for li in linears if li.kind in self.targets)
        return adapter_ranks(plan, linears, self.rank)

    def source_for(self, ctx: StageContext) -> str:
        """The training text: the stage's ``source``, else the calibration set's, else ``embedded:train``."""
        source = self.source or (ctx.calib.get("source") if ctx.calib is not None else None) or "embedded:train"
        _check_source(source)
        return str(source)

    # -- the stage -----------------------------------------------------------------------------
    def apply(self, model: nn.Module, plan: Plan, ctx: StageContext) -> dict[str, Any]:
        s = self.settings(plan)
        ranks = self.ranks(plan, ctx) if s["enabled"] else {}
        if not ranks:
            ctx.manifest.model["lora"] = {"enabled": False}
            return {"enabled": False}
        from peft import LoraConfig, inject_adapter_in_model

        from hpsearch.methods.lora_packed import register_packed

        model.requires_grad_(False)
        base = self._prepare_base(model, ranks, ctx)
        config = LoraConfig(
            r=max(ranks.values()), lora_alpha=s["alpha"], lora_dropout=s["dropout"], use_rslora=self.rslora,
            target_modules=list(ranks), rank_pattern={re.escape(n): r for n, r in ranks.items()}, bias="none",
        )
        packed = register_packed(config)
        with _seeded(ctx.seed, ctx.device):
            inject_adapter_in_model(config, model)
            adapters = _adapter_layers(model)
            params = [p for layer in adapters.values() for p in _own_params(layer)]
            for p in params:
                p.data = p.data.float()
                p.requires_grad_(True)
            result = self._train(model, adapters, params, s, ctx)
        dtype = _DTYPES[self.adapter_dtype]
        for p in params:
            p.requires_grad_(False)
            p.data = p.data.to(dtype)
        model.eval()
        merged = self._merge(model, adapters, ctx) if self.merge else set()
        summary = self._record(ranks, merged, s, base, result, ctx)
        summary["packed_registered"] = packed
        ctx.artifacts["lora"] = {**result, "ranks": ranks, "merged": sorted(merged)}
        return summary

    def _prepare_base(self, model: nn.Module, ranks: dict[str, int], ctx: StageContext) -> str:
        """QLoRA's NF4 base for the layers still in 16 bits, where CUDA is present."""
        if self.base == "compressed":
            return "compressed"
        if ctx.device.type != "cuda":
            log.info("stages.lora.base=nf4 needs CUDA; on %s the frozen base is the compressed model as it is", ctx.device)
            return "compressed (nf4 needs CUDA)"
        dense = [n for n in ranks if ctx.manifest.layers[n].get("bits", 16) >= 16]
        _to_nf4(model, dense, ctx)
        return "nf4"

    def _train(self, model: nn.Module, adapters: dict[str, nn.Module], params: list[nn.Parameter],
               s: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        from tqdm.auto import tqdm

        steps, b = int(s["steps"]), self.batch_size
        text = load_text(self.source_for(ctx), "stages.lora.source")
        batches = torch.Generator().manual_seed(ctx.seed)  # the batch order: seeded, nothing else draws from it

        def encode(chunks: list[str]) -> list[list[int]]:
            return ctx.tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
        optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=self.weight_decay)
        model.eval()  # the base model as served: its own dropout stays off ...
        for layer in adapters.values():
            layer.lora_dropout.train()  # ... the adapters' dropout is on while they train
        horizon, losses, tokens = steps, [], 0
        start, cpu_start = time.perf_counter(), time.process_time()
        bar = tqdm(total=horizon, desc="lora recovery", file=sys.stderr, disable=not self.progress, leave=False)
        step = 0
        while step < horizon:
            ids = text_windows(text, encode, b, self.seq_len, batches).to(ctx.device)
            warmup = round(self.warmup * horizon)
            for group in optimizer.param_groups:
                group["lr"] = s["lr"] * lr_factor(step, horizon, warmup)
            loss = _LOSSES[self.loss](model, ids, ctx)
            loss.backward()
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += ids.numel()
            step += 1
            elapsed = time.perf_counter() - start
            if self.time_budget_s is not None:
                if elapsed >= self.time_budget_s:
                    break
                if step == 3 or (step > 3 and step % 5 == 0):  # fit the schedule to the budget
                    horizon = min(steps, max(step + 1, int(self.time_budget_s * step / elapsed)))
                    bar.total = horizon
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        train_s = time.perf_counter() - start
        k = min(5, len(losses))
        return {"steps": step, "train_s": train_s, "train_cpu_s": time.process_time() - cpu_start, "tokens": tokens, "loss_first": sum(losses[:k]) / k,
                "loss_last": sum(losses[-k:]) / k, "budget_hit": step < steps}

    def _merge(self, model: nn.Module, adapters: dict[str, nn.Module], ctx: StageContext) -> set[str]:
        """Fold adapters into dense 16-bit bases (Hu et al., Section 4.1: ``W = W0 + BA``)."""
        merged = set()
        for name, layer in adapters.items():
            record = ctx.manifest.layers[name]
            if record.get("bits", 16) < 16 or float(record.get("sparsity") or 0.0) > 0 or not isinstance(layer.get_base_layer(), nn.Linear):
                continue  # the compressed base stays exactly as compressed
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
            merged.add(name)
        return merged

    def _record(self, ranks: dict[str, int], merged: set[str], s: dict[str, Any], base: str,
                result: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        """Adapter sizes and costs into the manifest, where memory and latency read them."""
        dtype_bytes = _DTYPES[self.adapter_dtype].itemsize
        total_params = total_bytes = 0
        flops = 0.0
        for name, r in ranks.items():
            record = ctx.manifest.layers[name]
            k, n = record["in_features"], record["out_features"]
            numel = adapter_params(k, n, r)
            total_params += numel
            unmerged = name not in merged
            ctx.manifest.update_layer(name, lora_rank=r, lora_params=numel, lora_dtype=self.adapter_dtype,
                                      lora_merged=not unmerged)
            if unmerged:
                total_bytes += numel * dtype_bytes
                flops += adapter_flops_per_token(k, n, r)
        extra = ctx.manifest.model.setdefault("extra_bytes", {})
        extra["lora_adapters"] = total_bytes
        ctx.manifest.model["extra_flops_per_token"] = float(ctx.manifest.model.get("extra_flops_per_token", 0.0)) + flops
        by_rank: dict[int, int] = {}
        for r in ranks.values():
            by_rank[r] = by_rank.get(r, 0) + 1
        info = {"enabled": True, "layers": len(ranks), "layers_by_rank": by_rank, "params": total_params,
                "bytes": total_bytes, "flops_per_token": flops, "merged": len(merged), "base": base,
                "alpha": s["alpha"], "dropout": s["dropout"], "lr": s["lr"], "steps_planned": s["steps"],
                "adapter_dtype": self.adapter_dtype, "loss": self.loss,
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}}
        ctx.manifest.model["lora"] = info
        return info


def _lm_loss(model: nn.Module, ids: torch.Tensor, ctx: StageContext) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _kd_loss(model: nn.Module, ids: torch.Tensor, ctx: StageContext) -> torch.Tensor:
    if ctx.source_model is None:
        raise ConfigError("stages.lora.loss", "kd needs the uncompressed model (StageContext.source_model); use lm")
    with torch.no_grad():
        teacher = ctx.source_model(input_ids=ids, use_cache=False).logits
    return distillation_loss(model(input_ids=ids, use_cache=False).logits, teacher)


#: Training objectives by ``loss`` name: ``(model, input_ids, ctx) -> scalar``.
_LOSSES = {"lm": _lm_loss, "kd": _kd_loss}


def _check_source(source: str | None) -> None:
    if source in _HELD_OUT:
        raise ConfigError("stages.lora.source", f"{source!r} is the held-out split perplexity is measured on; "
                                                "train on embedded:train, embedded:valid or another source")


def _adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _own_params(layer: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable tensors (``lora_A``, ``lora_B``), never the base layer's."""
    return [*layer.lora_A.parameters(), *layer.lora_B.parameters()]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Adapter initialisation and dropout draw from ``seed`` without touching the caller's RNG."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _to_nf4(model: nn.Module, names: list[str], ctx: StageContext) -> None:
    """Replace the named ``nn.Linear`` layers by bitsandbytes NF4 layers (QLoRA, Section 3)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("stages.lora.base", "nf4 needs bitsandbytes (pip install bitsandbytes); "
                                              "or use base=compressed") from None
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=old.weight.dtype, compress_statistics=True, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data.to("cpu"), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        new = new.to(ctx.device)  # quantizes the weight to NF4 on the way
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        # NF4: 4-bit codes, one absmax per 64 weights (double-quantized in bnb: ~4.13 bits a weight;
        # recorded as a 16-bit scale per 64, 4.25 bits a weight, a slight over-count).
        ctx.manifest.update_layer(name, bits=4, group_size=64, sym=True, method="nf4")
