"""KV-cache precision stage: quantized keys and values, read by every evaluation afterwards.

Per-layer K/V bits come from the plan, first match wins:

1. ``x_kv_k_bits`` / ``x_kv_v_bits`` on the linears of block ``i`` (``search.layer`` at block
   granularity);
2. ``plan.model["kv_k_bits.<i>"]`` / ``["kv_v_bits.<i>"]`` (per-layer model-wide parameters);
3. ``plan.model["kv_k_bits"]`` / ``["kv_v_bits"]`` (one value for all layers);
4. the stage's ``k_bits`` / ``v_bits``.

Group size, layout, symmetry and residual window are model-wide (``kv_group_size``,
``kv_layout``, ``kv_sym``, ``kv_residual`` in ``plan.model``, else the stage's values). The stage
installs the format on the model (:func:`hpsearch.kvcache.install`) and records it in
``manifest.model["kv_cache"]``, which the memory and latency objectives read.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.kvcache import install
from hpsearch.methods.kv_quant import KV_BITS, LAYOUTS, KVFormat, token_bytes
from hpsearch.plan import Plan
from hpsearch.stages.base import Stage, StageContext

__all__ = ["KVCache"]


class KVCache(Stage):
    """Quantize the KV cache: separate K and V bits, group size, layout, residual window.

    Args:
        k_bits, v_bits: default bit-widths of keys and values (2, 3, 4, 8 or 16).
        group_size: tokens per group of a per-channel key, channels per group of a per-token
            key or value (KIVI uses 32).
        layout: ``kivi`` (keys per channel, values per token) or ``per_token`` (both per token).
        sym: symmetric grids (asymmetric by default, as KIVI).
        residual: recent tokens kept exact (KIVI uses 128).
        eval_chunk: queries per chunk when a whole sequence is evaluated in one pass (1: every
            token reads the quantized past as when decoded alone).
        dtype_bytes: bytes of an exact K or V element.
    """

    def __init__(self, *, k_bits: int = 16, v_bits: int = 16, group_size: int = 32, layout: str = "kivi",
                 sym: bool = False, residual: int = 128, eval_chunk: int = 1, dtype_bytes: int = 2) -> None:
        self.default = self._format("stages.kv_cache", k_bits, v_bits, group_size, layout, sym, residual)
        if eval_chunk < 1:
            raise ConfigError("stages.kv_cache.eval_chunk", f"{eval_chunk!r} is not allowed; allowed: an integer >= 1")
        self.eval_chunk, self.dtype_bytes = int(eval_chunk), int(dtype_bytes)

    @staticmethod
    def _format(key: str, k_bits: Any, v_bits: Any, group_size: Any, layout: Any, sym: Any, residual: Any) -> KVFormat:
        for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
            if bits not in KV_BITS:
                raise ConfigError(f"{key}.{name}", f"{bits!r} is not allowed; allowed: {', '.join(map(str, KV_BITS))}")
        if layout not in LAYOUTS:
            raise ConfigError(f"{key}.layout", f"{layout!r} is not allowed; allowed: {', '.join(LAYOUTS)}")
        if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
            raise ConfigError(f"{key}.group_size", f"{group_size!r} is not allowed; allowed: a positive integer or -1 (whole head dim)")
        if group_size == -1 and LAYOUTS[layout][0] == "channel":
            raise ConfigError(f"{key}.group_size", f"-1 is not allowed with layout {layout!r} (keys are grouped along tokens); allowed: a positive integer")
        if not isinstance(residual, int) or residual < 0:
            raise ConfigError(f"{key}.residual", f"{residual!r} is not allowed; allowed: an integer >= 0")
        return KVFormat(int(k_bits), int(v_bits), int(group_size), str(layout), bool(sym), int(residual))

    def formats(self, plan: Plan, ctx: StageContext) -> dict[int, KVFormat]:
        """The format of every decoder block's KV cache under ``plan``."""
        m, d = plan.model, self.default
        shared = dict(group_size=m.get("kv_group_size", d.group_size), layout=m.get("kv_layout", d.layout),
                      sym=m.get("kv_sym", d.sym), residual=m.get("kv_residual", d.residual))
        by_block: dict[int, dict[str, Any]] = {}
        for li in ctx.structure.block_linears():
            layer = plan.layers.get(li.name)
            for side in ("k_bits", "v_bits"):
                value = layer.get(f"x_kv_{side}") if layer is not None else None
                if value is not None:
                    by_block.setdefault(li.block, {}).setdefault(side, value)
        out = {}
        for i in range(ctx.structure.n_blocks):
            bits = {side: by_block.get(i, {}).get(side, m.get(f"kv_{side}.{i}", m.get(f"kv_{side}", getattr(d, side))))
                    for side in ("k_bits", "v_bits")}
            out[i] = self._format("plan.model.kv", bits["k_bits"], bits["v_bits"], **shared)
        return out

    def apply(self, model: nn.Module, plan: Plan, ctx: StageContext) -> dict[str, Any]:
        formats = self.formats(plan, ctx)
        s = ctx.structure
        sizes = [token_bytes(f, s.n_kv_heads, s.head_dim, self.dtype_bytes) for f in formats.values()]
        quantized = any(not f.exact for f in formats.values())
        if quantized:
            install(model, formats, self.eval_chunk)
        first = formats[0]
        k_bits = sorted({f.k_bits for f in formats.values()})
        v_bits = sorted({f.v_bits for f in formats.values()})
        ctx.manifest.model["kv_cache"] = {
            "k_bits": k_bits[0] if len(k_bits) == 1 else "mixed",
            "v_bits": v_bits[0] if len(v_bits) == 1 else "mixed",
            "group_size": first.group_size,
            "layout": first.layout,
            "sym": first.sym,
            "residual": first.residual if quantized else 0,
            "eval_chunk": self.eval_chunk,
            # all layers, K and V, codes + float16 scales and offsets, per token older than the window
            "bytes_per_token": sum(b["quantized"] for b in sizes),
            "residual_bytes_per_token": sum(b["exact"] for b in sizes),
            # per-channel keys: a group of G tokens waits exact until it is complete
            "key_group_tokens": first.group(first.k_axis, s.head_dim) if first.k_axis == "channel" else 1,
            "key_pending_bytes_per_token": sum(b["key_pending"] for b in sizes),
            "per_layer": [{"k_bits": f.k_bits, "v_bits": f.v_bits} for f in formats.values()],
        }
        mean_bits = 8 * sum(b["quantized"] for b in sizes) / sum(b["exact"] for b in sizes) * 2
        return {"installed": quantized, "k_bits": k_bits, "v_bits": v_bits, "bits_per_value": round(mean_bits, 3)}
