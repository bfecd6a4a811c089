"""Synthetic needle-in-a-haystack retrieval through the (quantized) KV cache.

A needle ``<key> = "<random digits>"`` is inserted at several depths into held-out text filling
the model's context; the sequence ends with the needle's prefix ``<key> = "`` again, and the
model must continue with the digits it saw once, far back. The whole sequence is prefilled in
chunks through :class:`~hpsearch.kvcache.QuantizedKVCache`, so the needle is read from the
quantized past. The value is the share of needles whose every digit token is the model's argmax
(teacher-forced); per-token accuracy and per-depth rates are trial attributes.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.kvcache import chunk_logits
from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.textdata import token_blocks

__all__ = ["NeedleRetrieval", "needle_batch"]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def needle_batch(tokenizer, haystacks: torch.Tensor, depths: list[float], key: str, digits: int,
                 seed: int) -> tuple[torch.Tensor, int, int]:
    """Sequences with one needle each (haystack ``b`` gets depth ``depths[b]``).

    Returns:
        ``(ids [n, T], answer_start, answer_len)``: the answer's tokens are ``ids[:, answer_start:
        answer_start + answer_len]``; every sequence is ``T`` tokens, haystacks are cut to fit.
    """
    rng = random.Random(seed)
    prefix = _encode(tokenizer, f"\n{key} = \"")
    # A fixed-length answer: digits joined so that every needle tokenizes to the same length.
    values = [_encode(tokenizer, "".join(rng.choice("0123456789") for _ in range(digits))) for _ in depths]
    answer_len = min(len(v) for v in values)
    suffix = _encode(tokenizer, "\"\n")
    length = haystacks.shape[1]
    rows = []
    for hay, depth, value in zip(haystacks.tolist(), depths, values):
        value = value[:answer_len]
        needle = prefix + value + suffix
        keep = length - len(needle) - len(prefix) - answer_len
        if keep < 1:
            raise ConfigError("objectives.needle.context", f"{length} tokens cannot hold the needle")
        hay = hay[:keep]
        at = int(depth * keep)
        rows.append(hay[:at] + needle + hay[at:] + prefix + value)
    return torch.tensor(rows), length - answer_len, answer_len


class NeedleRetrieval(Objective):
    """Share of needles retrieved exactly from deep in the context, through the KV cache.

    Args:
        source: held-out haystack text (see :mod:`hpsearch.textdata`).
        context: tokens per sequence; 0 is the model's ``max_position_embeddings``.
        depths: where the needle sits, as fractions of the haystack.
        samples_per_depth: needles (different haystacks and values) per depth.
        key: the needle's variable name.
        digits: random digits of the value.
        chunk: prefill chunk (tokens per forward pass through the cache).
        batch_size: sequences per pass.
        seed: seed of the values (the same needles in every trial).
    """

    def __init__(self, *, name: str = "needle_acc", direction: str = "maximize", source: str = "embedded:test",
                 context: int = 0, depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
                 samples_per_depth: int = 4, key: str = "SECRET_KEY", digits: int = 6, chunk: int = 64,
                 batch_size: int = 8, seed: int = 1234) -> None:
        super().__init__(name=name, direction=direction)
        depths = tuple(float(d) for d in depths)
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ConfigError(f"objectives.{name}.depths", f"{list(depths)} is not allowed; allowed: fractions in [0, 1]")
        for k, value, low in (("context", context, 0), ("samples_per_depth", samples_per_depth, 1),
                              ("digits", digits, 1), ("chunk", chunk, 1), ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"objectives.{name}.{k}", f"{value!r} is not allowed; allowed: an integer >= {low}")
        self.source, self.context, self.depths, self.samples = source, context, depths, samples_per_depth
        self.key, self.digits, self.chunk, self.batch_size, self.seed = key, digits, chunk, batch_size, seed

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        length = self.context or ctx.structure.max_positions
        n = len(self.depths) * self.samples
        hay = token_blocks(ctx.tokenizer, self.source, length, n_blocks=n, key=f"objectives.{self.name}.source")
        hay = hay.repeat((n + hay.shape[0] - 1) // hay.shape[0], 1)[:n]
        depths = [d for d in self.depths for _ in range(self.samples)]
        ids, answer_start, answer_len = needle_batch(ctx.tokenizer, hay, depths, self.key, self.digits, self.seed)
        correct = []
        for first in range(0, n, self.batch_size):
            batch = ids[first:first + self.batch_size].to(ctx.device)
            predicted = torch.cat([logits.argmax(-1) for _, logits in chunk_logits(model, batch, self.chunk)], dim=1)
            # the token at position p is predicted at p - 1
            guess = predicted[:, answer_start - 1:answer_start - 1 + answer_len]
            correct.append(guess == batch[:, answer_start:answer_start + answer_len])
        hits = torch.cat(correct).cpu()
        exact = hits.all(dim=1).float()
        ctx.attrs[f"{self.name}_token_acc"] = hits.float().mean().item()
        ctx.attrs[f"{self.name}_context"] = length
        ctx.attrs[f"{self.name}_by_depth"] = {
            str(d): exact[i * self.samples:(i + 1) * self.samples].mean().item() for i, d in enumerate(self.depths)
        }
        return exact.mean().item()
