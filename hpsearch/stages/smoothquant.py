"""SmoothQuant W8A8 (Xiao et al. 2022): smoothing, per-channel weights, per-token activations."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.methods.smoothquant import W8A8Linear, quantize_weight_per_channel, smooth_scales
from hpsearch.plan import Plan
from hpsearch.stages.base import Stage, StageContext

__all__ = ["SmoothQuant"]


class SmoothQuant(Stage):
    """Smooth, then quantize weights per output channel and activations per token (dynamic).

    Every layer the plan gives ``bits < 16`` becomes a :class:`~hpsearch.methods.smoothquant.W8A8Linear`
    with ``bits``-bit weights and ``a_bits``-bit activations; the others stay in 16 bits. Layers fed
    the same input (``q/k/v_proj``) share one smoothing factor, as when it is folded into the norm
    before them. The migration strength is the plan's model-wide ``sq_alpha`` (searchable) or
    ``alpha``; a layer's ``x_sq_alpha`` overrides it for the layers sharing its input.

    Args:
        alpha: default migration strength in ``[0, 1]`` (0.5 in the paper for most models).
        a_bits: activation bit-width.
    """

    def __init__(self, *, alpha: float = 0.5, a_bits: int = 8) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError("stages.smoothquant.alpha", f"{alpha!r} is not allowed; allowed: 0 <= alpha <= 1")
        if a_bits not in (4, 8, 16):
            raise ConfigError("stages.smoothquant.a_bits", f"{a_bits!r} is not allowed; allowed: 4, 8, 16")
        self.alpha, self.a_bits = alpha, a_bits

    def requires(self, plan: Plan) -> frozenset[str]:
        return frozenset({"max_abs"}) if any(p.quantized for p in plan.layers.values()) else frozenset()

    @torch.no_grad()
    def apply(self, model: nn.Module, plan: Plan, ctx: StageContext) -> dict[str, Any]:
        targets = [name for name, layer in plan.layers.items() if layer.quantized]
        if not targets:
            return {"layers": 0}
        calibration = ctx.calibration = ctx.calibration.for_model(model)
        groups: dict[str, list[str]] = {}
        for name in targets:
            groups.setdefault(calibration.owner(name), []).append(name)
        quantized = ctx.artifacts.setdefault("quantized", {})
        model_alpha = float(plan.model.get("sq_alpha", self.alpha))
        alphas = []
        for owner, names in groups.items():
            alpha = float(plan.layer(names[0]).get("x_sq_alpha", model_alpha))
            alphas.append(alpha)
            act_max = calibration.layer(owner).max_abs
            modules = [model.get_submodule(n) for n in names]
            w_max = torch.stack([m.weight.detach().abs().amax(dim=0).float().cpu() for m in modules]).amax(dim=0)
            s = smooth_scales(act_max.float().cpu(), w_max, alpha)  # Equation (4)
            for name, module in zip(names, modules):
                layer = plan.layer(name)
                W = module.weight.detach()
                qw = quantize_weight_per_channel(W.float() * s.to(W.device).unsqueeze(0), layer.bits)  # Q(diag(s) W^T)
                w_hat = qw.dequantize()  # the smoothed weight Q(W diag(s))
                qw.in_scale = s.half()
                new = W8A8Linear(w_hat.to(W.dtype), (1.0 / s).to(W.device), module.bias, self.a_bits)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
                quantized[name] = qw
                ctx.manifest.update_layer(name, bits=layer.bits, group_size=W.shape[1], sym=True, method="smoothquant",
                                          in_scale=True, a_bits=self.a_bits, sq_alpha=alpha)
        return {"layers": len(targets), "smoothing_groups": len(groups), "alpha": round(sum(alphas) / len(alphas), 4)}
