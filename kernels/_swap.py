"""Forward swaps: a module's class replaced by a subclass whose ``forward`` runs fused kernels.

:func:`fuse_gated_mlps` and :func:`fuse_rope_attention` change how a transformers module computes,
not what it holds: each swaps the module's class for one subclass per original class and fusion
(so ``torch.compile`` sees an ordinary method), checks the result, and restores the class where
the check fails. The state dict never changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["difference", "restore", "swapped_class", "unswap"]


@functools.cache
def swapped_class(cls: type, fusion: str, forward: Callable) -> type:
    """``cls`` with ``forward``, named ``<fusion><cls>``; it remembers ``cls`` to be restored."""
    return type(f"{fusion}{cls.__name__}", (cls,), {"forward": forward, "_hpsearch_unfused": cls,
                                                    "_hpsearch_fusion": fusion})


def restore(module: nn.Module) -> None:
    """Give a swapped module its original class back."""
    module.__class__ = type(module)._hpsearch_unfused


def unswap(model: nn.Module, fusion: str) -> int:
    """Restore every module of ``model`` swapped for ``fusion``; returns how many."""
    swapped = [m for m in model.modules() if getattr(type(m), "_hpsearch_fusion", None) == fusion]
    for module in swapped:
        restore(module)
    return len(swapped)


def difference(before: torch.Tensor, after: torch.Tensor) -> float:
    """Largest difference over the largest output; infinite if they disagree on what is finite."""
    finite = torch.isfinite(before)
    if not torch.equal(finite, torch.isfinite(after)):
        return float("inf")
    if not finite.any():
        return 0.0
    b, a = before[finite].float(), after[finite].float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
