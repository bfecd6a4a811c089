"""Sensitivity-seeded trials: per-unit bit allocations from the cached input Hessians.

Random starts waste a small budget in a space of a hundred conditional parameters; the classic
answer (HAWQ, Dong et al. 2019; OBQ's layer-wise error, Frantar & Alistarh 2022) is to allocate
bits by each layer's sensitivity. For every unit of the space and every bit-width it allows, the
proxy error of quantizing the unit's layers is ``sum tr(dW H dW^T)`` (``dW`` the round-to-nearest
error at the seed group size, ``H = E[x x^T]`` the cached input Hessian GPTQ uses too), and its
cost the exact bytes the memory objective counts. For Lagrange multipliers ``lam`` on a log grid,
each unit takes the bit-width minimizing ``error + lam * bytes``; the distinct allocations, spread
over memory, are enqueued as the study's first trials, and the sampler takes it from there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from hpsearch.methods.grid import quantize_rtn
from hpsearch.objectives.memory import linear_bytes
from hpsearch.plan import LayerPlan
from hpsearch.space import SearchSpace

__all__ = ["unit_costs", "allocations", "seed_params", "sensitivity_seeds"]


def unit_costs(space: SearchSpace, weights: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
               bits_choices: list[int], group_size: int, sym: bool) -> dict[str, dict[int, tuple[float, int]]]:
    """``unit -> bits -> (proxy error, bytes)`` for every unit of ``space``."""
    costs: dict[str, dict[int, tuple[float, int]]] = {}
    for unit, members in space.units.items():
        per_bits = {}
        for bits in bits_choices:
            error, size = 0.0, 0
            for li in members:
                record = {"out_features": li.out_features, "in_features": li.in_features, "bias": li.bias,
                          "bits": bits, "group_size": LayerPlan(group_size=group_size).effective_group_size(li.in_features),
                          "sym": sym}
                size += linear_bytes(record)
                if bits < 16:
                    w = weights[li.name].float()
                    dw = w - quantize_rtn(w, bits, record["group_size"], sym).dequantize()
                    error += float(((dw @ hessians[li.name].float()) * dw).sum())  # tr(dW H dW^T)
            per_bits[bits] = (error, size)
        costs[unit] = per_bits
    return costs


def allocations(costs: Mapping[str, Mapping[int, tuple[float, int]]], n: int) -> list[dict[str, int]]:
    """Up to ``n`` distinct Lagrangian allocations, spread evenly over their total bytes."""
    ratios = []
    for per_bits in costs.values():
        options = sorted(per_bits.items(), key=lambda kv: kv[1][1])
        for (_, (e_lo, b_lo)), (_, (e_hi, b_hi)) in zip(options, options[1:]):
            if b_hi > b_lo and e_lo > e_hi:
                ratios.append((e_lo - e_hi) / (b_hi - b_lo))
    if not ratios or n < 1:
        return []
    lo, hi = math.log10(min(ratios)) - 1, math.log10(max(ratios)) + 1
    found: dict[tuple, dict[str, int]] = {}
    for i in range(200):
        lam = 10 ** (lo + (hi - lo) * i / 199)
        choice = {u: min(pb, key=lambda b: pb[b][0] + lam * pb[b][1]) for u, pb in costs.items()}
        found.setdefault(tuple(sorted(choice.items())), choice)
    ranked = sorted(found.values(), key=lambda c: sum(costs[u][b][1] for u, b in c.items()))
    if len(ranked) <= n:
        return ranked
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)] if n > 1 else [ranked[len(ranked) // 2]]


def seed_params(space: SearchSpace, allocation: Mapping[str, int], group_size: int) -> dict[str, Any]:
    """Optuna parameters pinning ``allocation`` (other searched fields: the fixed value when the
    space allows it, else left to the sampler)."""
    params: dict[str, Any] = {}
    for unit, bits in allocation.items():
        values = {**space.model_fixed, **space.fixed, "bits": bits}
        params[space.param_name("bits", unit)] = bits
        for spec in space.layer_params:
            if spec.field == "bits" or not spec.active(values):
                continue
            wanted = group_size if spec.field == "group_size" else space.fixed.get(spec.field)
            if wanted is not None and spec.allows(wanted):
                params[space.param_name(spec.field, unit)] = values[spec.field] = wanted
    return params


def sensitivity_seeds(space: SearchSpace, config: Any, n: int) -> list[dict[str, Any]]:
    """The parameters of ``n`` sensitivity-seeded trials for the study's model and calibration set."""
    from hpsearch.calib import calibration_for
    from hpsearch.models import load_model

    bits_spec = next((p for p in space.layer_params if p.field == "bits"), None)
    if bits_spec is None or bits_spec.choices is None or n < 1:
        return []
    group_spec = next((p for p in space.layer_params if p.field == "group_size"), None)
    group_size = 128 if group_spec is None or group_spec.allows(128) else group_spec.choices[0]
    loaded = load_model(config.model)
    ctx = SimpleNamespace(calib=config.get("calib"), source_model=loaded.model, structure=space.structure,
                          tokenizer=loaded.tokenizer, device=loaded.device)
    calibration = calibration_for(ctx, {"hessian"})
    names = [li.name for members in space.units.values() for li in members]
    weights = {name: loaded.model.get_submodule(name).weight.data for name in names}
    hessians = {name: calibration.layer(name).hessian for name in names}
    sym = bool(space.fixed.get("sym", False))
    costs = unit_costs(space, weights, hessians, list(bits_spec.choices), group_size, sym)
    return [seed_params(space, a, group_size) for a in allocations(costs, n)]
