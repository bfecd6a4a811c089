"""GPTQ weight quantization (Frantar et al. 2022), a method of the quantization stage."""

from __future__ import annotations

from typing import Any

import torch

from hpsearch.errors import ConfigError
from hpsearch.methods.gptq import gptq_quantize
from hpsearch.methods.grid import QuantizedWeight
from hpsearch.plan import LayerPlan
from hpsearch.stages.base import StageContext
from hpsearch.stages.quantize import WeightQuantizer

__all__ = ["GPTQ"]


class GPTQ(WeightQuantizer):
    """Quantize with second-order error compensation from the layer's input Hessian.

    Args:
        percdamp: damping as a share of the mean diagonal of ``H``.
        blocksize: columns per lazy batch update.
        act_order: quantize columns by decreasing ``diag(H)`` (with static groups).
        static_groups: fit all group grids on the original weight up front.
        device: where the math runs (``auto``: CUDA when present, else the weight's device).
    """

    def __init__(self, *, percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
                 static_groups: bool = False, device: str = "auto") -> None:
        if not 0.0 < percdamp < 1.0:
            raise ConfigError("percdamp", f"{percdamp!r} is not allowed; allowed: 0 < percdamp < 1")
        if blocksize < 1:
            raise ConfigError("blocksize", f"{blocksize!r} is not allowed; allowed: a positive integer")
        self.percdamp, self.blocksize, self.act_order, self.static_groups = percdamp, blocksize, act_order, static_groups
        self.device = device

    def requires(self) -> frozenset[str]:
        return frozenset({"hessian"})

    def options(self) -> dict[str, Any]:
        return {"percdamp": self.percdamp, "blocksize": self.blocksize, "act_order": self.act_order,
                "static_groups": self.static_groups or self.act_order}

    def _device(self, weight: torch.Tensor) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else weight.device
        return torch.device(self.device)

    def quantize(self, name: str, weight: torch.Tensor, layer: LayerPlan, group_size: int,
                 ctx: StageContext) -> QuantizedWeight:
        H = ctx.calibration.layer(name).hessian
        dev = self._device(weight)
        return gptq_quantize(weight.to(dev), H.to(dev), layer.bits, group_size, layer.sym, percdamp=self.percdamp,
                             blocksize=self.blocksize, act_order=self.act_order, static_groups=self.static_groups)
