"""A packed model: every quantized linear replaced by the packed module its plan calls for.

The quantization stages leave simulated weights in ``nn.Linear`` layers (for accuracy) and their
codes in ``artifacts["quantized"]``; this swaps those layers for
:class:`hpsearch.kernels.PackedLinear` (real low-bit storage, Triton kernels on CUDA), leaving 16-bit
layers as they are. A layer whose weight no longer equals its codes (a later stage changed it) is
left dense, and said so, rather than packed from stale codes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hpsearch.methods.grid import QuantizedWeight

__all__ = ["pack_model"]


def pack_model(model: nn.Module, quantized: Mapping[str, QuantizedWeight], *, check: bool = True,
               example: torch.Tensor | None = None) -> dict[str, str]:
    """Replace, in place, each linear named in ``quantized`` by a ``PackedLinear``.

    With ``example`` (input ids of a short prompt), packed layers that one forward pass hands the
    same input (q/k/v, gate/up) then run as one launch (:func:`hpsearch.kernels.fuse_packed_siblings`),
    as the measured-latency objective times them, a gated MLP's gate/up launch leaves
    ``silu(gate) * up`` itself (:func:`hpsearch.kernels.fuse_gated_mlps`), and at decode steps on a
    static cache an attention block's q/k/v launch rotates the query and key and writes the cache
    itself (:func:`hpsearch.kernels.fuse_rope_attention`).

    Returns:
        layer name -> ``packed`` (``packed, fused with ...`` for siblings) or the reason it stayed dense.
    """
    from hpsearch.kernels import SUPPORTED_BITS, PackedLinear

    outcome: dict[str, str] = {}
    for name, qw in quantized.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            outcome[name] = f"dense: {type(module).__name__} is not nn.Linear"
            continue
        if qw.bits not in SUPPORTED_BITS:
            outcome[name] = f"dense: no kernel for {qw.bits} bits"
            continue
        weight = module.weight.data
        if check and not torch.equal(qw.dequantize(torch.float32).to(weight.dtype), weight):
            outcome[name] = "dense: weight changed after quantization"
            continue
        device = weight.device
        in_scale = qw.in_scale.to(device, weight.dtype) if qw.in_scale is not None else None
        bias = module.bias.data if module.bias is not None else None
        packed = PackedLinear.from_quantized(qw.q.to(device), qw.scale.to(device), qw.zero.to(device), qw.bits,
                                             qw.group_size, bias=bias, in_scale=in_scale)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
        outcome[name] = "packed"
    if example is not None:
        from hpsearch.kernels import fuse_gated_mlps, fuse_packed_siblings, fuse_rope_attention

        for group in fuse_packed_siblings(model, example):
            for name in group:
                outcome[name] = "packed, fused with " + "+".join(n.rpartition(".")[2] for n in group if n != name)
        for mlp in fuse_gated_mlps(model, example):
            for name in (f"{mlp}.gate_proj", f"{mlp}.up_proj"):
                outcome[name] += "; silu(gate) * up in the same launch"
        for attention in fuse_rope_attention(model, example):
            for name in (f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"):
                outcome[name] += "; rotary embedding and KV-cache write in the same launch at decode steps"
    return outcome
