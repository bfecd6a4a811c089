"""The shape of a causal LM, read from its config without loading weights.

The search space is expanded against this: how many decoder blocks there are, which linear
layers each holds and their shapes. The model is built on the ``meta`` device, so this costs
milliseconds even for a 70B config and works for any architecture transformers can build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LinearInfo", "ModelStructure", "structure_of", "structure_from_config"]


@dataclass(frozen=True)
class LinearInfo:
    """One ``nn.Linear`` of the model.

    Args:
        name: full module name, e.g. ``model.layers.3.self_attn.q_proj``.
        block: index of the decoder block holding it, or -1 outside the blocks (``lm_head``).
        kind: the name inside its block (``self_attn.q_proj``), the layer *type*.
        in_features, out_features: the weight is ``[out_features, in_features]``.
    """

    name: str
    block: int
    kind: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelStructure:
    """Linear layers, block count and attention geometry of a decoder-only model."""

    model_type: str
    blocks_prefix: str
    n_blocks: int
    linears: tuple[LinearInfo, ...]
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    n_params: int
    tied_lm_head: bool = False

    def block_linears(self) -> tuple[LinearInfo, ...]:
        """The linears inside decoder blocks: what per-layer plans address by default."""
        return tuple(li for li in self.linears if li.block >= 0)

    def kinds(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for li in self.block_linears():
            seen.setdefault(li.kind, None)
        return tuple(seen)

    def linear(self, name: str) -> LinearInfo:
        for li in self.linears:
            if li.name == name:
                return li
        raise KeyError(name)


def _blocks_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ``nn.ModuleList`` in the model (``model.layers``,
    ``transformer.h``, ...), so no per-architecture table is needed."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks")
    return best


def structure_of(model: nn.Module) -> ModelStructure:
    """Read the structure of an instantiated model (on any device, ``meta`` included)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    prefix, blocks = _blocks_list(model)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    linears = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        match = pattern.match(name)
        block, kind = (int(match.group(1)), match.group(2)) if match else (-1, name)
        linears.append(
            LinearInfo(name, block, kind, module.in_features, module.out_features, module.bias is not None)
        )
    hidden = text_config.hidden_size
    n_heads = text_config.num_attention_heads
    n_kv = getattr(text_config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // n_heads
    return ModelStructure(
        model_type=text_config.model_type,
        blocks_prefix=prefix,
        n_blocks=len(blocks),
        linears=tuple(linears),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=text_config.vocab_size,
        max_positions=getattr(text_config, "max_position_embeddings", 2048),
        n_params=sum(p.numel() for p in model.parameters()),
        tied_lm_head=_tied(model),
    )


def _tied(model: nn.Module) -> bool:
    """Whether the output projection shares its weight with the input embedding."""
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and inp is not None and out.weight is inp.weight


def structure_from_config(config) -> ModelStructure:
    """Build the model on the ``meta`` device from its config and read its structure."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return structure_of(model)
