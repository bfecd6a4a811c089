"""Real failing parts for the sweeper's failure paths: a stage that raises and an objective that
returns NaN, each under a plan condition, configured through ``_target_`` like any other part."""

from __future__ import annotations

import math

from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.stages.base import Stage


class FailOnBits(Stage):
    """Raises when the plan gives any layer ``bits`` bits."""

    def __init__(self, *, bits: int) -> None:
        self.bits = bits

    def apply(self, model, plan, ctx):
        if any(layer.bits == self.bits for layer in plan.layers.values()):
            raise RuntimeError(f"refusing {self.bits}-bit layers")
        return {}


class NaNOnBits(Objective):
    """NaN when any layer of the manifest has ``bits`` bits, else the number of such layers (0)."""

    def __init__(self, *, name: str = "nan_probe", direction: str = "minimize", bits: int = 3) -> None:
        super().__init__(name=name, direction=direction)
        self.bits = bits

    def evaluate(self, model, ctx: EvalContext) -> float:
        hit = any(r.get("bits") == self.bits for r in ctx.manifest.layers.values())
        return math.nan if hit else 0.0
