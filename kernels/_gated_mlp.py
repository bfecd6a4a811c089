"""Gated MLPs of packed layers run as two launches: gate/up with ``silu(gate) * up`` in its
epilogue (:func:`packed_gated_matmul`), then down_proj.

:func:`fuse_gated_mlps` does this to the MLPs of a transformers model that have the Llama-family
shape (``gate_proj``, ``up_proj``, ``down_proj``, a SiLU ``act_fn``; Mistral, Qwen2/3 and others
share it) once their packed gate and up layers run as one sibling group
(:func:`fuse_packed_siblings`, called before it with the same example). It swaps such an MLP's class for a subclass
whose ``forward`` is ``down_proj(silu(gate) * up)`` from that one launch; the state dict and every
other module are untouched. It checks each MLP on the input the example forward pass handed it:
an MLP whose output changes (a forward that is not ``down(act(gate(x)) * up(x))``) is restored and
left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._siblings import PackedSibling, input_calls
from ._swap import difference, restore, swapped_class, unswap

__all__ = ["fuse_gated_mlps", "unfuse_gated_mlps"]


def fuse_gated_mlps(model: nn.Module, *args, rtol: float = 1e-2, **kwargs) -> list[str]:
    """Run the gated MLPs of ``model`` as gate/up with ``silu(gate) * up`` folded in, then down.

    Call :func:`fuse_packed_siblings` first: only MLPs whose gate and up are one sibling group are
    taken. ``model(*args, **kwargs)`` is an example forward pass; it gives each MLP an input to
    check itself on, with a random one of the same shape (the fused MLP's outputs must stay within
    ``rtol`` of the largest output).
    Returns the fused MLPs' names, in place.
    """
    candidates = [name for name, module in model.named_modules() if _is_gated_mlp(module)]
    inputs: dict[str, torch.Tensor] = {}
    for name, x in input_calls(model, candidates, *args, **kwargs):
        inputs.setdefault(name, x)
    fused = []
    for name in candidates:
        mlp, x = model.get_submodule(name), inputs.get(name)
        if x is None:
            continue
        # and on a random input of its shape: an example of padding tokens may hand it zeros, which
        # every MLP without biases maps to zeros
        probes = [x, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)]
        with torch.no_grad():
            before = [mlp(p) for p in probes]
            mlp.__class__ = swapped_class(type(mlp), "Gated", _gated_forward)
            after = [mlp(p) for p in probes]
        if all(difference(b, a) <= rtol for b, a in zip(before, after)):
            fused.append(name)
        else:
            restore(mlp)
    return fused


def unfuse_gated_mlps(model: nn.Module) -> int:
    """Undo :func:`fuse_gated_mlps` (the sibling groups stay); returns how many MLPs."""
    return unswap(model, "Gated")


def _is_gated_mlp(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is a gated SiLU MLP whose gate and up are one sibling group of exactly these
    two, gate first (the rows ``gemv_h2``'s ``GATED`` epilogue pairs)."""
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    return (isinstance(gate, PackedSibling) and isinstance(up, PackedSibling) and gate.group is up.group
            and (gate.index, up.index) == (0, 1) and len(gate.group.bounds) == 3
            and gate.out_features == up.out_features and hasattr(mlp, "down_proj")
            and _is_silu(getattr(mlp, "act_fn", None)))


def _is_silu(act: nn.Module | None) -> bool:
    if not callable(act):
        return False
    probe = torch.linspace(-8, 8, 97)
    with torch.no_grad():
        try:
            return torch.equal(act(probe), F.silu(probe))
        except (TypeError, RuntimeError):
            return False


def _gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(self.gate_proj.group.linear.gated(x))
