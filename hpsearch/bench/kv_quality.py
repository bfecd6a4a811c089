"""Held-out perplexity with the KV cache at 16, 8, 4 and 2 bits, through the cache path.

``python -m hpsearch.bench kv_quality [--model embedded] [--chunk 1] [--residual 128] ...``

Every configuration prefills the held-out blocks ``--chunk`` tokens at a time through
:class:`~hpsearch.kvcache.QuantizedKVCache` (``--chunk 1`` is token-by-token decoding: every token
reads the quantized past). Keys: ``kv16`` (exact), ``kv8``/``kv4``/``kv2`` (KIVI: keys per
channel, values per token, group ``--group-size``, the stage's default residual window) and
``kv2_naive`` (2 bits per token for K and V, no window). Targets (issue 6): ``kv8`` within 0.5% of
``kv16``, ``kv4`` within 5%, ``kv2`` below ``kv2_naive``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch

from hpsearch.kvcache import install
from hpsearch.methods.kv_quant import KVFormat

__all__ = ["run", "CONFIGS"]

#: key -> (k_bits, v_bits, layout, uses the residual window)
CONFIGS = {
    "kv16": (16, 16, "kivi", True),
    "kv8": (8, 8, "kivi", True),
    "kv4": (4, 4, "kivi", True),
    "kv2": (2, 2, "kivi", True),
    "kv2_naive": (2, 2, "per_token", False),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench kv_quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded, a local directory or a hub id")
    p.add_argument("--source", default="embedded:test", help="held-out text source")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per block (0: max_position_embeddings)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=1, help="prefill chunk through the cache (1: decode)")
    p.add_argument("--path", default="cache", choices=["cache", "single"],
                   help="cache: chunked prefill through QuantizedKVCache; single: one pass per block "
                        "with quantize-dequantize before attention (equal, see tests/test_kv_cache.py)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual", type=int, default=128, help="exact window (the stage's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of the keys")
    p.add_argument("--needle", action="store_true",
                   help="also needle-in-a-haystack accuracy per configuration (objectives/needle.py)")
    return p


def run(args: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpsearch.models import resolve_name
    from hpsearch.objectives.long_perplexity import chunked_perplexity
    from hpsearch.objectives.perplexity import perplexity
    from hpsearch.textdata import token_blocks

    opts = _parser().parse_args(args)
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if opts.device == "auto" else opts.device))
    path = resolve_name(opts.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, opts.dtype)).to(device).eval()
    seq_len = opts.seq_len or base.config.max_position_embeddings
    blocks = token_blocks(tokenizer, opts.source, seq_len, max_tokens=opts.max_tokens)
    n_layers = base.config.num_hidden_layers
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    needles: dict[str, dict[str, float]] = {}
    for key in opts.only.split(","):
        k_bits, v_bits, layout, windowed = CONFIGS[key]
        model = copy.deepcopy(base)
        fmt = KVFormat(k_bits=k_bits, v_bits=v_bits, group_size=opts.group_size, layout=layout,
                       residual=opts.residual if windowed else 0)
        if not fmt.exact:
            install(model, {i: fmt for i in range(n_layers)}, chunk=opts.chunk)
        start = time.perf_counter()
        if opts.path == "cache":
            results[key] = chunked_perplexity(model, blocks, opts.chunk, opts.batch_size, device)
        else:
            results[key] = perplexity(model, blocks, opts.batch_size, device)
        seconds[key] = round(time.perf_counter() - start, 2)
        print(f"kv_quality: {key} ppl={results[key]:.4f} ({seconds[key]} s)", file=sys.stderr)
        if opts.needle:
            needles[key] = _needle(model, tokenizer, device, seq_len)
            print(f"kv_quality: {key} needle={needles[key]}", file=sys.stderr)
    out: dict = dict(results)
    if "kv16" in results:
        ref = results["kv16"]
        out["relative_to_kv16"] = {k: round(v / ref - 1, 6) for k, v in results.items()}
        checks = {}
        if "kv8" in results:
            checks["kv8_within_0.5pct"] = results["kv8"] <= ref * 1.005
        if "kv4" in results:
            checks["kv4_within_5pct"] = results["kv4"] <= ref * 1.05
        if "kv2" in results and "kv2_naive" in results:
            checks["kv2_below_kv2_naive"] = results["kv2"] < results["kv2_naive"]
        out["checks"] = checks
    if needles:
        out["needle"] = needles
    out["settings"] = {"model": opts.model, "source": opts.source, "seq_len": seq_len, "tokens": int(blocks.numel()),
                       "chunk": opts.chunk, "group_size": opts.group_size, "residual": opts.residual,
                       "dtype": opts.dtype,
                       "path": {"cache": "chunked prefill through QuantizedKVCache",
                                "single": "one pass, quantize-dequantize before attention"}[opts.path]}
    out["seconds"] = seconds
    out["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    out["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    return out


def _needle(model, tokenizer, device: torch.device, context: int) -> dict[str, float]:
    from hpsearch.manifest import Manifest
    from hpsearch.objectives.base import EvalContext
    from hpsearch.objectives.needle import NeedleRetrieval
    from hpsearch.structure import structure_of

    structure = structure_of(model)
    ctx = EvalContext(structure, Manifest.for_structure("bench", structure), tokenizer, device, {})
    objective = NeedleRetrieval(context=context, samples_per_depth=8, batch_size=40)
    exact = objective.evaluate(model, ctx)
    return {"exact": exact, "token_acc": ctx.attrs["needle_acc_token_acc"]}
