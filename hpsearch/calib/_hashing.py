"""Content fingerprints of tensors and models: the cache keys' model part.

A fingerprint reads every bit of a tensor (as integers) and mixes it with its position, on the
tensor's own device, so hashing a 7B model on a GPU takes about a second and changing any single
weight changes the fingerprint. It is not cryptographic: it guards against stale caches, not
against adversaries.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["tensor_fingerprint", "model_fingerprint", "digest"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_C1 = 0x5851F42D4C957F2D  # odd 63-bit multipliers (PCG / splitmix constants)
_C2 = 0x2545F4914F6CDD1D
_CHUNK = 1 << 22


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (hex, 32 characters)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


@torch.no_grad()
def tensor_fingerprint(t: torch.Tensor) -> str:
    """Hex fingerprint of a tensor's dtype, shape and every bit of its content."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    words = flat.view(_INT_VIEW[flat.element_size()])
    h1 = torch.zeros((), dtype=torch.int64, device=flat.device)
    h2 = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, words.numel(), _CHUNK):
        v = words[start : start + _CHUNK].to(torch.int64)
        idx = torch.arange(start, start + v.numel(), device=v.device, dtype=torch.int64)
        odd = 2 * idx + 1  # every position gets an odd (invertible mod 2^64) multiplier
        h1 += (v * (odd * _C1)).sum()
        h2 += ((v ^ (idx * _C2)) * odd).sum()
    return f"{str(t.dtype)}:{tuple(t.shape)}:{int(h1) & (2**64 - 1):016x}{int(h2) & (2**64 - 1):016x}"


_MODEL_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of every parameter and buffer of ``model`` (computed once per model object).

    The pristine model a process loads is never modified (trials work on copies), so the value is
    kept per object; a model whose weights are changed in place must be hashed with
    :func:`tensor_fingerprint` instead.
    """
    cached = _MODEL_HASHES.get(model)
    if cached is None:
        parts = [(name, tensor_fingerprint(t)) for name, t in model.state_dict(keep_vars=True).items()]
        cached = digest([type(model).__name__, parts])
        _MODEL_HASHES[model] = cached
    return cached
