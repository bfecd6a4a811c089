"""A quantized KV cache in transformers models, read by every evaluation.

Two ways in, one rule (:func:`hpsearch.methods.kv_quant.exact_masks`):

* :func:`install` registers our attention function (``hpsearch_kv``) in transformers'
  ``AttentionInterface`` (with the eager 4-D mask) and gives every attention module a
  :class:`KVLayerState`. Any forward pass — perplexity over a whole block, lm-eval's
  log-likelihoods, ``generate`` with the default cache — then attends to quantized keys and
  values older than the residual window (:func:`~hpsearch.methods.kv_quant.kv_attention`), as
  if each token had been decoded on its own (``chunk=1``).
* :class:`QuantizedKVCache` is a transformers ``Cache`` that stores codes, scales and offsets for
  tokens that left the window and exact states for the rest; chunked prefill through it
  (:func:`chunk_logits`) is the deployment path. The attention function sees that the keys come
  from this cache (they are the tensor it returned) and leaves them as they are.

Any decoder whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` with ``(module, query, key,
value, attention_mask, scaling=..., ...)`` and carry ``layer_idx`` works (Llama, Mistral, Qwen2,
Phi-3, Gemma...). Attention sinks (``s_aux``) are not supported.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from hpsearch.methods.kv_quant import KVFormat, QuantizedKV, dequantize_kv, kv_attention, quantize_kv

__all__ = ["ATTENTION_NAME", "KVLayerState", "attention_modules", "install", "installed",
           "QuantizedKVLayer", "QuantizedKVCache", "chunk_logits"]

#: Name of our attention function in transformers' registries.
ATTENTION_NAME = "hpsearch_kv"
_STATE = "hpsearch_kv_state"


@dataclass
class KVLayerState:
    """What one attention module's KV cache is: its format and how evaluation chunks queries.

    Args:
        fmt: the layer's K/V format.
        chunk: queries per chunk in a single forward pass (1: every token reads the quantized
            past as in token-by-token decoding).
    """

    fmt: KVFormat
    chunk: int = 1
    _returned: Any = field(default=None, repr=False)

    def mark(self, key: torch.Tensor) -> None:
        """Remember the keys :class:`QuantizedKVCache` returned (already as stored)."""
        self._returned = weakref.ref(key)

    def from_cache(self, key: torch.Tensor) -> bool:
        return self._returned is not None and self._returned() is key


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Attention modules by ``layer_idx`` (modules with an integer ``layer_idx`` and ``scaling``)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "scaling"):
            found.setdefault(idx, module)
    return found


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               softcap: float | None = None, s_aux: torch.Tensor | None = None, **kwargs: Any):
    """The ``hpsearch_kv`` attention function (transformers' calling convention)."""
    if s_aux is not None:
        raise NotImplementedError("hpsearch_kv attention does not support attention sinks (s_aux)")
    state: KVLayerState | None = getattr(module, _STATE, None)
    fmt = KVFormat() if state is None or state.from_cache(key) else state.fmt
    return kv_attention(query, key, value, attention_mask,
                        scaling=module.scaling if scaling is None else scaling, fmt=fmt,
                        chunk=state.chunk if state is not None else 1, softcap=softcap, dropout=dropout,
                        training=module.training)


def install(model: nn.Module, formats: Mapping[int, KVFormat], chunk: int = 1) -> int:
    """Make ``model`` attend to its KV cache in the given formats (layer index -> format; layers
    not named stay exact). Returns the number of attention modules."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx")
    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    for idx, module in modules.items():
        setattr(module, _STATE, KVLayerState(formats.get(idx, KVFormat()), chunk))
    model.config._attn_implementation = ATTENTION_NAME
    return len(modules)


def installed(model: nn.Module) -> dict[int, KVLayerState]:
    """The KV states :func:`install` left on ``model`` (empty when none)."""
    return {i: getattr(m, _STATE) for i, m in attention_modules(model).items() if hasattr(m, _STATE)}


def _cat(a: QuantizedKV | None, b: QuantizedKV) -> QuantizedKV:
    if a is None:
        return b
    dim = -1 if b.axis == "channel" else -2
    return QuantizedKV(torch.cat([a.q, b.q], dim), torch.cat([a.scale, b.scale], dim),
                       torch.cat([a.offset, b.offset], dim), b.bits, b.group, b.axis)


class QuantizedKVLayer(DynamicLayer):
    """One layer's cache: codes for tokens that left the residual window, exact states after.

    ``self.keys``/``self.values`` hold the exact tail (tokens ``[n_k, n)`` / ``[n_v, n)``);
    ``codes_k``/``codes_v`` the quantized head. Before each update, tokens older than the window
    are quantized (values per token; per-channel keys a whole group of ``G`` tokens at a time) and
    the codes are dequantized to answer the attention, so what is read is what is stored.
    """

    is_croppable = False

    def __init__(self, fmt: KVFormat) -> None:
        super().__init__()
        self.fmt = fmt
        self.codes_k: QuantizedKV | None = None
        self.codes_v: QuantizedKV | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    def _quantized_tokens(self, codes: QuantizedKV | None) -> int:
        return 0 if codes is None else codes.tokens

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self._quantized_tokens(self.codes_k) + self.keys.shape[-2]

    def _retire(self, exact: torch.Tensor, codes: QuantizedKV | None, bits: int, axis: str,
                cut: int) -> tuple[torch.Tensor, QuantizedKV | None]:
        """Quantize the exact tokens below position ``cut`` (whole groups on the channel axis)."""
        done = self._quantized_tokens(codes)
        if bits >= 16 or cut <= done:
            return exact, codes
        group = self.fmt.group(axis, exact.shape[-1])
        if axis == "channel":
            cut = cut // group * group  # KIVI: a key group is quantized once all G tokens are old
        m = cut - done
        if m <= 0:
            return exact, codes
        new = quantize_kv(exact[..., :m, :], bits, group, axis, self.fmt.sym)
        return exact[..., m:, :], _cat(codes, new)

    def compact(self) -> None:
        """Quantize what has left the residual window (done before every update)."""
        if not self.is_initialized:
            return
        cut = self.get_seq_length() - self.fmt.residual  # tokens below `cut` are read quantized
        self.keys, self.codes_k = self._retire(self.keys, self.codes_k, self.fmt.k_bits, self.fmt.k_axis, cut)
        self.values, self.codes_v = self._retire(self.values, self.codes_v, self.fmt.v_bits, self.fmt.v_axis, cut)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.compact()
        heads_k = [] if self.codes_k is None else [dequantize_kv(self.codes_k, self.dtype)]
        heads_v = [] if self.codes_v is None else [dequantize_kv(self.codes_v, self.dtype)]
        keys = torch.cat([*heads_k, self.keys, key_states], dim=-2)
        values = torch.cat([*heads_v, self.values, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return keys, values

    def stored_bytes(self) -> int:
        """Bytes the layer holds now, codes counted at their bit-width (as packed)."""
        total = (self.keys.numel() + self.values.numel()) * self.keys.element_size() if self.is_initialized else 0
        for c in (self.codes_k, self.codes_v):
            if c is not None:
                total += c.q.numel() * c.bits // 8 + c.scale.numel() * 2
                total += 0 if self.fmt.sym else c.offset.numel() * 2
        return total

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in ("codes_k", "codes_v"):
            c = getattr(self, name)
            if c is not None:
                idx = beam_idx.to(c.q.device)
                setattr(self, name, QuantizedKV(c.q.index_select(0, idx), c.scale.index_select(0, idx),
                                                c.offset.index_select(0, idx), c.bits, c.group, c.axis))

    def reset(self) -> None:
        super().reset()
        self.codes_k = self.codes_v = None


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` of :class:`QuantizedKVLayer`, one per attention layer.

    Args:
        formats: one format per layer.
        states: the model's :class:`KVLayerState` per layer (``None`` where absent), told which
            keys came from this cache so the attention function does not quantize them again.
    """

    def __init__(self, formats: Sequence[KVFormat], states: Sequence[KVLayerState | None] = ()) -> None:
        super().__init__(layers=[QuantizedKVLayer(f) for f in formats])
        self._states = list(states)

    @classmethod
    def for_model(cls, model: nn.Module) -> QuantizedKVCache:
        """The cache in the formats :func:`install` gave ``model`` (exact layers where none)."""
        modules = attention_modules(model)
        n = max(modules) + 1 if modules else int(model.config.get_text_config().num_hidden_layers)
        states = [getattr(modules.get(i), _STATE, None) for i in range(n)]
        return cls([s.fmt if s is not None else KVFormat() for s in states], states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        state = self._states[layer_idx] if layer_idx < len(self._states) else None
        if state is not None:
            state.mark(keys)
        return keys, values

    def compact(self) -> None:
        """Quantize, in every layer, what has left the residual window."""
        for layer in self.layers:
            layer.compact()

    def stored_bytes(self) -> int:
        """Bytes held by all layers (codes at their bit-width, as packed)."""
        return sum(layer.stored_bytes() for layer in self.layers)


@torch.no_grad()
def chunk_logits(model: nn.Module, input_ids: torch.Tensor, chunk: int,
                 cache: Cache | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Chunked prefill of ``input_ids`` (``[B, T]``) through ``cache`` (a new
    :class:`QuantizedKVCache` for ``model`` by default): yields ``(start, logits of the chunk)``."""
    cache = QuantizedKVCache.for_model(model) if cache is None else cache
    for start in range(0, input_ids.shape[1], chunk):
        out = model(input_ids=input_ids[:, start:start + chunk], past_key_values=cache, use_cache=True)
        yield start, out.logits
