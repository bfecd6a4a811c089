"""Sensitivity-seeded allocations: Lagrangian choices ordered by memory, and pinned parameters."""

from __future__ import annotations

import torch

from conftest import small_config
from hpsearch.sensitivity import allocations, seed_params, unit_costs
from hpsearch.space import SearchSpace
from hpsearch.structure import structure_from_config

SPACE = {"granularity": "layer", "layer": {"bits": {"choices": [2, 4, 8, 16]},
                                           "group_size": {"choices": [32, 128], "if": {"bits": [2, 4, 8]}}},
         "fixed": {"method": "rtn"}}


def _costs():
    s = structure_from_config(small_config("llama", 256))
    space = SearchSpace.from_config(SPACE, s)
    torch.manual_seed(0)
    weights, hessians = {}, {}
    for i, li in enumerate(s.block_linears()):
        weights[li.name] = torch.randn(li.out_features, li.in_features)
        x = torch.randn(256, li.in_features) * (1 + 4 * (i % 3 == 0))  # some layers see larger inputs
        hessians[li.name] = x.T @ x / x.shape[0]
    return space, unit_costs(space, weights, hessians, [2, 4, 8, 16], 32, False)


def test_costs_fall_with_bits_and_bytes_rise():
    _, costs = _costs()
    for per_bits in costs.values():
        errors = [per_bits[b][0] for b in (2, 4, 8, 16)]
        sizes = [per_bits[b][1] for b in (2, 4, 8, 16)]
        assert errors == sorted(errors, reverse=True) and errors[-1] == 0.0
        assert sizes == sorted(sizes)


def test_allocations_are_distinct_and_spread_over_memory():
    space, costs = _costs()
    allocs = allocations(costs, 5)
    assert 2 <= len(allocs) <= 5
    sizes = [sum(costs[u][b][1] for u, b in a.items()) for a in allocs]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    # at the same memory, the allocation is never worse than any single uniform choice it matches
    for a, size in zip(allocs, sizes):
        err = sum(costs[u][b][0] for u, b in a.items())
        for bits in (2, 4, 8, 16):
            uniform_size = sum(costs[u][bits][1] for u in costs)
            uniform_err = sum(costs[u][bits][0] for u in costs)
            if uniform_size <= size:
                assert err <= uniform_err + 1e-9


def test_seed_params_pin_the_allocation():
    space, costs = _costs()
    alloc = allocations(costs, 3)[1]
    params = seed_params(space, alloc, 32)
    plan = space.to_plan(params)
    for unit, bits in alloc.items():
        for li in space.units[unit]:
            assert plan.layers[li.name].bits == bits
            if bits < 16:
                assert plan.layers[li.name].group_size == 32
