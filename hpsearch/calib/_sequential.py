"""Sequential calibration: each block's statistics captured on the partly compressed model.

GPTQ's reference implementation calibrates block after block: the inputs of block ``i`` are the
outputs of blocks ``0..i-1`` *after* they were quantized, so each layer compensates the error the
layers before it made. :class:`SequentialCalibration` gives that: when a stage asks for a layer's
statistics, the calibration tokens run through the trial's model (whose earlier blocks the stage
has already compressed) up to that layer's block, and stop there. Statistics then depend on the
trial's plan, so they are never cached and neither are the quantized weights; each block costs one
truncated pass (about ``n_blocks / 2`` full passes per trial in all).
"""

from __future__ import annotations

import torch
from torch import nn

from hpsearch.calib._capture import LayerStats, capture
from hpsearch.structure import ModelStructure

__all__ = ["SequentialCalibration"]


class SequentialCalibration:
    """Statistics captured lazily, one block at a time, on the model being compressed.

    Args:
        structure: the model's linear layers and blocks.
        input_ids: calibration tokens ``[n, seq_len]``.
        batch_size: sequences per forward pass.
        device: where the model runs.
        model: the model being compressed (bound by :meth:`for_model`).
    """

    sequential = True
    key = None

    def __init__(self, structure: ModelStructure, input_ids: torch.Tensor, batch_size: int,
                 device: torch.device, model: nn.Module | None = None) -> None:
        self.structure, self.input_ids, self.batch_size, self.device = structure, input_ids, batch_size, device
        self.model = model
        self._stats: dict[str, LayerStats] = {}
        self._aliases: dict[str, str] = {}
        self.passes = [0]

    def for_model(self, model: nn.Module) -> SequentialCalibration:
        """A view capturing on ``model``, the one the calling stage is compressing."""
        if model is self.model:
            return self
        return SequentialCalibration(self.structure, self.input_ids, self.batch_size, self.device, model)

    def _capture_block(self, block: int) -> None:
        if self.model is None:
            raise RuntimeError("sequential calibration needs for_model(model) before layer()")
        names = [li.name for li in self.structure.linears if li.block == block]
        stop = None
        if block >= 0:
            stop = self.model.get_submodule(f"{self.structure.blocks_prefix}.{block}")
        stats, aliases = capture(self.model, self.input_ids, names, batch_size=self.batch_size,
                                 device=self.device, stop_at=stop, counter=self.passes)
        self._stats.update(stats)
        self._aliases.update(aliases)

    def owner(self, name: str) -> str:
        return self._aliases.get(name, name)

    def layer(self, name: str) -> LayerStats:
        """Statistics of ``name``'s input as the model is now (its block is captured on first use)."""
        if self.owner(name) not in self._stats:
            self._capture_block(self.structure.linear(name).block)
        return self._stats[self.owner(name)]
