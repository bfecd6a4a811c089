"""``quant_quality``: held-out perplexity at uniform 3 and 4 bits (group size 128) by method.

    python -m hpsearch.bench quant_quality [--model hpsearch/embedded-llama] [--threads 2]

Every block linear is quantized (asymmetric, g128) with plain min-max RTN, GPTQ and AWQ (scales +
RTN) at the method classes' defaults (GPTQ: act-order, static groups, clipping search of the grids;
AWQ: clipping search after the scale search), through the quantization stage and the cached
calibration statistics (``embedded:train``, 128 x 512 tokens by default), and scored on
``embedded:test`` like the perplexity objective (256-token blocks, ``--eval-tokens`` tokens). Keys: ``baseline``, ``rtn3``, ``rtn4``, ``gptq3``, ``gptq4``, ``awq3``,
``awq4`` (plus ``awq_gptq3``/``awq_gptq4`` with ``--awq-gptq``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["run"]


def run(args: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench quant_quality")
    p.add_argument("--model", default="hpsearch/embedded-llama")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--bits", default="3,4")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--awq-gptq", action="store_true", help="also AWQ scales + GPTQ")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-source", default="embedded:test")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--cache-dir", default=None, help="default: a fresh temporary directory")
    ns = p.parse_args(args)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from hpsearch.bench.trial_cost import Trial, uniform_plan
    from hpsearch.models import load_model
    from hpsearch.objectives.perplexity import perplexity
    from hpsearch.textdata import token_blocks

    cfg = {"name_or_path": ns.model, "device": ns.device, "dtype": "auto"}
    loaded = load_model(SimpleNamespace(get=cfg.get, name_or_path=ns.model))
    blocks = token_blocks(loaded.tokenizer, ns.eval_source, 256, max_tokens=ns.eval_tokens)
    calib = {"n_samples": ns.n_samples, "seq_len": ns.seq_len, "progress": False,
             "cache_dir": ns.cache_dir or tempfile.mkdtemp(prefix="hpsearch-quant-quality-")}
    trial = Trial(loaded.model, loaded.tokenizer, loaded.device, calib, blocks)
    out: dict[str, Any] = {"baseline": round(perplexity(loaded.model, blocks, 8, loaded.device), 4)}
    methods = ns.methods.split(",") + (["awq_gptq"] if ns.awq_gptq else [])
    seconds = {}
    for method in methods:
        for bits in (int(b) for b in ns.bits.split(",")):
            start = time.perf_counter()
            result = trial(uniform_plan(trial.structure, bits, ns.group_size, method))
            out[f"{method}{bits}"] = round(result["perplexity"], 4)
            seconds[f"{method}{bits}"] = round(time.perf_counter() - start, 2)
            print(f"{method}{bits}: {out[f'{method}{bits}']} ({seconds[f'{method}{bits}']} s)", file=sys.stderr)
    dev = loaded.device
    out.update({
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": ns.model, "group_size": ns.group_size, "eval": f"{ns.eval_source}, {blocks.numel()} tokens",
        "calibration": f"embedded:train, {ns.n_samples} x {ns.seq_len} tokens", "seconds": seconds,
    })
    return out
