"""KL divergence of the compressed model's next-token distribution from the uncompressed one's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.textdata import token_blocks

__all__ = ["KL", "kl_divergence"]


@torch.no_grad()
def kl_divergence(model: nn.Module, blocks: torch.Tensor, base_logits: torch.Tensor, batch_size: int,
                  device: torch.device) -> float:
    """Mean over tokens of ``KL(p_base || p_model) = sum_v p_base (log p_base - log p_model)``."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        logq = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        logp = F.log_softmax(base_logits[start : start + batch_size].to(device).float(), dim=-1)
        total += float((logp.exp() * (logp - logq)).sum())
        count += ids.numel()
    return total / count


class KL(Objective):
    """KL to the uncompressed model on held-out text; its logits are computed once and cached
    (:func:`hpsearch.calib.baseline_logits`, by model content and tokens).

    Args:
        source: text source (see :mod:`hpsearch.textdata`).
        seq_len: tokens per block.
        max_tokens: evaluated tokens (the cached logits are ``max_tokens x vocab`` float16 values).
        batch_size: blocks per forward pass.
        cache_dir: where the logits are cached (``None``: ``$HPSEARCH_CACHE`` or ``~/.cache/hpsearch``).
    """

    def __init__(self, *, name: str = "kl", direction: str = "minimize", source: str = "embedded:test",
                 seq_len: int = 256, max_tokens: int = 4096, batch_size: int = 8, cache_dir: str | None = None) -> None:
        super().__init__(name=name, direction=direction)
        if max_tokens < seq_len:
            raise ConfigError(f"objectives.{name}.max_tokens", f"{max_tokens} is below seq_len={seq_len}")
        self.source, self.seq_len, self.max_tokens, self.batch_size = source, seq_len, max_tokens, batch_size
        self.cache_dir = cache_dir

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        from hpsearch.calib import baseline_logits

        if ctx.source_model is None:
            raise ValueError("the KL objective needs the uncompressed model (EvalContext.source_model)")
        blocks = token_blocks(ctx.tokenizer, self.source, self.seq_len, max_tokens=self.max_tokens,
                              key=f"objectives.{self.name}.source")
        base = baseline_logits(ctx.source_model, blocks, calib_cfg={"cache_dir": self.cache_dir},
                               batch_size=self.batch_size, device=ctx.device)
        ctx.attrs[f"{self.name}_tokens"] = int(blocks.numel())
        return kl_divergence(model, blocks, base, self.batch_size, ctx.device)
