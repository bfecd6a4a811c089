"""The objective interface: a name, a direction, and a value for a compressed model."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.manifest import Manifest
from hpsearch.structure import ModelStructure

__all__ = ["Objective", "EvalContext", "DIRECTIONS"]

DIRECTIONS = ("minimize", "maximize")


@dataclass
class EvalContext:
    """What an objective may read besides the model.

    Attributes:
        structure: geometry of the model.
        manifest: what the stages did (bits, sparsity, adapters, KV format per layer).
        tokenizer: the model's tokenizer.
        device: where the model lives.
        deployment: batch size, context length and dtype the model will be served with.
        attrs: extra facts an objective reports (stored as trial user attributes).
        artifacts: what the stages left (e.g. quantized codes), for objectives that pack.
        source_model: the uncompressed model (for objectives comparing against it, e.g. KL).
    """

    structure: ModelStructure
    manifest: Manifest
    tokenizer: Any
    device: torch.device
    deployment: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    source_model: Any = None


class Objective(abc.ABC):
    """One value of the study's objective vector.

    Args:
        name: the metric name shown in optuna-dashboard, the report and W&B.
        direction: ``minimize`` or ``maximize``.
    """

    def __init__(self, *, name: str, direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ConfigError(f"objectives.{name}.direction", f"{direction!r} is not allowed; allowed: minimize, maximize")
        self.name = name
        self.direction = direction

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        """The objective's value for ``model``."""
