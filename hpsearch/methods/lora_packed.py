"""LoRA on :class:`hpsearch.kernels.PackedLinear`: peft's custom-module registration.

peft dispatches LoRA layers by the base module's type and refuses types it does not know
(``Target module ... is not supported``). :func:`register_packed` maps ``PackedLinear`` to
:class:`PackedLoraLinear` in a ``LoraConfig`` (peft's ``_register_custom_module``), so adapters
sit on the packed weight itself, never on a float copy of it: the frozen base is the packed codes,
scales and zeros, computed by the packed kernels, as in QLoRA (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314, Equation 5) where the NF4 weight is dequantized only to compute.

The packed matmul op has no autograd formula (it is inference-only), so the base product runs
under :class:`_PackedBase`, whose backward is ``dL/dx = dL/dy W_hat`` with ``W_hat`` dequantized
for that product only (QLoRA's backward does the same with its NF4 weight). The base gets no
gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

__all__ = ["PackedLoraLinear", "packed_linear_type", "register_packed"]


def packed_linear_type() -> type[nn.Module] | None:
    """``hpsearch.kernels.PackedLinear`` when the kernels package imports, else ``None``."""
    try:
        from hpsearch.kernels import PackedLinear
    except ImportError:
        return None
    return PackedLinear


class _PackedBase(torch.autograd.Function):
    """``y = PackedLinear(x)`` with the input gradient ``dx = dy W_hat`` (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return layer(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        from hpsearch.kernels import dequantize

        layer = ctx.layer
        w_hat = dequantize(layer.packed, torch.float32)  # [N, K], only for this product
        grad_x = (grad_y.float() @ w_hat)
        if layer.in_scale is not None:  # y = (x / s_in) W_hat^T
            grad_x = grad_x / layer.in_scale.float()
        return grad_x.to(grad_y.dtype), None


def _packed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _PackedBase.apply(x, layer)
    return layer(x)


class PackedLoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter on a ``PackedLinear``: ``y = W_hat x + (alpha / r) B A x`` (Hu et al. 2021,
    Equation 3), ``W_hat`` packed and frozen. Follows peft's LoRA-layer conventions (``lora_A``,
    ``lora_B``, ``scaling``, active adapters); merging is refused, since it would re-quantize the
    packed weight.

    Args:
        base_layer: the ``PackedLinear`` (or a peft layer wrapping one).
        adapter_name: peft adapter name.
        config: the ``LoraConfig``.
        r, lora_alpha: rank and alpha of this layer (peft resolves ``rank_pattern`` before).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("PackedLoraLinear does not support DoRA; set use_dora=False")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("merging into a packed weight would re-quantize it; keep the adapter unmerged")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = _packed_forward(self.get_base_layer(), x)
        if self.disable_adapters:
            return result
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
            dropout, scaling = self.lora_dropout[active_adapter], self.scaling[active_adapter]
            h = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + (lora_B(lora_A(dropout(h))) * scaling).to(result.dtype)  # Equation 3.
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_packed(config: Any) -> bool:
    """Let ``config`` (a peft ``LoraConfig``) put adapters on ``PackedLinear`` layers.

    Returns:
        Whether ``PackedLinear`` exists (the kernels package imports) and was registered.
    """
    packed = packed_linear_type()
    if packed is None:
        return False
    config._register_custom_module({packed: PackedLoraLinear})
    return True
