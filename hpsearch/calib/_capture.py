"""Input statistics of linear layers, captured with forward hooks (written once, here).

Per linear layer, over every calibration token ``x`` (its input, ``[K]``):

* ``hessian``: ``H = E[x x^T]`` ``[K, K]`` in float32 (GPTQ's ``2 X X^T / n`` without the
  constant 2), accumulated as a running mean over batches exactly like GPTQ's ``add_batch``:
  ``H <- H n/(n+m) + X_b^T X_b / (n+m)``, so no sum over a million tokens ever grows large;
* ``mean_abs``: ``E|x_j|`` ``[K]`` (AWQ), running mean the same way;
* ``max_abs``: ``max |x_j|`` ``[K]`` (SmoothQuant).

Layers fed the very same input tensor (``q_proj``, ``k_proj`` and ``v_proj`` of one attention
block; ``gate_proj`` and ``up_proj``) share one set of statistics: the later ones are recorded as
*aliases* of the first, which saves a third of the memory and time on a Llama.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerStats", "StatsAccumulator", "capture", "STAT_NAMES"]

#: Statistics a stage may ask for in :meth:`~hpsearch.stages.base.Stage.requires`.
STAT_NAMES = ("hessian", "mean_abs", "max_abs")


@dataclass
class LayerStats:
    """Input statistics of one linear layer (see the module docstring)."""

    hessian: torch.Tensor
    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    n_tokens: int


class StatsAccumulator:
    """Running statistics of one layer's inputs (GPTQ's ``add_batch`` protocol)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.H = torch.zeros(k, k, device=device, dtype=torch.float32)
        self.mean_abs = torch.zeros(k, device=device, dtype=torch.float32)
        self.max_abs = torch.zeros(k, device=device, dtype=torch.float32)
        self.n = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        total = self.n + m
        self.H.mul_(self.n / total)
        self.mean_abs.mul_(self.n / total)
        xs = x * math.sqrt(1.0 / total)
        self.H.addmm_(xs.T, xs)
        self.mean_abs.add_(x.abs().sum(dim=0) / total)
        torch.maximum(self.max_abs, x.abs().amax(dim=0), out=self.max_abs)
        self.n = total

    def result(self) -> LayerStats:
        return LayerStats(self.H, self.mean_abs, self.max_abs, self.n)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layers of interest have run."""


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, names: Iterable[str], *, batch_size: int,
            device: torch.device, stop_at: nn.Module | None = None, progress: bool = False,
            counter: list[int] | None = None) -> tuple[dict[str, LayerStats], dict[str, str]]:
    """Run ``input_ids`` (``[n, seq_len]``) through ``model`` and collect the input statistics of
    the linear layers ``names``.

    Args:
        stop_at: end each forward pass after this module ran (sequential calibration of one block).
        counter: ``counter[0]`` is increased by one per forward pass (tests count passes).

    Returns:
        ``(stats, aliases)``: statistics per layer that owns them, and ``alias -> owner`` for layers
        that were fed the same input tensor as an earlier one.
    """
    names = list(names)
    accs: dict[str, StatsAccumulator] = {}
    aliases: dict[str, str] = {}
    last: list = [None, None]  # (input tensor, owner) of the most recent hooked call

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if last[0] is x and name not in accs:
                aliases[name] = last[1]
                return
            if name in aliases:
                return
            if name not in accs:
                accs[name] = StatsAccumulator(x.shape[-1], x.device)
            accs[name].add_batch(x)
            last[0], last[1] = x, name
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    if stop_at is not None:
        def stop(module: nn.Module, args: tuple, output) -> None:
            raise _StopForward
        handles.append(stop_at.register_forward_hook(stop))
    starts = range(0, input_ids.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="calibration statistics", unit="batch", leave=False)
    try:
        for start in starts:
            ids = input_ids[start : start + batch_size].to(device)
            if counter is not None:
                counter[0] += 1
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
    return {n: a.result() for n, a in accs.items()}, aliases
