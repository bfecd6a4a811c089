"""``trial_cost``: a mixed-precision GPTQ trial with empty caches (cold) against one whose choices
earlier trials already made (warm).

    python -m hpsearch.bench trial_cost [--model hpsearch/embedded-llama] [--repeats 3] [--threads 2]
    python -m hpsearch.bench trial_cost --synthetic 7b --blocks 4      # on a GPU, no data needed

A trial here is what :func:`hpsearch.trial.run_trial` does between loading and logging: copy the
pristine model, get the calibration statistics, quantize every block linear (GPTQ, per-layer bits
in {3, 4}, group size 128), and evaluate held-out perplexity. Cold: empty statistics cache,
empty quantized-weight cache, model hash not yet computed, calibration text not yet read (a new
study). Warm: the caches hold the results of earlier trials with *other* plans (uniform 3 and 4
bits); every warm plan is a new per-layer mix of those choices. Medians over ``--repeats``.

``--synthetic 7b`` builds a random-initialised Llama-2-7B-shaped model (``--blocks`` of its 32
decoder blocks, bf16, on CUDA when present) and replaces the calibration pass with synthetic
activations (random inputs with outlier channels), captured through the same hooks and cache;
the evaluation is skipped and ``compress_*`` times are what the target reads. Per-block numbers
and a 32-block extrapolation are reported alongside.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run", "uniform_plan", "mixed_plan", "Trial"]


def uniform_plan(structure, bits: int, group_size: int, method: str):
    from hpsearch.plan import LayerPlan, Plan

    return Plan({li.name: LayerPlan(bits=bits, group_size=group_size, method=method) for li in structure.block_linears()})


def mixed_plan(structure, choices: list[int], group_size: int, method: str, seed: int):
    from hpsearch.plan import LayerPlan, Plan

    rng = random.Random(seed)
    return Plan({li.name: LayerPlan(bits=rng.choice(choices), group_size=group_size, method=method)
                 for li in structure.block_linears()})


def _clear_process_caches() -> None:
    """What a new study in a new process starts without (the model itself stays loaded)."""
    import hpsearch.calib as calib
    from hpsearch.calib import _hashing
    from hpsearch.textdata import load_text

    calib._store.cache_clear()
    calib._quant_cache.cache_clear()
    _hashing._MODEL_HASHES.clear()
    load_text.cache_clear()


class Trial:
    """Compress a copy of ``model`` under a plan and evaluate it, as a trial job does.

    Args:
        model, tokenizer, device: the pristine model.
        calib: the ``calib`` config mapping (cache directory included).
        eval_blocks: held-out token blocks for perplexity (``None``: no evaluation).
        stats_override: a function ``(ctx, needs) -> calibration`` replacing
            :func:`hpsearch.calib.calibration_for` (synthetic activations).
    """

    def __init__(self, model, tokenizer, device, calib: dict[str, Any], eval_blocks=None, stats_override=None,
                 gptq: dict[str, Any] | None = None) -> None:
        from hpsearch.stages.gptq import GPTQ
        from hpsearch.stages.awq import AWQ
        from hpsearch.stages.quantize import Quantize
        from hpsearch.stages.rtn import RTN
        from hpsearch.structure import structure_of

        self.model, self.tokenizer, self.device, self.calib = model, tokenizer, device, calib
        self.structure = structure_of(model)
        self.stage = Quantize(methods={"rtn": RTN(), "gptq": GPTQ(**(gptq or {})), "awq": AWQ(),
                                       "awq_gptq": AWQ(inner="gptq")})
        self.eval_blocks, self.stats_override = eval_blocks, stats_override

    def __call__(self, plan) -> dict[str, float]:
        from hpsearch.calib import calibration_for
        from hpsearch.manifest import Manifest
        from hpsearch.stages.base import StageContext

        start = time.perf_counter()
        model = copy.deepcopy(self.model)  # fresh_copy: part of every trial, cold or warm
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        copied = time.perf_counter()
        ctx = StageContext(self.structure, Manifest.for_structure("bench", self.structure), self.tokenizer, self.device,
                           calib=self.calib, source_model=self.model)
        needs = self.stage.requires(plan)
        if needs:
            ctx.calibration = (self.stats_override or calibration_for)(ctx, needs)
        summary = self.stage.apply(model, plan, ctx)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        compress_s = time.perf_counter() - copied
        out = {"compress_s": compress_s, "cached": sum(summary["cached_by_method"].values())}
        if self.eval_blocks is not None:
            from hpsearch.objectives.perplexity import perplexity

            out["perplexity"] = perplexity(model, self.eval_blocks, 8, self.device)
        out["trial_s"] = time.perf_counter() - start
        del model
        return out


def _synthetic_calibration(n_tokens: int, seed: int):
    """``calibration_for`` with synthetic activations: per owner layer, random inputs with a few
    outlier channels fed through the real accumulator, cached under a key of their own."""
    from hpsearch.calib import CalibConfig, StatsAccumulator, _store, digest, model_fingerprint

    def calibration_for(ctx, needs):
        cfg = CalibConfig.from_mapping(ctx.calib)
        describes = {"synthetic": True, "tokens": n_tokens, "seed": seed, "model": model_fingerprint(ctx.source_model)}

        def compute():
            gen = torch.Generator(device=ctx.device).manual_seed(seed)
            stats, aliases, owners = {}, {}, {}
            for li in ctx.structure.linears:
                if li.block < 0:
                    continue
                group = (li.block, li.in_features, li.kind.split(".")[0] if li.kind.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) else li.kind)
                if group in owners:
                    aliases[li.name] = owners[group]
                    continue
                owners[group] = li.name
                acc = StatsAccumulator(li.in_features, ctx.device)
                for _ in range(0, n_tokens, 2048):
                    x = torch.randn(2048, li.in_features, device=ctx.device, generator=gen)
                    x[:, : max(1, li.in_features // 512)] *= 30.0
                    acc.add_batch(x)
                stats[li.name] = acc.result()
            return stats, aliases

        return _store(str(cfg.cache_path)).calibration(digest(describes), describes, compute)

    return calibration_for


#: hidden, intermediate, heads, vocab of the synthetic shapes (``tiny`` is for smoke tests).
_SHAPES = {"7b": (4096, 11008, 32, 32000), "tiny": (256, 688, 4, 1000)}


def _synthetic_model(shape: str, blocks: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, vocab = _SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval().requires_grad_(False)
    return model


def run(args: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench trial_cost")
    p.add_argument("--model", default="hpsearch/embedded-llama", help="any HF path or hub id")
    p.add_argument("--synthetic", choices=sorted(_SHAPES), default=None, help="random 7B-shaped model, synthetic activations")
    p.add_argument("--blocks", type=int, default=32, help="decoder blocks of the synthetic model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--gptq", default="{}", help='GPTQ options as JSON, e.g. \'{"clip_search": false}\' to make '
                   "the cold passes of a 7B-shaped run affordable (warm trials only read the cache)")
    ns = p.parse_args(args)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from hpsearch.models import resolve_device

    device = resolve_device(ns.device)
    cache_parent = Path(tempfile.mkdtemp(prefix="hpsearch-trial-cost-"))
    calib = {"n_samples": ns.n_samples, "seq_len": ns.seq_len, "progress": False}
    if ns.synthetic:
        model = _synthetic_model(ns.synthetic, ns.blocks, device)
        tokenizer, eval_blocks = None, None
        override = _synthetic_calibration(ns.n_samples * ns.seq_len, 0)
        name = f"random llama-{ns.synthetic} shape ({ns.blocks} of 32 blocks, {next(model.parameters()).dtype})"
    else:
        from hpsearch.models import load_model
        from hpsearch.textdata import token_blocks

        from types import SimpleNamespace

        model_cfg = {"name_or_path": ns.model, "device": ns.device, "dtype": "auto"}
        loaded = load_model(SimpleNamespace(get=model_cfg.get, name_or_path=ns.model))
        model, tokenizer, override, name = loaded.model, loaded.tokenizer, None, ns.model
        eval_blocks = token_blocks(tokenizer, "embedded:test", 256, max_tokens=ns.eval_tokens)

    gptq_options = json.loads(ns.gptq)

    def trial_for(cache_dir: Path) -> Trial:
        return Trial(model, tokenizer, device, {**calib, "cache_dir": str(cache_dir)}, eval_blocks, override, gptq_options)

    from hpsearch.structure import structure_of

    structure = structure_of(model)
    cold, warm = [], []
    for r in range(ns.repeats):
        _clear_process_caches()
        trial = trial_for(cache_parent / f"study{r}")
        cold.append(trial(uniform_plan(structure, 4, 128, "gptq")))
        print(f"cold {r}: {cold[-1]}", file=sys.stderr)
    # the last study's caches now hold 4-bit choices; an earlier trial with another plan adds 3-bit ones
    other = trial(uniform_plan(structure, 3, 128, "gptq"))
    print(f"other plan (uniform 3-bit): {other}", file=sys.stderr)
    for r in range(ns.repeats):
        warm.append(trial(mixed_plan(structure, [3, 4], 128, "gptq", seed=100 + r)))
        assert warm[-1]["cached"] == len(structure.block_linears()), warm[-1]
        print(f"warm {r}: {warm[-1]}", file=sys.stderr)

    def med(rows, key):
        return statistics.median(row[key] for row in rows)

    key = "compress_s" if ns.synthetic else "trial_s"
    out = {
        "cold_s": round(med(cold, key), 3),
        "warm_s": round(med(warm, key), 3),
        "ratio": round(med(cold, key) / med(warm, key), 2),
        "cold_compress_s": round(med(cold, "compress_s"), 3),
        "warm_compress_s": round(med(warm, "compress_s"), 3),
        "compress_ratio": round(med(cold, "compress_s") / med(warm, "compress_s"), 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": name,
        "gptq_options": gptq_options or "defaults",
        "repeats": ns.repeats,
        "layers": len(structure.block_linears()),
        "calibration": f"{ns.n_samples} x {ns.seq_len} tokens" + (" (synthetic)" if ns.synthetic else ""),
        "timed": ("compression step (after the model copy)" if ns.synthetic
                  else "copy + compression + perplexity evaluation; compress_*: the compression step alone"),
    }
    if ns.synthetic:
        out["warm_compress_s_per_block"] = round(out["warm_compress_s"] / ns.blocks, 4)
        out["cold_compress_s_per_block"] = round(out["cold_compress_s"] / ns.blocks, 4)
        out["warm_compress_s_32_blocks_extrapolated"] = round(out["warm_compress_s_per_block"] * 32, 2)
    else:
        out["warm_perplexity"] = round(med(warm, "perplexity"), 4)
    return out
