"""Weight quantization stage: every layer the plan quantizes, by the method the plan names.

Methods (RTN, GPTQ, AWQ...) are registered in the stage's config under ``methods`` as
``_target_`` entries, so adding one is a config change; the plan's per-layer ``method`` picks
among them. The layer keeps the dequantized weight (simulated quantization, exact to what the
packed kernels compute) and the codes are left in ``ctx.artifacts["quantized"]`` for packing.

Methods that read calibration statistics (GPTQ, AWQ) are expensive, so their results are cached
per (layer, method, options, bits, group size, sym, weight content, calibration set) in
:func:`hpsearch.calib.quant_cache_for` (memory + disk): a trial that reuses a choice an earlier
trial made does no work for it.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.methods.grid import QuantizedWeight
from hpsearch.methods.sparsity import mask_codes
from hpsearch.plan import LayerPlan, Plan
from hpsearch.stages.base import Stage, StageContext

__all__ = ["WeightQuantizer", "Quantize"]


class WeightQuantizer(abc.ABC):
    """One way to turn a weight into codes on a group-wise grid."""

    def requires(self) -> frozenset[str]:
        """Calibration statistics the method reads (e.g. ``hessian``)."""
        return frozenset()

    def options(self) -> dict[str, Any]:
        """Everything besides the plan that changes the result (part of the cache key)."""
        return {}

    @abc.abstractmethod
    def quantize(self, name: str, weight: torch.Tensor, layer: LayerPlan, group_size: int,
                 ctx: StageContext) -> QuantizedWeight:
        """Quantize the ``[out, in]`` weight of layer ``name``."""


class Quantize(Stage):
    """Quantize the weights of the layers whose plan has ``bits < 16``.

    Args:
        methods: method name -> :class:`WeightQuantizer` (instantiated by Hydra).
        cache: reuse quantized weights of calibration-based methods across trials.
    """

    def __init__(self, *, methods: Mapping[str, WeightQuantizer], cache: bool = True) -> None:
        if not methods:
            raise ConfigError("stages.quantize.methods", "needs at least one method (e.g. rtn)")
        self.methods = dict(methods)
        self.cache = cache

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
        cached: dict[str, int] = {}
        if ctx.calibration is not None:
            ctx.calibration = ctx.calibration.for_model(model)
        cache = None
        if self.cache and ctx.calibration is not None and not ctx.calibration.sequential:
            from hpsearch.calib import quant_cache_for

            cache = quant_cache_for(ctx.calib)
        masks = ctx.artifacts.get("masks", {})  # left by an earlier pruning stage
        for name, layer in plan.layers.items():
            if not layer.quantized or name in quantized:  # in `quantized`: done jointly by an earlier stage
                continue
            method = self._method(layer, name)
            module = model.get_submodule(name)
            weight = module.weight.data
            group_size = layer.effective_group_size(weight.shape[1])
            start = time.perf_counter()
            qw, hit = self.quantize_layer(method, name, weight, layer, group_size, ctx, cache)
            cached[layer.method] = cached.get(layer.method, 0) + int(hit)
            if name in masks:  # pruned weights stay exactly zero: their code is the group's zero point
                qw = dataclasses.replace(qw, q=mask_codes(qw.q, qw.zero, qw.group_size, masks[name]))
            weight.copy_(qw.dequantize(torch.float32).to(weight.dtype))
            seconds[layer.method] = seconds.get(layer.method, 0.0) + time.perf_counter() - start
            quantized[name] = qw
            ctx.manifest.update_layer(
                name, bits=layer.bits, group_size=group_size, sym=layer.sym, method=layer.method,
                in_scale=qw.in_scale is not None,
            )
            counts[layer.method] = counts.get(layer.method, 0) + 1
        return {"layers_by_method": counts, "cached_by_method": cached,
                "seconds_by_method": {k: round(v, 4) for k, v in seconds.items()}}

    @staticmethod
    def quantize_layer(method: WeightQuantizer, name: str, weight: torch.Tensor, layer: LayerPlan, group_size: int,
                       ctx: StageContext, cache) -> tuple[QuantizedWeight, bool]:
        """The layer's quantized weight (and whether it came from the cache, where an earlier trial
        or the sensitivity seeds made this choice). Shared with :mod:`hpsearch.sensitivity` so that
        seeds and trials fill and read one cache."""
        if cache is None or not method.requires():
            return method.quantize(name, weight, layer, group_size, ctx), False
        from hpsearch.calib import digest, tensor_fingerprint

        describes = {
            "layer": name, "method": layer.method, "target": f"{type(method).__module__}.{type(method).__qualname__}",
            "options": method.options(), "bits": layer.bits, "group_size": group_size, "sym": layer.sym,
            "extra": dict(layer.extra), "weight": tensor_fingerprint(weight), "calibration": ctx.calibration.key,
        }
        key = digest(describes)
        qw = cache.get(key, describes)
        if qw is not None:  # cached on the host: dequantize where the weight lives
            dev = weight.device
            return QuantizedWeight(qw.q.to(dev), qw.scale.to(dev), qw.zero.to(dev), qw.bits, qw.group_size, qw.sym,
                                   None if qw.in_scale is None else qw.in_scale.to(dev)), True
        qw = method.quantize(name, weight, layer, group_size, ctx)
        cache.put(key, describes, qw)
        return qw, False
