"""Decode steps of packed attention blocks with rotary embedding and the cache write folded into the
q/k/v launch (:func:`packed_qkv_rope`).

:func:`fuse_rope_attention` does this to the attention modules of a transformers model that have
the Llama-family shape (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and nothing else: no per-head
norms; Qwen2, Gemma, Granite and others share it, kernels/NOTES.md run 28 lists which were tried)
once their packed q/k/v layers run as one sibling group
(:func:`fuse_packed_siblings`, called first). It swaps such a module's class for a subclass whose
``forward``, for one new token per batch row on a transformers ``StaticCache`` layer, runs the
q/k/v launch (rotated query out, rotated key and value into the cache), advances the layer's
length, and calls the model's attention function and ``o_proj`` as the original forward does;
everything else (prefill, dynamic caches, sliding-window layers) goes to the original forward.

It checks the model: a prompt and one decode step on a fresh ``StaticCache``, with and without the
swap, must write the same key and value into the first layer's cache (within ``rtol`` of its
largest value) and give the same logits and later layers' keys and values (within ``deep_rtol``:
their inputs carry every earlier layer's rounding), and the fused path must have run in every
module it keeps.
Otherwise every module is restored and nothing is fused (a model whose attention does more than the
Llama-family steps, or a transformers version whose static cache this does not know).

A model on SDPA is also switched to additive masks built once a pass (:func:`use_additive_mask`):
the per-layer mask conversion SDPA does was fused into the query's rotary kernel, which the fused
step no longer runs (kernels/NOTES.md, run 30).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ._additive_mask import ADDITIVE_NAME, use_additive_mask, use_boolean_mask
from ._siblings import PackedSibling
from ._swap import difference, restore, swapped_class, unswap

__all__ = ["fuse_rope_attention", "unfuse_rope_attention"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ran: set[int] | None = None  # ids of the modules whose fused path ran, while fuse_rope_attention checks
_StaticLayer: type | None = None  # transformers' static cache layer, found by fuse_rope_attention


def fuse_rope_attention(model: nn.Module, input_ids: torch.Tensor | None = None, rtol: float = 1e-2,
                        deep_rtol: float = 0.1) -> list[str]:
    """Fold rotary embedding and the KV-cache write of ``model``'s decode steps into the q/k/v launch.

    Call :func:`fuse_packed_siblings` first: only attention modules whose q, k and v are one sibling
    group are taken. ``input_ids`` (``[batch, tokens]``, on the model's device) is the check's
    prompt, by default 8 random tokens (a prompt of padding tokens, whose embeddings may be zero,
    would check nothing); its last token is then decoded again as one step, and the logits and the
    keys and values it writes are compared. Returns the fused modules' names, in place (empty when
    the check fails: then nothing is changed).
    """
    global _ran, _StaticLayer
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:  # a transformers version without cache layers: nothing to write into
        return []
    _StaticLayer = StaticLayer
    candidates = [name for name, module in model.named_modules() if _is_rope_attention(module)]
    if not candidates:
        return []
    if input_ids is None:
        device = model.get_submodule(candidates[0]).q_proj.group.linear.qweight.device
        vocab = getattr(model.config, "vocab_size", None) or 2
        input_ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        before = _decode_step(model, input_ids)
    except Exception:  # noqa: BLE001 - a model this cannot drive is left as it is
        return []
    modules = [model.get_submodule(name) for name in candidates]
    for module in modules:
        module.__class__ = swapped_class(type(module), "Rope", _rope_forward)
    # the rotary kernel the per-layer mask conversion was fused into is gone: build the mask once
    additive = getattr(model.config, "_attn_implementation", None) != ADDITIVE_NAME and use_additive_mask(model)
    _ran = set()
    try:
        after = _decode_step(model, input_ids)
        ran = _ran
    except Exception:  # noqa: BLE001 - restored below
        after, ran = None, set()
    finally:
        _ran = None
    if (after is None or _disagree(before, after, rtol, deep_rtol)
            or any(id(m) not in ran for m in modules)):
        for module in modules:
            restore(module)
        if additive:
            use_boolean_mask(model)
        return []
    if additive:
        model._hpsearch_rope_additive_mask = True  # for unfuse_rope_attention to undo
    return candidates


def _disagree(before: list[torch.Tensor], after: list[torch.Tensor], rtol: float, deep_rtol: float) -> bool:
    """Whether the fused step differs from the original beyond rounding: the first layer's key and
    value (its inputs are the same in both runs, so only rounding separates them) within ``rtol``,
    the logits and the later layers' keys and values, whose inputs carry every earlier layer's
    rounding differences, within ``deep_rtol``. Measured on a 32-block random Llama packed at 4 bits
    (H100, kernels/NOTES.md run 31): first layer <= 8.4e-4, logits 1.3e-2 to 1.5e-2, later layers up
    to 2.1e-2; a wrong rotation (interleaved pairs) is off by O(1) in the first layer's keys."""
    first = [difference(b, a) for b, a in zip(before[1:3], after[1:3])]
    deep = [difference(before[0], after[0])] + [difference(b, a) for b, a in zip(before[3:], after[3:])]
    return any(d > rtol for d in first) or any(d > deep_rtol for d in deep)


def unfuse_rope_attention(model: nn.Module) -> int:
    """Undo :func:`fuse_rope_attention` (the sibling groups stay); returns how many modules."""
    if getattr(model, "_hpsearch_rope_additive_mask", False):
        use_boolean_mask(model)
        del model._hpsearch_rope_additive_mask
    return unswap(model, "Rope")


def _is_rope_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a Llama-family attention whose q, k and v are one sibling group of
    exactly these three, in that order, made of heads of ``head_dim`` rows."""
    q, k, v = (getattr(module, name, None) for name in _PROJECTIONS[:3])
    if not all(isinstance(p, PackedSibling) for p in (q, k, v)):
        return False
    group = q.group
    head_dim = getattr(module, "head_dim", None)
    children = {name for name, child in module.named_children() if child is not group}
    return (k.group is group and v.group is group and (q.index, k.index, v.index) == (0, 1, 2)
            and len(group.bounds) == 4 and children == set(_PROJECTIONS) and isinstance(head_dim, int)
            and head_dim % 2 == 0 and q.out_features % head_dim == 0 and k.out_features == v.out_features
            and k.out_features % head_dim == 0 and isinstance(getattr(module, "layer_idx", None), int)
            and hasattr(getattr(module, "config", None), "_attn_implementation")
            # clipped q/k/v (OLMo's clip_qkv): a step the check's prompt may never trigger
            and getattr(module.config, "clip_qkv", None) is None)


def _decode_step(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The logits of ``input_ids``'s last token decoded as one step after the whole prompt, on a
    fresh static cache, then the key and value that step wrote in each layer's cache. The keys show a
    wrong rotation plainly; the logits of a small random model may hardly move with one (its
    attention is nearly uniform)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + 2)
    with torch.no_grad():
        model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        logits = model(input_ids=input_ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    written = [t[:, :, input_ids.shape[1]] for layer in cache.layers for t in (layer.keys, layer.values)]
    return [logits, *written]


def _static_layer(cache, layer_idx: int, hidden_states: torch.Tensor):
    """The cache's layer ``layer_idx`` where the fused step can write it: a plain transformers
    ``StaticLayer`` (not sliding), already allocated for this batch and dtype."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if (_StaticLayer is None or type(layer) is not _StaticLayer or not getattr(layer, "is_initialized", False)
            or not hasattr(layer, "cumulative_length")):
        return None
    keys = layer.keys
    if keys.shape[0] != hidden_states.shape[0] or keys.dtype != hidden_states.dtype:
        return None
    return layer


def _rope_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                  past_key_values=None, **kwargs):
    layer = _static_layer(past_key_values, self.layer_idx, hidden_states)
    if layer is None or position_embeddings is None or hidden_states.shape[1] != 1:
        return self._hpsearch_unfused.forward(self, hidden_states, position_embeddings, attention_mask,
                                              past_key_values, **kwargs)
    if _ran is not None:
        _ran.add(id(self))
    batch = hidden_states.shape[0]
    cos, sin = position_embeddings
    kv_heads = self.k_proj.out_features // self.head_dim
    # the key and value land at the layer's length, then the layer grows as its own update would
    q = self.q_proj.group.linear.qkv_rope(hidden_states, cos, sin, layer.keys, layer.values,
                                          layer.cumulative_length, self.q_proj.out_features // self.head_dim,
                                          kv_heads)
    layer.cumulative_length.add_(1)
    query = q.view(batch, 1, -1, self.head_dim).transpose(1, 2)
    extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
    attn_output, attn_weights = _attention_function(self)(
        self, query, layer.keys, layer.values, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs)
    attn_output = attn_output.reshape(batch, 1, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _attention_function(module: nn.Module):
    """The attention function the original forward would call: the configured implementation, or
    the model's own eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module)._hpsearch_unfused.__module__].eager_attention_forward
    implementation = module.config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
