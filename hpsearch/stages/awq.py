"""AWQ activation-aware scaling (Lin et al. 2023), a method of the quantization stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hpsearch.errors import ConfigError
from hpsearch.methods.awq import DEFAULT_GRID, awq_search
from hpsearch.methods.gptq import gptq_quantize
from hpsearch.methods.grid import QuantizedWeight
from hpsearch.plan import LayerPlan
from hpsearch.stages.base import StageContext
from hpsearch.stages.gptq import clip_shrinks
from hpsearch.stages.quantize import WeightQuantizer

__all__ = ["AWQ"]

_INNER = ("rtn", "gptq")


class AWQ(WeightQuantizer):
    """Scale input channels by ``mean|x|^alpha`` (alpha searched on the cached Hessian), then
    quantize the scaled weight with RTN or GPTQ; the scale is kept as the weight's ``in_scale``.

    Args:
        grid: ``alpha`` values searched (a plan may pin one per layer with ``x_awq_alpha``).
        inner: quantizer of the scaled weight: ``rtn`` (the paper) or ``gptq``.
        clip_search: after the scale search, shrink each group's grid to minimise the output error
            (the paper's weight clipping, scored with the scaled Hessian); with ``inner: gptq`` the
            clipping search of GPTQ's grids.
        clip_steps, clip_max_shrink: the range factors tried, ``1 - clip_max_shrink * i / clip_steps``.
        percdamp, blocksize, act_order: GPTQ options when ``inner`` is ``gptq``.
    """

    def __init__(self, *, grid: Sequence[float] = DEFAULT_GRID, inner: str = "rtn", clip_search: bool = True,
                 clip_steps: int = 20, clip_max_shrink: float = 0.5, percdamp: float = 0.01,
                 blocksize: int = 128, act_order: bool = True) -> None:
        if inner not in _INNER:
            raise ConfigError("inner", f"{inner!r} is not allowed; allowed: {', '.join(_INNER)}")
        if not grid or any(not 0.0 <= float(a) <= 1.0 for a in grid):
            raise ConfigError("grid", f"{list(grid)!r} is not allowed; allowed: alphas in [0, 1]")
        self.grid = tuple(float(a) for a in grid)
        self.inner, self.percdamp, self.blocksize, self.act_order = inner, percdamp, blocksize, act_order
        self.clip_search, self.clip_steps, self.clip_max_shrink = clip_search, clip_steps, clip_max_shrink
        self.shrinks = clip_shrinks(clip_search, clip_steps, clip_max_shrink)

    def requires(self) -> frozenset[str]:
        return frozenset({"hessian", "mean_abs"})

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"grid": list(self.grid), "inner": self.inner}
        if self.clip_search:
            opts.update(clip_steps=self.clip_steps, clip_max_shrink=self.clip_max_shrink)
        if self.inner == "gptq":
            opts.update(percdamp=self.percdamp, blocksize=self.blocksize, act_order=self.act_order)
        return opts

    def quantize(self, name: str, weight: torch.Tensor, layer: LayerPlan, group_size: int,
                 ctx: StageContext) -> QuantizedWeight:
        stats = ctx.calibration.layer(name)
        dev = torch.device("cuda") if torch.cuda.is_available() else weight.device
        grid = (float(layer.get("x_awq_alpha")),) if layer.get("x_awq_alpha") is not None else self.grid
        final = None
        if self.inner == "gptq":
            def final(w: torch.Tensor, h: torch.Tensor) -> QuantizedWeight:
                return gptq_quantize(w, h, layer.bits, group_size, layer.sym, percdamp=self.percdamp,
                                     blocksize=self.blocksize, act_order=self.act_order, clip_shrinks=self.shrinks)
        qw, alpha, _ = awq_search(weight.to(dev), stats.hessian.to(dev), stats.mean_abs.to(dev), layer.bits,
                                  group_size, layer.sym, grid=grid, final=final,
                                  clip_shrinks=self.shrinks if self.inner == "rtn" else None)
        return qw
