"""Latency from a roofline model of a named device: bytes moved and FLOPs per decoded token.

Decoding one token at batch ``B`` and context ``L`` reads every stored weight once (as stored:
packed codes, scales and zeros, sparse metadata), one embedding row per sequence, and the KV cache
(``B * L`` tokens of it); it computes ``2 * B`` FLOPs per multiply-accumulate of every linear
and ``4 * B * L * heads * head_dim`` per block for attention. The time is the larger of bytes over
achievable bandwidth and FLOPs over achievable peak. Values are *modelled*: the trial's attribute
``latency_source`` says ``roofline:<profile>``.
"""

from __future__ import annotations

from torch import nn

from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.objectives.memory import kv_cache_bytes, weight_bytes
from hpsearch.objectives.profiles import DeviceProfile, get_profile
from hpsearch.structure import ModelStructure

__all__ = ["RooflineLatency", "decode_seconds", "prefill_seconds"]


def _embedding_bytes(structure: ModelStructure, dtype_bytes: int) -> int:
    return structure.vocab_size * structure.hidden_size * dtype_bytes


def _linear_flops_per_token(structure: ModelStructure, manifest) -> float:
    """Multiply-accumulates of all linears per token, times two; sparse layers count kept weights."""
    flops = 0.0
    for li in structure.linears:
        density = 1.0 - float(manifest.layers.get(li.name, {}).get("sparsity", 0.0) or 0.0)
        flops += 2.0 * li.numel * density
    return flops + float(manifest.model.get("extra_flops_per_token", 0.0))


def decode_seconds(structure: ModelStructure, manifest, profile: DeviceProfile, batch: int, context: int,
                   dtype_bytes: int = 2) -> float:
    """Modelled time of one decode step (all ``batch`` sequences advance one token)."""
    weights = weight_bytes(structure, manifest, dtype_bytes)
    embedding = _embedding_bytes(structure, dtype_bytes)
    if not structure.tied_lm_head:  # only one row per sequence of the input embedding is read
        weights = weights - embedding + batch * structure.hidden_size * dtype_bytes
    kv = kv_cache_bytes(structure, manifest.model.get("kv_cache"), batch, context)
    flops = batch * _linear_flops_per_token(structure, manifest)
    flops += 4.0 * batch * context * structure.n_heads * structure.head_dim * structure.n_blocks
    t_mem = (weights + kv) / (profile.bandwidth * profile.bandwidth_efficiency)
    t_flops = flops / (profile.peak_flops * profile.flops_efficiency)
    return max(t_mem, t_flops) + profile.launch_overhead_s * structure.n_blocks


def prefill_seconds(structure: ModelStructure, manifest, profile: DeviceProfile, batch: int, prompt: int,
                    dtype_bytes: int = 2) -> float:
    """Modelled time to process a ``prompt``-token prompt for ``batch`` sequences."""
    weights = weight_bytes(structure, manifest, dtype_bytes)
    tokens = batch * prompt
    flops = tokens * _linear_flops_per_token(structure, manifest)
    flops += 2.0 * batch * prompt * prompt * structure.n_heads * structure.head_dim * structure.n_blocks
    kv_write = kv_cache_bytes(structure, manifest.model.get("kv_cache"), batch, prompt)
    t_mem = (weights + kv_write) / (profile.bandwidth * profile.bandwidth_efficiency)
    t_flops = flops / (profile.peak_flops * profile.flops_efficiency)
    return max(t_mem, t_flops) + profile.launch_overhead_s * structure.n_blocks


class RooflineLatency(Objective):
    """Modelled decode latency per token, in milliseconds.

    Args:
        profile: device profile name (``h100``, ``a100``, ``rtx4090``, ``cpu``).
        batch_size, context: deployment shape.
        prompt: prompt length for the prefill figure reported beside it.
        dtype_bytes: bytes per element of what stays uncompressed.
    """

    def __init__(self, *, name: str = "latency_ms", direction: str = "minimize", profile: str = "h100",
                 batch_size: int = 1, context: int = 1024, prompt: int = 512, dtype_bytes: int = 2) -> None:
        super().__init__(name=name, direction=direction)
        self.profile = get_profile(profile)
        self.batch_size, self.context, self.prompt, self.dtype_bytes = batch_size, context, prompt, dtype_bytes

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        s = decode_seconds(ctx.structure, ctx.manifest, self.profile, self.batch_size, self.context, self.dtype_bytes)
        p = prefill_seconds(ctx.structure, ctx.manifest, self.profile, self.batch_size, self.prompt, self.dtype_bytes)
        ctx.attrs.update(latency_source=f"roofline:{self.profile.name}", prefill_ms=p * 1e3,
                         decode_tok_s=self.batch_size / s)
        return s * 1e3
