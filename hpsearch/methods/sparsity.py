"""Pruning masks: magnitude, Wanda, N:M patterns and OWL's layer-wise sparsity allocation.

A mask is a bool tensor shaped like the weight ``W`` ``[N, K]`` (out, in), ``True`` where the
weight is *kept*. Scores are "importance": the lowest-scored weights are removed.

* Magnitude: ``S_ij = |W_ij|``, one threshold for the whole layer.
* Wanda (Sun et al. 2023, https://arxiv.org/abs/2306.11695): ``S_ij = |W_ij| * ||X_j||_2``
  (Equation (1)), compared within each output row ``i`` (Section 3, "comparison group").
* ``N:M`` (NVIDIA's semi-structured convention): at most ``N`` kept weights in every ``M``
  consecutive input channels of a row, so ``2:4`` and ``4:8`` are 50% sparse.
* OWL (Yin et al. 2023, https://arxiv.org/abs/2310.05175): blocks with more outliers
  (``S_ij > M * mean(S)``, Section 4 "layerwise outlier distribution") keep more weights; the
  sparsity of block ``l`` is ``S - (r_l - mean(r))`` with the outlier ratios ``D_l`` min-max mapped to
  ``r_l in [0, 2*lambda]`` (Section 4.2), so the mean sparsity is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "magnitude_scores",
    "mask_codes",
    "nm_mask",
    "nm_valid",
    "outlier_ratio",
    "owl_offsets",
    "owl_sparsities",
    "parse_pattern",
    "pattern_sparsity",
    "prune_mask",
    "realised_sparsity",
    "row_mask",
    "unstructured_mask",
    "wanda_scores",
]


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``(N, M)`` of an ``"N:M"`` pattern, ``None`` for ``unstructured`` (or dense/None).

    Raises:
        ValueError: ``pattern`` is neither ``unstructured`` nor ``N:M`` with ``0 < N < M``.
    """
    if pattern in (None, "", "unstructured", "dense"):
        return None
    parts = str(pattern).split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
        raise ValueError(f"pattern {pattern!r}: use unstructured or N:M with 0 < N < M (2:4, 4:8)")
    return int(parts[0]), int(parts[1])


def pattern_sparsity(pattern: str | None, sparsity: float) -> float:
    """The sparsity a layer gets: ``1 - N/M`` for ``N:M``, else the plan's ``sparsity``."""
    nm = parse_pattern(pattern)
    return 1.0 - nm[0] / nm[1] if nm else float(sparsity)


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32."""
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (Wanda, Equation (1)); ``x_norm`` is ``[K]``."""
    return w.detach().float().abs() * x_norm.float().reshape(1, -1)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``round(N*K*sparsity)`` lowest scores of the whole layer."""
    n_prune = round(scores.numel() * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.topk(scores.flatten(), n_prune, largest=False).indices
        mask.view(-1)[idx] = False
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``round(K*sparsity)`` lowest scores of every output row (Wanda's group)."""
    n_prune = round(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.topk(scores, n_prune, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive input channels of each row.

    Raises:
        ValueError: ``m`` does not divide the number of input channels.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def prune_mask(scores: torch.Tensor, sparsity: float, pattern: str | None, per_row: bool) -> torch.Tensor:
    """The mask of a pattern: ``N:M`` groups, else per row (``per_row``) or per layer."""
    nm = parse_pattern(pattern)
    if nm:
        return nm_mask(scores, *nm)
    return row_mask(scores, sparsity) if per_row else unstructured_mask(scores, sparsity)


def realised_sparsity(w: torch.Tensor) -> float:
    """Share of exact zeros in ``w``."""
    return float((w == 0).sum().item()) / w.numel()


def nm_valid(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row keeps at most ``n`` weights."""
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """OWL's layerwise outlier distribution ``D``: share of scores above ``m`` times their layer's
    mean, over all the given linears of one block (Section 4, Equation (2))."""
    outliers = sum(int((s > m * s.mean()).sum().item()) for s in scores)
    total = sum(s.numel() for s in scores)
    return outliers / max(total, 1)


def owl_offsets(ratios: Mapping[int, float], lam: float) -> dict[int, float]:
    """OWL's per-block deviation from the mean sparsity (Section 4.2): ``S_l - S = -(r_l - mean r)``
    with ``r_l = 2*lambda * (D_l - min D) / (max D - min D)``: more outliers, fewer weights removed.

    Args:
        ratios: block index -> outlier ratio ``D_l`` (:func:`outlier_ratio`).
        lam: ``lambda``, the largest deviation from the mean.
    """
    if not ratios:
        return {}
    lo, hi = min(ratios.values()), max(ratios.values())
    span = hi - lo
    r = {b: (2 * lam * (d - lo) / span if span > 0 else lam) for b, d in ratios.items()}
    mean_r = sum(r.values()) / len(r)
    return {b: -(rb - mean_r) for b, rb in r.items()}


def owl_sparsities(ratios: Mapping[int, float], target: float, lam: float,
                   max_sparsity: float = 0.99) -> dict[int, float]:
    """Per-block sparsity ``S_l = S + (S_l - S)`` of OWL, clipped to ``[0, max_sparsity]``."""
    return {b: min(max(target + o, 0.0), max_sparsity) for b, o in owl_offsets(ratios, lam).items()}


def mask_codes(q: torch.Tensor, zero: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    """Codes with every pruned weight set to its group's zero point, which dequantizes to exactly 0
    (``(z - z) * s``), so a quantized sparse layer stores only its kept codes."""
    k = q.shape[1]
    z = zero.to(q.dtype).repeat_interleave(group_size, dim=1)[:, :k]
    return torch.where(mask.to(q.device), q, z)

