"""SDPA with the attention mask made additive once per forward pass instead of once per layer.

Why: transformers builds one boolean mask per forward pass for SDPA, and every layer's
``scaled_dot_product_attention`` call turns it into an additive float mask again (under
``torch.compile`` that is a small elementwise kernel per layer). Inductor fuses it into the
query's rotary kernel in a float16 model; once :func:`fuse_rope_attention` moves the rotary into
the q/k/v launch it is a kernel of its own, ~1 us plus a launch gap in every block of a decode step
(kernels/NOTES.md, run 28). Built once, by the mask function transformers calls once per pass, the
layers share it.

:func:`use_additive_mask` registers transformers' own SDPA attention under :data:`ADDITIVE_NAME`
with a mask builder that calls SDPA's and makes its boolean mask additive (``0`` where a key is
attended, the dtype's lowest value where not, as transformers' eager masks are; SDPA gives the
same attention to either). Where SDPA's builder returns no mask (causal prefill it leaves to
``is_causal``) there is still none.
"""

from __future__ import annotations

import torch

from ._attention import _configs, _uses_attention_interface, switch_attention

__all__ = ["ADDITIVE_NAME", "use_additive_mask", "use_boolean_mask"]

#: the name under which SDPA with additive masks is registered in transformers
ADDITIVE_NAME = "hpsearch_sdpa_additive"


@torch.library.custom_op("hpsearch::realized_mask", mutates_args=())
def realized_mask(mask: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``mask``. Opaque to Inductor, so the step computes the mask once into a
    buffer every layer's attention reads; a mask left as an elementwise expression is recomputed
    into each layer's SDPA input instead (one kernel a layer, kernels/NOTES.md run 30)."""
    return mask.clone(memory_format=torch.contiguous_format)


@realized_mask.register_fake
def _(mask):
    return torch.empty_like(mask, memory_format=torch.contiguous_format)


def additive_sdpa_mask(*args, **kwargs):
    """SDPA's mask builder with its boolean mask made additive in ``kwargs["dtype"]``, the model's
    dtype, which transformers hands every mask builder (SDPA wants the query's dtype or bool), and
    realized once (:func:`realized_mask`)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)
    dtype = kwargs.get("dtype")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or not (
            isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.ops.hpsearch.realized_mask(torch.where(mask, zero, torch.finfo(dtype).min))


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ADDITIVE_NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(ADDITIVE_NAME, additive_sdpa_mask)


def use_additive_mask(model: torch.nn.Module) -> bool:
    """Switch a transformers model that runs SDPA to SDPA with additive masks built once a pass.

    Returns whether the model now uses them; ``False``, with the model untouched, where it runs
    another attention (eager's masks are additive already; :func:`use_decode_attention` reads the
    boolean mask in place), does not dispatch through ``AttentionInterface``, or transformers lacks
    the interfaces (before 4.56).
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_sdpa", False) or not _uses_attention_interface(model):
        return False
    impls = {getattr(c, "_attn_implementation", None) for c in _configs(config)}
    if impls == {ADDITIVE_NAME}:
        return True
    if impls != {"sdpa"}:
        return False
    try:
        _register()
    except ImportError:
        return False
    switch_attention(model, ADDITIVE_NAME)
    return config._attn_implementation == ADDITIVE_NAME


def use_boolean_mask(model: torch.nn.Module) -> bool:
    """Undo :func:`use_additive_mask` (back to plain SDPA); returns whether there was anything to undo."""
    config = getattr(model, "config", None)
    if config is None or {getattr(c, "_attn_implementation", None) for c in _configs(config)} != {ADDITIVE_NAME}:
        return False
    switch_attention(model, "sdpa")
    return True
