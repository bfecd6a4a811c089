"""Held-out perplexity: exp of the mean next-token negative log-likelihood."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.textdata import token_blocks

__all__ = ["Perplexity", "perplexity"]


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Perplexity over ``blocks`` (``[n, seq_len]`` token ids), each block scored on its own."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


class Perplexity(Objective):
    """Perplexity on held-out text, the same tokens in every trial.

    Args:
        source: text source (see :mod:`hpsearch.textdata`); the embedded model's ``test`` split
            is never used for training or calibration.
        seq_len: tokens per block.
        max_tokens: cap on evaluated tokens (a cheap proxy for every trial).
        batch_size: blocks per forward pass.
    """

    def __init__(self, *, name: str = "perplexity", direction: str = "minimize", source: str = "embedded:test",
                 seq_len: int = 256, max_tokens: int = 16384, batch_size: int = 8) -> None:
        super().__init__(name=name, direction=direction)
        self.source, self.seq_len, self.max_tokens, self.batch_size = source, seq_len, max_tokens, batch_size

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        blocks = token_blocks(ctx.tokenizer, self.source, self.seq_len, max_tokens=self.max_tokens,
                              key=f"objectives.{self.name}.source")
        ctx.attrs[f"{self.name}_tokens"] = int(blocks.numel())
        return perplexity(model, blocks, self.batch_size, ctx.device)
