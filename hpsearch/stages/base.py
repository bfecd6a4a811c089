"""What every compression stage is, and what it is handed.

A stage is configured by its constructor's keyword arguments (its Hydra config, ``_target_``
naming the class; unknown keys are errors). :meth:`Stage.requires` names the calibration
statistics it reads so they are computed (or found in the cache) before it runs; :meth:`Stage.apply`
changes the model in place and records what it did in the manifest.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpsearch.manifest import Manifest
from hpsearch.plan import Plan
from hpsearch.structure import ModelStructure

__all__ = ["Stage", "StageContext"]


@dataclass
class StageContext:
    """What a stage may read besides the model and the plan.

    Attributes:
        structure: linear layers and geometry of the model.
        manifest: the trial's compression manifest, which the stage updates.
        tokenizer: the model's tokenizer.
        device: where the model lives.
        calibration: the study's cached calibration statistics (``None`` when no stage needs any).
        artifacts: what a stage leaves for later ones, e.g. ``quantized[name]`` codes for packing.
        seed: the trial's seed.
        calib: the ``calib`` config node (calibration set, cache directory); ``None``: defaults.
        source_model: the uncompressed model the trial's copy was made from (calibration
            statistics are captured on it and keyed by its content).
    """

    structure: ModelStructure
    manifest: Manifest
    tokenizer: Any
    device: torch.device
    calibration: Any = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    calib: Any = None
    source_model: Any = None


class Stage(abc.ABC):
    """A compression step of the pipeline."""

    def requires(self, plan: Plan) -> frozenset[str]:
        """Calibration statistics this stage reads under ``plan`` (none by default)."""
        return frozenset()

    @abc.abstractmethod
    def apply(self, model: nn.Module, plan: Plan, ctx: StageContext) -> dict[str, Any]:
        """Compress ``model`` in place as ``plan`` says; returns a summary for the manifest."""
