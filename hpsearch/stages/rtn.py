"""Round-to-nearest weight quantization (min-max grid per group)."""

from __future__ import annotations

import torch

from hpsearch.methods.grid import QuantizedWeight, quantize_rtn
from hpsearch.plan import LayerPlan
from hpsearch.stages.base import StageContext
from hpsearch.stages.quantize import WeightQuantizer

__all__ = ["RTN"]


class RTN(WeightQuantizer):
    """Round each weight to the nearest code of its group's min-max grid; needs no data."""

    def quantize(self, name: str, weight: torch.Tensor, layer: LayerPlan, group_size: int,
                 ctx: StageContext) -> QuantizedWeight:
        return quantize_rtn(weight, layer.bits, group_size, layer.sym)
