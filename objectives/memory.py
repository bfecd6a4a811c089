"""Exact storage of the compressed model plus its KV cache at the deployment batch and context.

Bytes are counted from the compression manifest, format by format:

* a 16-bit dense weight: ``N*K*2``;
* a ``b``-bit group-wise weight: ``ceil(N*K*b/8)`` bytes of codes, a float16 scale per group,
  and a ``b``-bit zero per group when asymmetric (symmetric zeros are implicit), plus a float16
  per input channel when the layer carries an AWQ input scale;
* a sparse weight (manifest ``sparsity > 0``, ``nnz`` kept weights, see :func:`sparse_format`): the
  kept values at the layer's bits (codes, plus the group scales and zeros, which are unchanged), and
  for ``unstructured`` the smaller of a bitmask (``ceil(N*K/8)``) and a CSR index (16-bit column
  indices per kept weight, 32-bit when ``K > 65536``, plus ``(N + 1)`` 32-bit row pointers); for
  ``N:M`` ``ceil(log2 M)`` bits of position per kept weight (2 for 2:4 as in NVIDIA's format, 3 for
  4:8); the dense format when that is smaller (low sparsity at few bits);
* everything else (embeddings, norms, biases, a ``lm_head`` left in 16 bits) at the deployment
  dtype; a ``lm_head`` tied to the embedding is stored once;
* ``manifest.model["extra_bytes"]``: what stages add beyond weights (adapters, sparse metadata);
* the KV cache: ``2 * blocks * kv_heads * head_dim * context * batch`` values at the KV format
  (``manifest.model["kv_cache"]``, 16 bits when no stage set one).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from hpsearch.manifest import Manifest
from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.structure import ModelStructure

__all__ = ["Memory", "linear_bytes", "sparse_format", "weight_bytes", "kv_cache_bytes", "GB"]

GB = 1e9


def _values_bytes(record: dict[str, Any], count: int, dense_bytes: int) -> int:
    """``count`` stored weight values of a layer at its bits, with its scales and zeros."""
    n, k = record["out_features"], record["in_features"]
    bits = record.get("bits", 16)
    if bits >= 16:
        return count * dense_bytes
    g = record.get("group_size") or k
    groups = n * (k // g)
    codes = math.ceil(count * bits / 8)
    scales = groups * 2
    zeros = 0 if record.get("sym") else math.ceil(groups * bits / 8)
    in_scale = k * 2 if record.get("in_scale") else 0
    return codes + scales + zeros + in_scale


def sparse_format(record: dict[str, Any], dense_bytes: int = 2) -> tuple[str, int]:
    """The cheapest storage of a layer's weight (no bias) and its name: ``dense``, ``bitmask``,
    ``csr`` or ``N:M``.

    The kept values (``record["nnz"]``, else ``round(N*K*(1 - sparsity))``) are stored at the
    layer's bits; metadata is a bitmask of ``ceil(N*K/8)`` bytes or CSR (``nnz`` column indices of
    16 bits, 32 when ``K > 65536``, and ``N + 1`` 32-bit row pointers) for unstructured sparsity,
    ``ceil(nnz * ceil(log2 M) / 8)`` bytes of positions for ``N:M``.
    """
    n, k = record["out_features"], record["in_features"]
    dense = ("dense", _values_bytes(record, n * k, dense_bytes))
    sparsity = float(record.get("sparsity") or 0.0)
    pattern = str(record.get("pattern") or "dense")
    if sparsity <= 0 or pattern == "dense":
        return dense
    nnz = int(record["nnz"]) if record.get("nnz") is not None else round(n * k * (1.0 - sparsity))
    values = _values_bytes(record, nnz, dense_bytes)
    if pattern == "unstructured":
        index_bytes = 2 if k <= 65536 else 4
        candidates = [("bitmask", values + math.ceil(n * k / 8)), ("csr", values + nnz * index_bytes + (n + 1) * 4)]
    else:
        m = int(pattern.split(":")[1])
        candidates = [(pattern, values + math.ceil(nnz * math.ceil(math.log2(m)) / 8))]
    return min([dense, *candidates], key=lambda c: c[1])


def linear_bytes(record: dict[str, Any], dense_bytes: int = 2) -> int:
    """Storage of one linear layer (weight and bias) as its manifest record describes it."""
    n = record["out_features"]
    bias = n * dense_bytes if record.get("bias") else 0
    return sparse_format(record, dense_bytes)[1] + bias


def weight_bytes(structure: ModelStructure, manifest: Manifest, dense_bytes: int = 2) -> int:
    """All weights of the compressed model, in bytes."""
    linear_numel = sum(li.numel + (li.out_features if li.bias else 0) for li in structure.linears)
    lm_head = next((li for li in structure.linears if li.block < 0 and li.kind == "lm_head"), None)
    # A tied lm_head is one tensor with the embedding: counted once by n_params already.
    tied_numel = lm_head.numel if structure.tied_lm_head and lm_head is not None else 0
    other = (structure.n_params - linear_numel + tied_numel) * dense_bytes
    total = other
    for name, record in manifest.layers.items():
        if structure.tied_lm_head and lm_head is not None and name == lm_head.name and record.get("bits", 16) >= 16:
            continue  # shares the embedding's storage
        total += linear_bytes(record, dense_bytes)
    total += sum(int(v) for v in manifest.model.get("extra_bytes", {}).values())
    return total


def kv_cache_bytes(structure: ModelStructure, kv: dict[str, Any] | None, batch: int, context: int) -> int:
    """KV-cache bytes at ``batch`` sequences of ``context`` tokens.

    ``kv`` may give ``bytes_per_token`` (the KV stage's exact count, all layers, K and V, scales and
    zeros included) and ``residual``/``residual_bytes_per_token`` for a full-precision window;
    without it every value is 16 bits. Keys quantized per channel in groups of
    ``key_group_tokens`` tokens wait exact until their group is complete: the
    ``(context - residual) % key_group_tokens`` newest of them cost ``key_pending_bytes_per_token``
    more each.
    """
    per_token_16 = 2 * structure.n_blocks * structure.n_kv_heads * structure.head_dim * 2
    if not kv or "bytes_per_token" not in kv:
        return batch * context * per_token_16
    residual = min(int(kv.get("residual", 0)), context)
    quantized = context - residual
    per_residual = kv.get("residual_bytes_per_token", per_token_16)
    pending = (quantized % max(int(kv.get("key_group_tokens", 1)), 1)) * kv.get("key_pending_bytes_per_token", 0)
    return int(batch * (quantized * kv["bytes_per_token"] + residual * per_residual + pending))


class Memory(Objective):
    """Bytes of weights (as compressed) plus KV cache, in GB (1e9 bytes).

    Args:
        batch_size, context: deployment shape the KV cache is sized for.
        dtype_bytes: bytes per element of what stays uncompressed (2 for float16/bfloat16).
        include_kv: add the KV cache.
    """

    def __init__(self, *, name: str = "memory_gb", direction: str = "minimize", batch_size: int = 1,
                 context: int = 1024, dtype_bytes: int = 2, include_kv: bool = True) -> None:
        super().__init__(name=name, direction=direction)
        self.batch_size, self.context, self.dtype_bytes, self.include_kv = batch_size, context, dtype_bytes, include_kv

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        weights = weight_bytes(ctx.structure, ctx.manifest, self.dtype_bytes)
        kv = kv_cache_bytes(ctx.structure, ctx.manifest.model.get("kv_cache"), self.batch_size, self.context) if self.include_kv else 0
        ctx.attrs.update(weights_bytes=weights, kv_cache_bytes=kv, weights_gb=weights / GB, kv_cache_gb=kv / GB)
        return (weights + kv) / GB
