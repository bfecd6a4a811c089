"""Held-out perplexity of the model pruned 50% unstructured and 2:4 by magnitude, Wanda, SparseGPT.

``python -m hpsearch.bench sparsity_quality [--model embedded] [--source embedded:test] ...``

Every linear of the decoder blocks is pruned through the :class:`~hpsearch.stages.prune.Prune`
stage (uniform allocation, 16-bit weights); calibration statistics are the ``calib`` defaults
(``embedded:train``, 128 x 512 tokens, cached). Keys: ``baseline`` (dense), ``magnitude50``,
``wanda50``, ``sparsegpt50`` (50% unstructured), ``magnitude24``, ``wanda24``, ``sparsegpt24``
(2:4). Targets (issue 4): ``wanda50`` and ``sparsegpt50`` below ``magnitude50``; the same at 2:4.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch

__all__ = ["CONFIGS", "run"]

#: key -> (prune_method, pattern)
CONFIGS = {
    "magnitude50": ("magnitude", "unstructured"),
    "wanda50": ("wanda", "unstructured"),
    "sparsegpt50": ("sparsegpt", "unstructured"),
    "magnitude24": ("magnitude", "2:4"),
    "wanda24": ("wanda", "2:4"),
    "sparsegpt24": ("sparsegpt", "2:4"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench sparsity_quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded, a local directory or a hub id")
    p.add_argument("--source", default="embedded:test", help="held-out text source")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (the perplexity objective's)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity of the *50 keys")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--cache-dir", default=None, help="calibration cache (default: $HPSEARCH_CACHE or ~/.cache/hpsearch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of the keys")
    return p


def run(args: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpsearch.manifest import Manifest
    from hpsearch.models import resolve_device, resolve_name
    from hpsearch.objectives.perplexity import perplexity
    from hpsearch.plan import LayerPlan, Plan
    from hpsearch.stages.base import StageContext
    from hpsearch.stages.prune import Prune
    from hpsearch.structure import structure_of
    from hpsearch.textdata import token_blocks

    a = _parser().parse_args(args)
    device = resolve_device(a.device)
    path = resolve_name(a.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, a.dtype)).to(device).eval()
    model.requires_grad_(False)
    structure = structure_of(model)
    blocks = token_blocks(tokenizer, a.source, a.seq_len, max_tokens=a.max_tokens, key="--source")
    calib = {"n_samples": a.calib_samples, "seq_len": a.calib_seq_len, "progress": False, "cache_dir": a.cache_dir}

    out: dict = {}
    start = time.perf_counter()
    out["baseline"] = perplexity(model, blocks, a.batch_size, device)
    print(f"baseline {out['baseline']:.4f}", file=sys.stderr)
    details: dict = {}
    calibration = None
    for key in [k for k in a.only.split(",") if k]:
        method, pattern = CONFIGS[key]
        plan = Plan({li.name: LayerPlan(sparsity=a.sparsity, pattern=pattern, prune_method=method)
                     for li in structure.block_linears()})
        pruned = copy.deepcopy(model)
        manifest = Manifest.for_structure(str(a.model), structure)
        ctx = StageContext(structure, manifest, tokenizer, device, calibration=calibration, calib=calib,
                           source_model=model)
        t = time.perf_counter()
        summary = Prune().apply(pruned, plan, ctx)
        calibration = ctx.calibration or calibration
        seconds = time.perf_counter() - t
        out[key] = perplexity(pruned, blocks, a.batch_size, device)
        details[key] = {"realised_sparsity": summary["sparsity"], "prune_s": round(seconds, 2)}
        print(f"{key} {out[key]:.4f} {details[key]}", file=sys.stderr)
        del pruned
    out.update(
        details=details,
        targets_met={
            "unstructured": bool(out.get("wanda50", 1e30) < out.get("magnitude50", 0)
                                 and out.get("sparsegpt50", 1e30) < out.get("magnitude50", 0)),
            "2:4": bool(out.get("wanda24", 1e30) < out.get("magnitude24", 0)
                        and out.get("sparsegpt24", 1e30) < out.get("magnitude24", 0)),
        },
        model=str(a.model),
        source=a.source,
        tokens=int(blocks.numel()),
        calibration=f"embedded:train {a.calib_samples}x{a.calib_seq_len}",
        device=str(device) if device.type != "cpu" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        dtype=a.dtype,
        wall_s=round(time.perf_counter() - start, 1),
    )
    return out
