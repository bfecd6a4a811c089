"""Long-range perplexity: held-out text at the longest context the model supports, read through
the KV cache by chunked prefill (the deployment path), so every chunk attends to the quantized past.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.kvcache import chunk_logits
from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.textdata import token_blocks

__all__ = ["LongPerplexity", "chunked_perplexity"]


@torch.no_grad()
def chunked_perplexity(model: nn.Module, blocks: torch.Tensor, chunk: int, batch_size: int,
                       device: torch.device) -> float:
    """Perplexity over ``blocks`` (``[n, T]``), each prefilled ``chunk`` tokens at a time through a
    fresh :class:`~hpsearch.kvcache.QuantizedKVCache`."""
    total_nll, total_tokens = 0.0, 0
    for first in range(0, blocks.shape[0], batch_size):
        ids = blocks[first:first + batch_size].to(device)
        for start, logits in chunk_logits(model, ids, chunk):
            targets = ids[:, start + 1:start + 1 + logits.shape[1]]
            logits = logits[:, :targets.shape[1]].float()
            total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


class LongPerplexity(Objective):
    """Perplexity at long context through the (quantized) KV cache.

    Args:
        source: held-out text source (see :mod:`hpsearch.textdata`).
        context: tokens per sequence; 0 is the model's ``max_position_embeddings``.
        chunk: prefill chunk (tokens per forward pass through the cache).
        max_tokens: cap on evaluated tokens.
        batch_size: sequences per pass.
    """

    def __init__(self, *, name: str = "long_perplexity", direction: str = "minimize", source: str = "embedded:test",
                 context: int = 0, chunk: int = 64, max_tokens: int = 8192, batch_size: int = 4) -> None:
        super().__init__(name=name, direction=direction)
        for key, value, low in (("context", context, 0), ("chunk", chunk, 1), ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"objectives.{name}.{key}", f"{value!r} is not allowed; allowed: an integer >= {low}")
        self.source, self.context, self.chunk, self.max_tokens, self.batch_size = source, context, chunk, max_tokens, batch_size

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        length = self.context or ctx.structure.max_positions
        blocks = token_blocks(ctx.tokenizer, self.source, length, max_tokens=max(self.max_tokens, length),
                              key=f"objectives.{self.name}.source")
        ctx.attrs[f"{self.name}_context"] = length
        ctx.attrs[f"{self.name}_tokens"] = int(blocks.numel())
        return chunked_perplexity(model, blocks, self.chunk, self.batch_size, ctx.device)
