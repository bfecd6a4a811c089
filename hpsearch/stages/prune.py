"""Pruning stage: magnitude, Wanda or SparseGPT per layer, unstructured or N:M, with a uniform or
OWL sparsity allocation, before or after the quantization stage.

The plan says per layer ``sparsity``, ``pattern`` (``unstructured``, ``2:4``, ``4:8``...) and
``prune_method``; model-wide, ``allocation`` (``uniform`` or ``owl``) with OWL's ``owl_lambda`` and
``owl_m`` (searchable as ``search.model`` parameters; the constructor gives the defaults); a
model-wide ``prune_method`` or ``pattern`` applies to every layer. A layer is pruned when its
sparsity is above 0; an ``N:M`` layer then removes ``1 - N/M`` of its weights.

Order is the ``pipeline`` list:

* ``[prune, quantize]``: masks go to ``ctx.artifacts["masks"]`` so the quantizer keeps pruned
  weights at exactly zero; with ``joint_quantize`` a SparseGPT layer that the plan quantizes is
  pruned and quantized in one pass (SparseGPT Section 3.5) and the quantizer leaves it alone.
* ``[quantize, prune]``: pruned codes become the group's zero point; SparseGPT's updates of the
  kept weights are quantized back onto the layer's existing grid.

The manifest gets, per pruned layer, the realised ``sparsity`` (share of the mask removed), the
``pattern``, ``prune_method`` and ``nnz`` (kept weights), which the memory objective stores in the
cheaper sparse format; ``manifest.model["prune_order"]`` says which came first.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.methods.sparsegpt import sparsegpt
from hpsearch.methods.sparsity import (
    magnitude_scores,
    mask_codes,
    outlier_ratio,
    owl_offsets,
    parse_pattern,
    pattern_sparsity,
    prune_mask,
    wanda_scores,
)
from hpsearch.plan import LayerPlan, Plan
from hpsearch.stages.base import Stage, StageContext

__all__ = ["Prune"]

#: Calibration statistics (:mod:`hpsearch.calib`) each criterion reads: SparseGPT the input Hessian
#: ``H = E[x x^T]``; Wanda ``||X_j||_2``, which is ``sqrt(n * H_jj)`` (the factor ``n`` is common to
#: a row and to a layer, so its diagonal ranks the same; OWL's outlier scores are Wanda's).
_NEEDS = {"magnitude": frozenset(), "wanda": frozenset({"hessian"}), "sparsegpt": frozenset({"hessian"})}
_ALLOCATIONS = ("uniform", "owl")


class Prune(Stage):
    """Set the least important weights of every layer the plan prunes to zero.

    Args:
        allocation: default sparsity allocation when the plan has no ``allocation``: ``uniform``
            (each layer gets its plan sparsity) or ``owl`` (per-block offsets by outlier ratio).
        owl_lambda: OWL's ``lambda``, the largest per-block deviation from the plan sparsity.
        owl_m: OWL's ``M``: a score is an outlier above ``M`` times its layer's mean.
        joint_quantize: SparseGPT quantizes the kept weights of layers the plan quantizes in the
            same pass (when the layer is not quantized yet).
        blocksize: SparseGPT's ``B_s`` (lazy update and adaptive mask block).
        percdamp: SparseGPT's Hessian dampening (share of the mean diagonal).
    """

    def __init__(self, *, allocation: str = "uniform", owl_lambda: float = 0.08, owl_m: float = 5.0,
                 joint_quantize: bool = True, blocksize: int = 128, percdamp: float = 0.01) -> None:
        if allocation not in _ALLOCATIONS:
            raise ConfigError("stages.prune.allocation", f"{allocation!r} is not allowed; allowed: {', '.join(_ALLOCATIONS)}")
        if not 0.0 <= owl_lambda < 0.5:
            raise ConfigError("stages.prune.owl_lambda", f"{owl_lambda} is not allowed; allowed: 0 <= owl_lambda < 0.5")
        if owl_m <= 0:
            raise ConfigError("stages.prune.owl_m", f"{owl_m} is not allowed; allowed: a positive number (OWL uses 3-10)")
        if blocksize < 1 or not 0.0 <= percdamp < 1.0:
            raise ConfigError("stages.prune.blocksize", "blocksize must be >= 1 and 0 <= percdamp < 1")
        self.allocation, self.owl_lambda, self.owl_m = allocation, float(owl_lambda), float(owl_m)
        self.joint_quantize, self.blocksize, self.percdamp = joint_quantize, int(blocksize), float(percdamp)

    # -- what the plan asks for -----------------------------------------------------------------
    @staticmethod
    def _targets(plan: Plan) -> dict[str, LayerPlan]:
        """Layers to prune; a model-wide ``prune_method`` or ``pattern`` (``search.model``) applies
        to every layer."""
        shared = {k: plan.model[k] for k in ("prune_method", "pattern") if k in plan.model}
        return {name: dataclasses.replace(layer, **shared) for name, layer in plan.layers.items()
                if float(layer.sparsity) > 0}

    def _allocation(self, plan: Plan) -> tuple[str, float, float]:
        allocation = str(plan.model.get("allocation", self.allocation))
        if allocation not in _ALLOCATIONS:
            raise ConfigError("search.model.allocation", f"{allocation!r} is not allowed; allowed: {', '.join(_ALLOCATIONS)}")
        return (allocation, float(plan.model.get("owl_lambda", self.owl_lambda)),
                float(plan.model.get("owl_m", self.owl_m)))

    def requires(self, plan: Plan) -> frozenset[str]:
        needs: set[str] = set()
        for name, layer in self._targets(plan).items():
            if layer.prune_method not in _NEEDS:
                raise ConfigError("search.layer.prune_method",
                                  f"{layer.prune_method!r} (layer {name}) is not allowed; allowed: {', '.join(_NEEDS)}")
            needs |= _NEEDS[layer.prune_method]
            try:
                parse_pattern(layer.pattern)
            except ValueError as exc:
                raise ConfigError("search.layer.pattern", f"{exc} (layer {name})") from None
        if self._targets(plan) and self._allocation(plan)[0] == "owl":
            needs.add("hessian")
        return frozenset(needs)

    # -- calibration statistics -----------------------------------------------------------------
    @staticmethod
    def _statistics(model: nn.Module, ctx: StageContext, needs: frozenset[str]):
        """``(H(name), ||X||^2(name))`` from ``ctx.calibration`` (the trial's cached statistics);
        without one (a stage used outside a trial) they are captured on ``ctx.source_model``, or
        on ``model`` as it is when there is none."""
        if not needs:
            return None, None
        if ctx.calibration is None:
            from hpsearch.calib import calibration_for

            if ctx.source_model is None:
                ctx.source_model = model
            ctx.calibration = calibration_for(ctx, needs)
        cal = ctx.calibration.for_model(model)
        return (lambda n: cal.layer(n).hessian), (lambda n: torch.diagonal(cal.layer(n).hessian))

    # -- the stage ------------------------------------------------------------------------------
    def apply(self, model: nn.Module, plan: Plan, ctx: StageContext) -> dict[str, Any]:
        targets = self._targets(plan)
        if not targets:
            return {"layers": 0}
        needs = self.requires(plan)
        allocation, lam, m_owl = self._allocation(plan)
        hessian, input_sqnorm = self._statistics(model, ctx, needs)
        quantized: dict[str, Any] = ctx.artifacts.setdefault("quantized", {})
        masks: dict[str, torch.Tensor] = ctx.artifacts.setdefault("masks", {})
        quantized_before = set(quantized)
        stages_before = [s["name"] for s in ctx.manifest.stages]

        sparsity = {name: pattern_sparsity(layer.pattern, layer.sparsity) for name, layer in targets.items()}
        for name, layer in targets.items():
            nm = parse_pattern(layer.pattern)
            in_features = ctx.structure.linear(name).in_features
            if nm and in_features % nm[1]:
                raise ConfigError("search.layer.pattern", f"{layer.pattern} needs in_features divisible by {nm[1]}; layer {name} has {in_features}")
        offsets = self._owl_offsets(model, ctx, targets, input_sqnorm, lam, m_owl) if allocation == "owl" else {}
        for name, offset in offsets.items():
            sparsity[name] = min(max(sparsity[name] + offset, 0.0), 0.99)

        seconds: dict[str, float] = {}
        joint = 0
        for name, layer in targets.items():
            start = time.perf_counter()
            weight = model.get_submodule(name).weight.data
            s = sparsity[name]
            qw = quantized.get(name)
            if layer.prune_method == "sparsegpt":
                kw: dict[str, Any] = {}
                if qw is not None:  # quantize -> prune: keep the existing grid
                    kw = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym, "grid": (qw.scale, qw.zero)}
                elif self.joint_quantize and layer.quantized:
                    kw = {"bits": layer.bits, "group_size": layer.effective_group_size(weight.shape[1]), "sym": layer.sym}
                H = hessian(name).to(weight.device, torch.float32)
                W = weight.float()
                s_in = qw.in_scale.to(weight.device).float() if qw is not None and qw.in_scale is not None else None
                if s_in is not None:  # AWQ: the grid lives in the scaled basis W s, x / s
                    W, H = W * s_in.unsqueeze(0), H / (s_in.unsqueeze(1) * s_in.unsqueeze(0))
                res = sparsegpt(W, H, s, layer.pattern, blocksize=self.blocksize, percdamp=self.percdamp, **kw)
                mask = res.mask
                if res.quantized is not None:
                    res.quantized.in_scale = qw.in_scale if s_in is not None else None
                    quantized[name] = res.quantized
                weight.copy_((res.quantized.dequantize() if res.quantized is not None else res.weight).to(weight.dtype))
                if res.quantized is not None and qw is None:
                    joint += 1
                    ctx.manifest.update_layer(name, bits=layer.bits, group_size=res.quantized.group_size,
                                              sym=layer.sym, method="sparsegpt", in_scale=False)
            else:
                if layer.prune_method == "wanda":
                    scores = wanda_scores(weight, input_sqnorm(name).to(weight.device).float().sqrt())
                else:
                    scores = magnitude_scores(weight)
                mask = prune_mask(scores, s, layer.pattern, per_row=layer.prune_method == "wanda")
                weight.mul_(mask.to(weight.dtype))
                if qw is not None:  # a new object: the quantizer's may be shared by its cache
                    quantized[name] = dataclasses.replace(qw, q=mask_codes(qw.q, qw.zero, qw.group_size, mask))
            masks[name] = mask
            nnz = int(mask.sum().item())
            ctx.manifest.update_layer(name, sparsity=1.0 - nnz / mask.numel(), nnz=nnz,
                                      pattern=layer.pattern if parse_pattern(layer.pattern) else "unstructured",
                                      prune_method=layer.prune_method)
            seconds[layer.prune_method] = seconds.get(layer.prune_method, 0.0) + time.perf_counter() - start

        order = ("quantize->prune" if quantized_before
                 else "prune->quantize" if any(layer.quantized for layer in targets.values()) else "prune")
        ctx.manifest.model["prune_order"] = order
        total = sum(mask.numel() for mask in (masks[n] for n in targets))
        kept = sum(int(masks[n].sum().item()) for n in targets)
        return {
            "layers": len(targets),
            "order": order,
            "stages_before": stages_before,
            "allocation": allocation,
            "sparsity": round(1.0 - kept / max(total, 1), 6),
            "joint_quantized_layers": joint,
            "seconds_by_method": {k: round(v, 4) for k, v in seconds.items()},
            **({"owl_offsets": {n: round(v, 4) for n, v in offsets.items()}} if offsets else {}),
        }

    def _owl_offsets(self, model: nn.Module, ctx: StageContext, targets: dict[str, LayerPlan], input_sqnorm,
                     lam: float, m_owl: float) -> dict[str, float]:
        """Per-layer sparsity offsets of OWL: blocks' outlier ratios of the Wanda scores, mapped
        to offsets of mean zero (unstructured layers only; N:M layers keep their pattern)."""
        by_block: dict[int, list[str]] = {}
        for name, layer in targets.items():
            if parse_pattern(layer.pattern) is None:
                by_block.setdefault(ctx.structure.linear(name).block, []).append(name)
        if len(by_block) < 2:
            return {}
        ratios = {}
        for block, names in by_block.items():
            scores = []
            for n in names:
                w = model.get_submodule(n).weight.data
                scores.append(wanda_scores(w, input_sqnorm(n).to(w.device).float().sqrt()))
            ratios[block] = outlier_ratio(scores, m_owl)
        offsets = owl_offsets(ratios, lam)
        return {n: offsets[block] for block, names in by_block.items() for n in names}
