"""Packed layers that read the same input, run as one kernel (q/k/v, gate/up).

Why: at one token a 4-bit Llama-7B q/k/v projection is 8 MB, and a one-row GEMV that small spends
about half its ~6 us on ramp-up and tail (kernels/NOTES.md). Three of them read 25 MB in three
launches; one launch over their rows concatenated reads it in about the time of a 4096x11008 layer.

:func:`fuse_packed_siblings` finds them by a forward pass (layers of one parent module that
receive the very same input tensor), moves their rows into one :class:`PackedSiblings` registered
on the parent, and puts a :class:`PackedSibling` in each one's place. The model's code is not
touched: the first sibling called with an input computes every sibling's rows, the next ones
return their slice of that result while they are called with the same tensor (identity, not
equality: an input changed in place between the calls would not be seen; the models this was
built for call the projections back to back). A sibling called with another input computes the
group again, so results never depend on the grouping, only speed does. ``torch.compile``
(``fullgraph``) traces this as one matmul and slices.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ._format import PackedWeight
from ._linear import PackedLinear

__all__ = ["PackedSibling", "PackedSiblings", "can_fuse", "fuse_packed_siblings", "input_calls", "runs",
           "shared_input_groups"]


class PackedSiblings(nn.Module):
    """The rows of several :class:`PackedLinear` layers with one input, as one packed layer.

    Args:
        layers: the siblings, in output order; they must agree on ``in_features``, ``bits``,
            ``group_size``, the activations' dtype and the AWQ input scale (if any).
    """

    def __init__(self, layers: Sequence[PackedLinear]) -> None:
        super().__init__()
        first = layers[0]
        for layer in layers[1:]:
            if not can_fuse(first, layer):
                raise ValueError(f"cannot fuse {layer.extra_repr()} with {first.extra_repr()}")
        biases = [layer.bias for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            dtype = next(b.dtype for b in biases if b is not None)
            bias = torch.cat([b if b is not None else torch.zeros(layer.out_features, dtype=dtype,
                                                                   device=layer.qweight.device)
                              for b, layer in zip(biases, layers)])
        weight = PackedWeight(torch.cat([layer.qweight for layer in layers]),
                              torch.cat([layer.scales for layer in layers]),
                              torch.cat([layer.qzeros for layer in layers]),
                              first.bits, first.group_size, first.in_features)
        self.linear = PackedLinear.from_packed(weight, bias=bias, in_scale=first.in_scale)
        self.bounds = (0, *itertools.accumulate(layer.out_features for layer in layers))
        # the last input and output; plain attributes (not buffers): they are not state
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling ``index``'s output for ``x``: computed for every sibling at once, then reused
        while the siblings are called with the same tensor."""
        if self._x is not x:
            self._y = self.linear(x)
            self._x = x
        return self._y[..., self.bounds[index]:self.bounds[index + 1]]

    def extra_repr(self) -> str:
        return f"bounds={self.bounds}"


class PackedSibling(nn.Module):
    """Stands where one of a :class:`PackedSiblings` group's layers stood: its slice of the output."""

    def __init__(self, group: PackedSiblings, index: int) -> None:
        super().__init__()
        # not a submodule: the group is registered once, on the parent, and owns the weights
        self.__dict__["group"] = group
        self.index = index
        self.in_features = group.linear.in_features
        self.out_features = group.bounds[index + 1] - group.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, index={self.index}"


def can_fuse(a: PackedLinear, b: PackedLinear) -> bool:
    """Whether two packed layers can share one kernel launch (same input shape and format)."""
    same_scale = (a.in_scale is None and b.in_scale is None) or (
        a.in_scale is not None and b.in_scale is not None and torch.equal(a.in_scale, b.in_scale))
    dtype = a.bias.dtype if a.bias is not None else None
    other = b.bias.dtype if b.bias is not None else None
    return (a.in_features == b.in_features and a.bits == b.bits and a.group_size == b.group_size
            and same_scale and (dtype is None or other is None or dtype == other)
            and a.qweight.device == b.qweight.device)


def input_calls(model: nn.Module, names: Sequence[str], *args, **kwargs) -> list[tuple[str, torch.Tensor]]:
    """``(name, first input)`` of every call of the modules ``names`` in one forward pass
    ``model(*args, **kwargs)``, in call order (calls without a positional input are left out)."""
    calls: list[tuple[str, torch.Tensor]] = []  # inputs kept alive: identity matters to the caller
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, inputs, name=name: calls.append((name, inputs[0])) if inputs else None) for name in names]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def shared_input_groups(model: nn.Module, kind: type[nn.Module], *args, **kwargs) -> list[list[str]]:
    """Names of the ``kind`` modules that one forward pass ``model(*args, **kwargs)`` hands the very
    same input tensor, grouped per parent module and input, in call order (groups of one included)."""
    names = [name for name, module in model.named_modules() if isinstance(module, kind)]
    groups: dict[tuple[str, int], list[str]] = {}
    for name, x in input_calls(model, names, *args, **kwargs):
        group = groups.setdefault((name.rpartition(".")[0], id(x)), [])
        if name not in group:
            group.append(name)
    return list(groups.values())


def runs(names: Sequence[str], same) -> list[list[str]]:
    """``names`` cut into runs of neighbours that ``same(first of the run, next)`` accepts."""
    out: list[list[str]] = []
    for name in names:
        if out and same(out[-1][0], name):
            out[-1].append(name)
        else:
            out.append([name])
    return out


def fuse_packed_siblings(model: nn.Module, *args, **kwargs) -> list[tuple[str, ...]]:
    """Fuse, in place, the packed layers of ``model`` that share an input in ``model(*args, **kwargs)``.

    Layers are siblings when they are children of one module and the example forward pass hands
    them the same tensor; each run of two or more compatible siblings (:func:`can_fuse`, in call
    order) becomes one :class:`PackedSiblings`. Returns the fused groups' layer names.
    """
    fused = []
    for names in shared_input_groups(model, PackedLinear, *args, **kwargs):
        parent = model.get_submodule(names[0].rpartition(".")[0])
        for run in runs(names, lambda a, b: can_fuse(model.get_submodule(a), model.get_submodule(b))):
            if len(run) < 2:
                continue
            children = [n.rpartition(".")[2] for n in run]
            group = PackedSiblings([model.get_submodule(n) for n in run])
            parent.add_module("fused_" + "_".join(children), group)
            for index, child in enumerate(children):
                setattr(parent, child, PackedSibling(group, index))
            fused.append(tuple(run))
    return fused
