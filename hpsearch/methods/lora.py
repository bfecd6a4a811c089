"""LoRA arithmetic: adapter ranks from a plan, adapter sizes and costs, the learning-rate schedule.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) adds to a frozen weight ``W0 [N, K]`` a
low-rank update ``dW = B A`` with ``A [r, K]`` and ``B [N, r]``, scaled by ``alpha / r``:
``h = W0 x + (alpha / r) B A x`` (Equation 3). QLoRA (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314) keeps ``W0`` quantized and the adapters in 16 bits
(Equation 5). Unmerged, an adapter stores ``r (K + N)`` values and costs ``2 r (K + N)`` FLOPs per
token; merged into a 16-bit ``W0`` it costs nothing beyond ``W0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from hpsearch.plan import Plan
from hpsearch.structure import LinearInfo

__all__ = [
    "adapter_flops_per_token",
    "adapter_params",
    "adapter_ranks",
    "distillation_loss",
    "lora_scaling",
    "lr_factor",
    "text_windows",
    "total_bytes",
]


def adapter_ranks(plan: Plan, linears: Iterable[LinearInfo], default_rank: int) -> dict[str, int]:
    """The adapter rank of every layer in ``linears`` that gets one.

    A layer's own ``LayerPlan.lora_rank`` wins when it is positive; otherwise the model-wide
    ``plan.model["lora_rank"]`` applies, or ``default_rank`` when the plan has none. A rank of 0
    means no adapter: a search that sets ranks per layer type, 0 included, also fixes the
    model-wide rank to 0 (``model_fixed: {lora_rank: 0}``) so that its zeros stay zeros.

    Returns:
        Layer name -> rank, for ranks > 0 only, in the order of ``linears``.
    """
    model_rank = int(plan.model.get("lora_rank", default_rank) or 0)
    ranks = {}
    for li in linears:
        r = int(plan.layer(li.name).lora_rank or 0) or model_rank
        if r < 0:
            raise ValueError(f"lora_rank of {li.name} is {r}; ranks are >= 0")
        if r > 0:
            ranks[li.name] = r
    return ranks


def adapter_params(in_features: int, out_features: int, rank: int) -> int:
    """Values of one adapter: ``A [r, K]`` plus ``B [N, r]``."""
    return rank * (in_features + out_features)


def adapter_flops_per_token(in_features: int, out_features: int, rank: int) -> float:
    """FLOPs of an unmerged adapter per token: ``x A^T`` then ``(.) B^T``, two per multiply-add."""
    return 2.0 * adapter_params(in_features, out_features, rank)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """``alpha / r`` (Hu et al., Equation 3), or ``alpha / sqrt(r)`` for rank-stabilised LoRA
    (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lr_factor(step: int, horizon: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then a cosine
    decay to ``min_ratio`` at ``horizon`` (the schedule of the QLoRA paper's runs is constant; a
    short recovery run settles better with a decay)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, horizon - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_bytes(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], dtype_bytes: int) -> int:
    """Storage of the adapters of ``ranks`` (layer -> rank) at ``dtype_bytes`` per value;
    ``shapes`` gives each layer's ``(in_features, out_features)``."""
    return sum(adapter_params(*shapes[name], r) * dtype_bytes for name, r in ranks.items())


def text_windows(text: str, encode: Callable[[list[str]], list[list[int]]], n: int, seq_len: int,
                 generator: torch.Generator, chars_per_token: int = 8) -> torch.Tensor:
    """``n`` blocks of ``seq_len`` tokens from windows of ``text`` at random offsets: ``[n, seq_len]``.

    Only the windows are tokenized, never the whole text (a large training split takes minutes to
    encode on two cores). A window of ``seq_len * chars_per_token`` characters nearly always holds
    ``seq_len`` tokens; one that does not is drawn again twice as wide.
    """
    rows: list[list[int]] = []
    width = seq_len * chars_per_token
    while len(rows) < n:
        width = min(width, len(text))
        starts = torch.randint(0, max(1, len(text) - width + 1), (n - len(rows),), generator=generator)
        ids = encode([text[s : s + width] for s in starts.tolist()])
        rows += [row[:seq_len] for row in ids if len(row) >= seq_len]
        if width == len(text) and len(rows) < n:
            raise ValueError(f"the text has fewer than seq_len={seq_len} tokens")
        width *= 2
    return torch.tensor(rows, dtype=torch.long)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token ``KL(p_teacher || p_student)`` of next-token distributions, times ``T^2``
    (Hinton et al. 2015, https://arxiv.org/abs/1503.02531, Section 2): the compressed model
    learns the uncompressed one's whole distribution, not only the observed token."""
    t = temperature
    log_p_s = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * t * t
