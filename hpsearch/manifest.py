"""The compression manifest: what a trial did to each layer, written next to the trial.

Stages record per-layer facts (bits, group size, sparsity pattern, adapter size...) and a line
per stage; the memory and latency objectives and the exporter read only this, never the plan,
so what is reported is what was done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpsearch.structure import ModelStructure

__all__ = ["Manifest"]


@dataclass
class Manifest:
    """Per-layer records, per-stage records and model-wide facts of one compressed model."""

    model_name: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_structure(cls, model_name: str, structure: ModelStructure) -> Manifest:
        """Every linear starts as an untouched 16-bit dense layer."""
        layers = {
            li.name: {
                "kind": li.kind,
                "block": li.block,
                "in_features": li.in_features,
                "out_features": li.out_features,
                "bias": li.bias,
                "bits": 16,
                "group_size": None,
                "sym": None,
                "method": None,
                "sparsity": 0.0,
                "pattern": "dense",
                "lora_rank": 0,
            }
            for li in structure.linears
        }
        return cls(model_name=model_name, layers=layers)

    def update_layer(self, name: str, **facts: Any) -> None:
        self.layers[name].update(facts)

    def add_stage(self, name: str, target: str, seconds: float, summary: dict[str, Any]) -> None:
        self.stages.append({"name": name, "target": target, "seconds": round(seconds, 4), **summary})

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "stages": self.stages, "model": self.model, "layers": self.layers}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        return path

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of the per-layer records (for W&B tables and reports)."""
        keys: dict[str, None] = {}
        for record in self.layers.values():
            keys.update(dict.fromkeys(record))
        rows = [[name, *(record.get(k) for k in keys)] for name, record in self.layers.items()]
        return ["layer", *keys], rows
