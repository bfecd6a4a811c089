"""A trial's plan: what every linear layer and the model as a whole get.

The sweeper turns a trial's Optuna parameters into a :class:`Plan` (see :mod:`hpsearch.space`);
stages read it and never look at Optuna. A layer absent from ``Plan.layers`` stays as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerPlan", "Plan", "LAYER_FIELDS", "ALLOWED_BITS"]

#: Bit-widths a weight may get; 16 means "leave it in 16 bits".
ALLOWED_BITS = (2, 3, 4, 8, 16)


@dataclass(frozen=True)
class LayerPlan:
    """Choices for one ``nn.Linear``.

    Args:
        bits: weight bit-width; 16 leaves the weight unquantized.
        group_size: input channels sharing one scale and zero; -1 is one group per output row.
        sym: symmetric grid (zero fixed at the middle code) instead of asymmetric.
        method: weight quantizer (``rtn``, ``gptq``, ``awq``...), read by the quantization stage.
        sparsity: share of weights set to zero (0 keeps all), read by pruning stages.
        pattern: ``unstructured`` or ``N:M`` (e.g. ``2:4``).
        prune_method: pruning criterion (``magnitude``, ``wanda``, ``sparsegpt``).
        lora_rank: adapter rank for this layer (0: no adapter), read by the recovery stage.
        extra: method-specific choices a stage may read (e.g. ``awq_grid``).
    """

    bits: int = 16
    group_size: int = 128
    sym: bool = False
    method: str = "rtn"
    sparsity: float = 0.0
    pattern: str = "unstructured"
    prune_method: str = "magnitude"
    lora_rank: int = 0
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def effective_group_size(self, in_features: int) -> int:
        """The group size used on a layer with ``in_features`` inputs (whole row when -1 or when
        the group does not divide the row)."""
        g = self.group_size
        if g <= 0 or g >= in_features or in_features % g:
            return in_features
        return g

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerPlan) if f.name != "extra")


@dataclass
class Plan:
    """Per-layer choices (keyed by the linear's module name) and model-wide choices."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> LayerPlan:
        return self.layers.get(name, LayerPlan())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": {n: {**dataclasses.asdict(p), "extra": dict(p.extra)} for n, p in self.layers.items()},
            "model": dict(self.model),
        }
