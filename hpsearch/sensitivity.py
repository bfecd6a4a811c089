"""Sensitivity-seeded trials: per-unit bit-width and group-size allocations from cached Hessians.

Random starts waste a small budget in a space of a hundred conditional parameters; the classic
answer (HAWQ, Dong et al. 2019; OBQ's layer-wise error, Frantar & Alistarh 2022) is to allocate
precision by each layer's sensitivity. For every unit of the space and every (bits, group size)
option it allows, the proxy error of quantizing the unit's layers is the Fisher-weighted output
error ``sum_n F_n [dW H dW^T]_nn`` (BRECQ, Li et al. 2021, Equation (10): the loss change of a
perturbed layer output ``dz`` is about ``E[dz^T diag((dL/dz)^2) dz]``), with ``dW`` the error of
the quantization method the trials will run (GPTQ by default, through the quantization stage and
its per-layer cache, so the trials that make these choices later find them done), ``H = E[x x^T]``
the cached input Hessian, and ``F_n`` the mean squared gradient of the language-model loss with
respect to output channel ``n`` of the layer (one backward pass over the calibration set). Without
``F`` a layer of the first block and one of the last would count alike though their outputs matter
to the loss very differently. The cost is the exact bytes the memory objective counts. Allocating
is then a multiple-choice knapsack:

* **at a budget** (:func:`budget_allocation`): least total error with total bytes below each
  uniform baseline's (so a seed that wins on accuracy dominates that baseline): the Lagrangian
  relaxation (each unit takes the option minimizing ``error + lam * bytes``, ``lam`` the smallest
  that fits, found by bisection) followed by greedy filling of the bytes left, best error drop per
  byte first;
* **spread** (:func:`allocations`): the distinct Lagrangian allocations over a log grid of ``lam``,
  spread evenly over memory.

The budget seeds and then the spread are enqueued as the study's first trials, smallest first; the
sampler takes it from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from hpsearch.methods.grid import quantize_rtn
from hpsearch.objectives.memory import linear_bytes
from hpsearch.plan import LayerPlan
from hpsearch.space import SearchSpace
from hpsearch.structure import LinearInfo

__all__ = ["Option", "layer_options", "output_fisher", "unit_costs", "allocations", "budget_allocation", "baseline_bytes",
           "seed_params", "sensitivity_seeds"]

#: One choice for a unit: ``(bits, group_size)``; ``group_size`` is ``None`` where the space has no
#: group size for those bits (16 bits) or does not search it.
Option = tuple[int, "int | None"]
Costs = Mapping[str, Mapping[Any, tuple[float, int]]]
#: ``(layer name, weight, layer plan, group size) -> dequantized weight, whether it has an in_scale``.
Quantizer = Callable[[str, torch.Tensor, LayerPlan, int], tuple[torch.Tensor, bool]]


def layer_options(space: SearchSpace) -> list[Option]:
    """Every ``(bits, group_size)`` the space allows a unit (group sizes where they are active)."""
    bits_spec = next((p for p in space.layer_params if p.field == "bits"), None)
    if bits_spec is None or bits_spec.choices is None:
        return []
    group_spec = next((p for p in space.layer_params if p.field == "group_size"), None)
    options: list[Option] = []
    for bits in bits_spec.choices:
        values = {**space.model_fixed, **space.fixed, "bits": bits}
        if group_spec is not None and group_spec.choices is not None and group_spec.active(values) and bits < 16:
            options += [(int(bits), int(g)) for g in group_spec.choices]
        else:
            options.append((int(bits), None))
    return options


def output_fisher(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str], *, batch_size: int = 8,
                  device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per layer, the mean over tokens of the squared gradient of the next-token loss with respect to
    each output channel, ``F_n = E[(dL/dz_n)^2]`` (float32 ``[out]``, on the CPU): the diagonal
    empirical Fisher of the layer's output (BRECQ, Equation (10)).

    Args:
        model: a causal LM (``model(input_ids=...).logits``); its parameters are left untouched
            (the gradient flows from the input embeddings, made a leaf that requires grad).
        input_ids: calibration tokens ``[n, seq_len]``.
        names: the linear layers to measure.
        batch_size: sequences per forward/backward pass.
        device: where the model runs.
    """
    device = device or next(iter(model.parameters())).device
    sums = {name: torch.zeros(model.get_submodule(name).out_features, dtype=torch.float64) for name in names}

    def on_grad(name: str):
        def hook(module, grad_input, grad_output):
            g = grad_output[0].detach().float()
            sums[name] += g.pow(2).reshape(-1, g.shape[-1]).sum(0).double().cpu()
        return hook

    def leaf(module, args, output):  # the embeddings' output: the root of the gradient
        return output.detach().requires_grad_(True)

    handles = [model.get_submodule(name).register_full_backward_hook(on_grad(name)) for name in names]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    try:
        with torch.enable_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                         reduction="sum")
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    tokens = input_ids.numel()
    return {name: (total / tokens).float() for name, total in sums.items()}


def _record(li: LinearInfo, layer: LayerPlan, in_scale: bool) -> dict[str, Any]:
    """The manifest record the memory objective would read for ``li`` under ``layer``."""
    return {"out_features": li.out_features, "in_features": li.in_features, "bias": li.bias, "bits": layer.bits,
            "group_size": layer.effective_group_size(li.in_features), "sym": layer.sym, "in_scale": in_scale,
            "sparsity": layer.sparsity, "pattern": layer.pattern}


def _rtn(name: str, w: torch.Tensor, layer: LayerPlan, group_size: int) -> tuple[torch.Tensor, bool]:
    return quantize_rtn(w, layer.bits, group_size, layer.sym).dequantize(), False


def unit_costs(space: SearchSpace, weights: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
               options: list[Option], quantizer: Quantizer | None = None,
               output_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[Option, tuple[float, int]]]:
    """``unit -> option -> (proxy error, bytes)`` for every unit of ``space``.

    Args:
        space: the search space (its fixed fields complete each unit's layer plan).
        weights, hessians: per layer name, the ``[out, in]`` weight and the input Hessian.
        options: the ``(bits, group_size)`` choices (see :func:`layer_options`).
        quantizer: the method the trials run; round-to-nearest when ``None``.
        output_weights: per layer name, a weight per output channel (``[out]``, e.g. the mean
            squared loss gradient :func:`output_fisher`) on the diagonal of ``dW H dW^T``;
            ``None``: the plain trace.
    """
    quantizer = quantizer or _rtn
    costs: dict[str, dict[Option, tuple[float, int]]] = {u: {} for u in space.units}
    for option in options:
        plan = space.to_plan(seed_params(space, {u: option for u in space.units}))
        for unit, members in space.units.items():
            error, size = 0.0, 0
            for li in members:
                layer = plan.layers[li.name]
                in_scale = False
                if layer.quantized:
                    w = weights[li.name].float()
                    w_hat, in_scale = quantizer(li.name, w, layer, layer.effective_group_size(li.in_features))
                    dw = w - w_hat.float().to(w.device)
                    per_row = ((dw @ hessians[li.name].float().to(w.device)) * dw).sum(-1)  # diag(dW H dW^T)
                    if output_weights is not None:
                        per_row = per_row * output_weights[li.name].float().to(w.device)
                    error += float(per_row.sum())
                size += linear_bytes(_record(li, layer, in_scale))
            costs[unit][option] = (error, size)
    return costs


def _choose(costs: Costs, lam: float) -> dict[str, Any]:
    """Each unit's option minimizing ``error + lam * bytes`` (ties: fewer bytes)."""
    return {u: min(per, key=lambda o: (per[o][0] + lam * per[o][1], per[o][1])) for u, per in costs.items()}


def _total(costs: Costs, choice: Mapping[str, Any]) -> tuple[float, int]:
    return (sum(costs[u][o][0] for u, o in choice.items()), sum(costs[u][o][1] for u, o in choice.items()))


def _lambda_range(costs: Costs) -> tuple[float, float] | None:
    """``log10`` bounds of the multipliers at which some unit changes option."""
    ratios = []
    for per in costs.values():
        options = sorted(per.values(), key=lambda eb: eb[1])
        for (e_lo, b_lo), (e_hi, b_hi) in zip(options, options[1:]):
            if b_hi > b_lo and e_lo > e_hi:
                ratios.append((e_lo - e_hi) / (b_hi - b_lo))
    if not ratios:
        return None
    return math.log10(min(ratios)) - 1, math.log10(max(ratios)) + 1


def allocations(costs: Costs, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` distinct Lagrangian allocations, spread evenly over their total bytes."""
    bounds = _lambda_range(costs)
    if bounds is None or n < 1:
        return []
    lo, hi = bounds
    found: dict[tuple, dict[str, Any]] = {}
    for i in range(200):
        choice = _choose(costs, 10 ** (lo + (hi - lo) * i / 199))
        found.setdefault(tuple(sorted(choice.items(), key=str)), choice)
    ranked = sorted(found.values(), key=lambda c: _total(costs, c)[1])
    if len(ranked) <= n:
        return ranked
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)] if n > 1 else [ranked[len(ranked) // 2]]


def budget_allocation(costs: Costs, budget: int) -> dict[str, Any] | None:
    """The allocation of least total proxy error whose total bytes are at most ``budget``.

    Lagrangian relaxation of the multiple-choice knapsack (Shoham & Gersho 1988): the smallest
    multiplier ``lam`` whose allocation fits is found by bisection on ``log10 lam``; the bytes it
    leaves are then filled greedily, one unit's upgrade at a time, largest error drop per byte
    first. ``None`` when not even the smallest option of every unit fits.
    """
    smallest = {u: min(per, key=lambda o: (per[o][1], per[o][0])) for u, per in costs.items()}
    if _total(costs, smallest)[1] > budget:
        return None
    choice = _choose(costs, 0.0)
    bounds = _lambda_range(costs)
    if _total(costs, choice)[1] > budget and bounds is not None:
        lo, hi = bounds
        if _total(costs, _choose(costs, 10**hi))[1] > budget:
            choice = smallest
        else:
            for _ in range(60):  # invariant: lam = 10^hi fits
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if _total(costs, _choose(costs, 10**mid))[1] <= budget else (mid, hi)
            choice = _choose(costs, 10**hi)
    elif _total(costs, choice)[1] > budget:
        choice = smallest
    left = budget - _total(costs, choice)[1]
    while True:  # greedy filling: the upgrade with the largest error drop per byte that still fits
        best, best_rate = None, 0.0
        for u, per in costs.items():
            e0, b0 = per[choice[u]]
            for o, (e, b) in per.items():
                if e < e0 and b - b0 <= left:
                    rate = math.inf if b <= b0 else (e0 - e) / (b - b0)
                    if rate > best_rate:
                        best, best_rate = (u, o), rate
        if best is None:
            return choice
        u, o = best
        left -= costs[u][o][1] - costs[u][choice[u]][1]
        choice[u] = o


def baseline_bytes(space: SearchSpace, costs: Costs, name: str) -> tuple[float, int] | None:
    """``(proxy error, bytes)`` of the named baseline over the space's units (``None`` when a
    unit's baseline choice is not among the costed options)."""
    plan = space.to_plan(space.baseline_params(name))
    choice = {}
    for unit, members in space.units.items():
        layer = plan.layers[members[0].name]
        option = (layer.bits, None) if (layer.bits, None) in costs[unit] else (layer.bits, layer.group_size)
        if option not in costs[unit]:
            return None
        choice[unit] = option
    return _total(costs, choice)


def seed_params(space: SearchSpace, allocation: Mapping[str, Any], group_size: int | None = None) -> dict[str, Any]:
    """Optuna parameters pinning ``allocation`` (``unit -> (bits, group_size)``, or ``unit -> bits``
    with ``group_size`` for all); other searched fields: the fixed value when the space allows it,
    else left to the sampler."""
    params: dict[str, Any] = {}
    for unit, option in allocation.items():
        bits, group = option if isinstance(option, tuple) else (option, group_size)
        values = {**space.model_fixed, **space.fixed, "bits": bits}
        params[space.param_name("bits", unit)] = bits
        for spec in space.layer_params:
            if spec.field == "bits" or not spec.active(values):
                continue
            wanted = group if spec.field == "group_size" else space.fixed.get(spec.field)
            if wanted is not None and spec.allows(wanted):
                params[space.param_name(spec.field, unit)] = values[spec.field] = wanted
    return params


def _seed_allocations(space: SearchSpace, costs: Costs, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` allocations: one just under each compressed baseline's bytes, then the spread;
    distinct, smallest first."""
    chosen: dict[tuple, dict[str, Any]] = {}
    for name in space.baselines:
        try:
            base = baseline_bytes(space, costs, name)
        except ValueError:  # a baseline outside the space: the sweeper skips it too
            continue
        if base is None or base[0] <= 0.0:  # nothing to beat (uncompressed)
            continue
        alloc = budget_allocation(costs, base[1] - 1)
        if alloc is not None:
            chosen.setdefault(tuple(sorted(alloc.items(), key=str)), alloc)
    budget_seeds = sorted(chosen.values(), key=lambda c: _total(costs, c)[1])
    if len(budget_seeds) >= n:
        return budget_seeds[:n] if n > 0 else []
    for alloc in allocations(costs, n + len(budget_seeds)):
        if len(chosen) >= n:
            break
        chosen.setdefault(tuple(sorted(alloc.items(), key=str)), alloc)
    return sorted(chosen.values(), key=lambda c: _total(costs, c)[1])


def _method_quantizer(config: Any, space: SearchSpace, ctx: Any) -> Quantizer:
    """The per-layer quantization the trials will run: the pipeline's quantization stage with the
    method the space pins (its cache shared with the trials); round-to-nearest without one."""
    from hydra.utils import get_class

    from hpsearch.configuring import instantiate_checked
    from hpsearch.stages.quantize import Quantize

    stages = config.get("stages") or {}
    nodes = [(name, stages.get(name)) for name in config.get("pipeline") or []]
    found = next(((name, node) for name, node in nodes if node is not None and node.get("_target_")
                  and issubclass(get_class(str(node["_target_"])), Quantize)), None)
    if found is None:
        return _rtn
    stage = instantiate_checked(found[1], f"stages.{found[0]}")
    cache = None
    if stage.cache and not ctx.calibration.sequential:
        from hpsearch.calib import quant_cache_for

        cache = quant_cache_for(ctx.calib)

    def quantize(name: str, w: torch.Tensor, layer: LayerPlan, group_size: int) -> tuple[torch.Tensor, bool]:
        if layer.method not in stage.methods:
            return _rtn(name, w, layer, group_size)
        qw, _ = stage.quantize_layer(stage.methods[layer.method], name, w, layer, group_size, ctx, cache)
        return qw.dequantize(torch.float32), qw.in_scale is not None

    return quantize


def sensitivity_seeds(space: SearchSpace, config: Any, n: int) -> list[dict[str, Any]]:
    """The parameters of ``n`` sensitivity-seeded trials for the study's model and calibration set."""
    from hpsearch.calib import CalibConfig, calibration_for, calibration_tokens
    from hpsearch.manifest import Manifest
    from hpsearch.models import load_model
    from hpsearch.stages.base import StageContext

    options = layer_options(space)
    if not options or n < 1:
        return []
    loaded = load_model(config.model)
    ctx = StageContext(space.structure, Manifest.for_structure("sensitivity", space.structure), loaded.tokenizer,
                       loaded.device, calib=config.get("calib"), source_model=loaded.model)
    needs = {"hessian", "mean_abs"} if any(o[0] < 16 for o in options) else {"hessian"}
    ctx.calibration = calibration_for(ctx, needs).for_model(loaded.model)
    names = [li.name for members in space.units.values() for li in members]
    weights = {name: loaded.model.get_submodule(name).weight.data for name in names}
    hessians = {name: ctx.calibration.layer(name).hessian for name in names}
    calib = CalibConfig.from_mapping(config.get("calib"))
    fisher = output_fisher(loaded.model, calibration_tokens(loaded.tokenizer, calib), names,
                           batch_size=calib.batch_size, device=loaded.device)
    costs = unit_costs(space, weights, hessians, options, _method_quantizer(config, space, ctx), output_weights=fisher)
    return [seed_params(space, a) for a in _seed_allocations(space, costs, n)]
