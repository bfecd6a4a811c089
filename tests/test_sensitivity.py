"""Sensitivity-seeded allocations: Lagrangian choices ordered by memory, allocations at a budget,
the output Fisher, and pinned parameters."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import small_config
from hpsearch.sensitivity import (_seed_allocations, _total, allocations, baseline_bytes, budget_allocation,
                                  layer_options, output_fisher, seed_params, unit_costs)
from hpsearch.space import SearchSpace
from hpsearch.structure import structure_from_config

SPACE = {"granularity": "layer", "layer": {"bits": {"choices": [2, 4, 8, 16]},
                                           "group_size": {"choices": [32, 128], "if": {"bits": [2, 4, 8]}}},
         "fixed": {"method": "rtn"},
         "baselines": {"fp16": {"bits": 16}, "w8": {"bits": 8, "group_size": 128}, "w4": {"bits": 4, "group_size": 128}}}


def _costs():
    s = structure_from_config(small_config("llama", 256))
    space = SearchSpace.from_config(SPACE, s)
    torch.manual_seed(0)
    weights, hessians = {}, {}
    for i, li in enumerate(s.block_linears()):
        weights[li.name] = torch.randn(li.out_features, li.in_features)
        x = torch.randn(256, li.in_features) * (1 + 4 * (i % 3 == 0))  # some layers see larger inputs
        hessians[li.name] = x.T @ x / x.shape[0]
    return space, unit_costs(space, weights, hessians, layer_options(space))


def test_options_and_costs_fall_with_bits_and_bytes_rise():
    space, costs = _costs()
    assert layer_options(space) == [(2, 32), (2, 128), (4, 32), (4, 128), (8, 32), (8, 128), (16, None)]
    for per in costs.values():
        for g in (32, 128):
            errors = [per[(b, g)][0] for b in (2, 4, 8)] + [per[(16, None)][0]]
            sizes = [per[(b, g)][1] for b in (2, 4, 8)] + [per[(16, None)][1]]
            assert errors == sorted(errors, reverse=True) and errors[-1] == 0.0
            assert sizes == sorted(sizes)
        assert per[(4, 32)][1] > per[(4, 128)][1]  # more groups: more scales and zeros


def test_allocations_are_distinct_and_spread_over_memory():
    space, costs = _costs()
    allocs = allocations(costs, 5)
    assert 2 <= len(allocs) <= 5
    sizes = [sum(costs[u][b][1] for u, b in a.items()) for a in allocs]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    # at the same memory, the allocation is never worse than any single uniform choice it matches
    for a, size in zip(allocs, sizes):
        err = _total(costs, a)[0]
        for option in layer_options(space):
            uniform_err, uniform_size = _total(costs, {u: option for u in costs})
            if uniform_size <= size:
                assert err <= uniform_err + 1e-9


def _random_costs(seed: int, units: int = 5):
    g = torch.Generator().manual_seed(seed)
    costs = {}
    for u in range(units):
        sizes = sorted(torch.randint(10, 200, (4,), generator=g).tolist())
        errors = sorted((torch.rand(4, generator=g) * 10).tolist(), reverse=True)
        costs[f"u{u}"] = {o: (e, b) for o, e, b in zip("abcd", errors, sizes)}
    return costs


@pytest.mark.parametrize("seed", range(4))
def test_budget_allocation_fits_and_beats_what_fits(seed):
    costs = _random_costs(seed)
    everything = [dict(zip(costs, combo)) for combo in itertools.product("abcd", repeat=len(costs))]
    low, high = min(_total(costs, c)[1] for c in everything), max(_total(costs, c)[1] for c in everything)
    for budget in torch.linspace(low, high, 7).round().int().tolist():
        alloc = budget_allocation(costs, budget)
        err, size = _total(costs, alloc)
        assert size <= budget
        best = min(_total(costs, c)[0] for c in everything if _total(costs, c)[1] <= budget)
        assert err >= best - 1e-9
        # no Lagrangian (convex hull) or uniform allocation that fits is better
        for lam in [10**e for e in range(-4, 4)]:
            hull = {u: min(per, key=lambda o: per[o][0] + lam * per[o][1]) for u, per in costs.items()}
            if _total(costs, hull)[1] <= budget:
                assert err <= _total(costs, hull)[0] + 1e-9
        # greedy filling stopped: no single unit's upgrade that still fits lowers the error
        for u, per in costs.items():
            for o, (e, b) in per.items():
                if size - per[alloc[u]][1] + b <= budget:
                    assert e >= per[alloc[u]][0] - 1e-9
    assert budget_allocation(costs, low - 1) is None


def test_seeds_sit_under_each_baseline():
    space, costs = _costs()
    allocs = _seed_allocations(space, costs, 4)
    sizes = [_total(costs, a)[1] for a in allocs]
    assert sizes == sorted(sizes)
    for name in ("w8", "w4"):  # fp16 has nothing to beat
        _, size = baseline_bytes(space, costs, name)
        seed = next(a for a in reversed(allocs) if _total(costs, a)[1] < size)  # strictly less memory
        assert _total(costs, seed)[1] >= max(_total(costs, a)[1] for a in allocations(costs, 50)
                                             if _total(costs, a)[1] < size)
        for option in layer_options(space):  # no uniform choice with less memory has a lower error
            uniform_err, uniform_size = _total(costs, {u: option for u in costs})
            if uniform_size < size:
                assert _total(costs, seed)[0] <= uniform_err + 1e-9


def test_output_fisher_matches_autograd(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    fisher = output_fisher(model, ids, names, batch_size=2)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    outputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: outputs.setdefault(n, []).append(out) or out.retain_grad()) for n in names]
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    for h in hooks:
        h.remove()
    for n in names:
        g = outputs[n][0].grad
        torch.testing.assert_close(fisher[n], g.pow(2).reshape(-1, g.shape[-1]).mean(0), rtol=1e-4, atol=1e-10)
        assert fisher[n].shape == (model.get_submodule(n).out_features,)


def test_seed_params_pin_the_allocation():
    space, costs = _costs()
    alloc = allocations(costs, 3)[1]
    params = seed_params(space, alloc)
    plan = space.to_plan(params)
    for unit, (bits, group) in alloc.items():
        for li in space.units[unit]:
            assert plan.layers[li.name].bits == bits
            if bits < 16:
                assert plan.layers[li.name].group_size == group
    plan = space.to_plan(seed_params(space, {u: 4 for u in space.units}, 32))  # bits only, one group size
    assert {(lp.bits, lp.group_size) for lp in plan.layers.values()} == {(4, 32)}
