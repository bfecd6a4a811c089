"""GPTQ weight quantization (Frantar et al. 2022), a method of the quantization stage."""

from __future__ import annotations

from typing import Any

import torch

from hpsearch.errors import ConfigError
from hpsearch.methods.clip import shrink_grid
from hpsearch.methods.gptq import gptq_quantize
from hpsearch.methods.grid import QuantizedWeight
from hpsearch.plan import LayerPlan
from hpsearch.stages.base import StageContext
from hpsearch.stages.quantize import WeightQuantizer

__all__ = ["GPTQ", "clip_shrinks"]


class GPTQ(WeightQuantizer):
    """Quantize with second-order error compensation from the layer's input Hessian.

    Args:
        percdamp: damping as a share of the mean diagonal of ``H``.
        blocksize: columns per lazy batch update.
        act_order: quantize columns by decreasing ``diag(H)`` (with static groups).
        static_groups: fit all group grids on the original weight up front.
        clip_search: shrink each group's grid to minimise ``tr(dW H dW^T)`` (the reference code's
            ``mse`` option, scored with the Hessian); ``False``: min-max grids.
        clip_steps, clip_max_shrink: the range factors tried, ``1 - clip_max_shrink * i / clip_steps``.
        device: where the math runs (``auto``: CUDA when present, else the weight's device).
    """

    def __init__(self, *, percdamp: float = 0.01, blocksize: int = 128, act_order: bool = True,
                 static_groups: bool = False, clip_search: bool = True, clip_steps: int = 20,
                 clip_max_shrink: float = 0.5, device: str = "auto") -> None:
        if not 0.0 < percdamp < 1.0:
            raise ConfigError("percdamp", f"{percdamp!r} is not allowed; allowed: 0 < percdamp < 1")
        if blocksize < 1:
            raise ConfigError("blocksize", f"{blocksize!r} is not allowed; allowed: a positive integer")
        self.percdamp, self.blocksize, self.act_order, self.static_groups = percdamp, blocksize, act_order, static_groups
        self.clip_search, self.clip_steps, self.clip_max_shrink = clip_search, clip_steps, clip_max_shrink
        self.shrinks = clip_shrinks(clip_search, clip_steps, clip_max_shrink)
        self.device = device

    def requires(self) -> frozenset[str]:
        return frozenset({"hessian"})

    def options(self) -> dict[str, Any]:
        opts = {"percdamp": self.percdamp, "blocksize": self.blocksize, "act_order": self.act_order,
                "static_groups": self.static_groups or self.act_order}
        if self.clip_search:
            opts.update(clip_steps=self.clip_steps, clip_max_shrink=self.clip_max_shrink)
        return opts

    def _device(self, weight: torch.Tensor) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else weight.device
        return torch.device(self.device)

    def quantize(self, name: str, weight: torch.Tensor, layer: LayerPlan, group_size: int,
                 ctx: StageContext) -> QuantizedWeight:
        H = ctx.calibration.layer(name).hessian
        dev = self._device(weight)
        return gptq_quantize(weight.to(dev), H.to(dev), layer.bits, group_size, layer.sym, percdamp=self.percdamp,
                             blocksize=self.blocksize, act_order=self.act_order, static_groups=self.static_groups,
                             clip_shrinks=self.shrinks)


def clip_shrinks(clip_search: bool, clip_steps: int, clip_max_shrink: float) -> tuple[float, ...] | None:
    """The range factors of the clipping search (``None`` when off); bad values are config errors."""
    if not clip_search:
        return None
    if clip_steps < 1:
        raise ConfigError("clip_steps", f"{clip_steps!r} is not allowed; allowed: a positive integer")
    if not 0.0 < clip_max_shrink < 1.0:
        raise ConfigError("clip_max_shrink", f"{clip_max_shrink!r} is not allowed; allowed: 0 < clip_max_shrink < 1")
    return shrink_grid(clip_steps, clip_max_shrink)
