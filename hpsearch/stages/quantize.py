"""Weight quantization stage: every layer the plan quantizes, by the method the plan names.

Methods (RTN, GPTQ, AWQ...) are registered in the stage's config under ``methods`` as
``_target_`` entries, so adding one is a config change; the plan's per-layer ``method`` picks
among them. The layer keeps the dequantized weight (simulated quantization, exact to what the
packed kernels compute) and the codes are left in ``ctx.artifacts["quantized"]`` for packing.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.methods.grid import QuantizedWeight
from hpsearch.plan import LayerPlan, Plan
from hpsearch.stages.base import Stage, StageContext

__all__ = ["WeightQuantizer", "Quantize"]


class WeightQuantizer(abc.ABC):
    """One way to turn a weight into codes on a group-wise grid."""

    def requires(self) -> frozenset[str]:
        """Calibration statistics the method reads (e.g. ``hessian``)."""
        return frozenset()

    @abc.abstractmethod
    def quantize(self, name: str, weight: torch.Tensor, layer: LayerPlan, group_size: int,
                 ctx: StageContext) -> QuantizedWeight:
        """Quantize the ``[out, in]`` weight of layer ``name``."""


class Quantize(Stage):
    """Quantize the weights of the layers whose plan has ``bits < 16``.

    Args:
        methods: method name -> :class:`WeightQuantizer` (instantiated by Hydra).
    """

    def __init__(self, *, methods: Mapping[str, WeightQuantizer]) -> None:
        if not methods:
            raise ConfigError("stages.quantize.methods", "needs at least one method (e.g. rtn)")
        self.methods = dict(methods)

    def _method(self, layer: LayerPlan, name: str) -> WeightQuantizer:
        try:
            return self.methods[layer.method]
        except KeyError:
            raise ConfigError(
                "search.layer.method",
                f"{layer.method!r} (layer {name}) is not a configured method; allowed: {', '.join(self.methods)}",
            ) from None

    def requires(self, plan: Plan) -> frozenset[str]:
        needs: set[str] = set()
        for name, layer in plan.layers.items():
            if layer.quantized:
                needs |= self._method(layer, name).requires()
        return frozenset(needs)

    def apply(self, model: nn.Module, plan: Plan, ctx: StageContext) -> dict[str, Any]:
        quantized = ctx.artifacts.setdefault("quantized", {})
        counts: dict[str, int] = {}
        seconds: dict[str, float] = {}
        for name, layer in plan.layers.items():
            if not layer.quantized:
                continue
            method = self._method(layer, name)
            module = model.get_submodule(name)
            weight = module.weight.data
            group_size = layer.effective_group_size(weight.shape[1])
            start = time.perf_counter()
            qw = method.quantize(name, weight, layer, group_size, ctx)
            weight.copy_(qw.dequantize(torch.float32).to(weight.dtype))
            seconds[layer.method] = seconds.get(layer.method, 0.0) + time.perf_counter() - start
            quantized[name] = qw
            ctx.manifest.update_layer(
                name, bits=layer.bits, group_size=group_size, sym=layer.sym, method=layer.method,
                in_scale=qw.in_scale is not None,
            )
            counts[layer.method] = counts.get(layer.method, 0) + 1
        return {"layers_by_method": counts, "seconds_by_method": {k: round(v, 4) for k, v in seconds.items()}}
