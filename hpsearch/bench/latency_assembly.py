"""How well the measured-latency objective's assembly predicts a packed model's whole decode step, on a CUDA GPU.

``python -m hpsearch.bench latency_assembly [--layers 32] [--context 256] [--kv-heads 32] [--batch 1]
[--plans uniform4,uniform3,attn8_mlp4,mixed] [--tokens 16] [--repeats 5] [--fusions on|off]``

A study's ``latency_measured`` objective never runs a trial's model: it adds up per-layer CUDA-graph
timings (cached per device, shape and format) and the rest of the step, timed once on the
uncompressed model. This bench checks that sum against the real thing. For each plan (bit-widths
per linear of a random 7B-shaped Llama, group 128) it reports

- ``assembled_ms``: the objective's value for that plan's manifest, computed as in a study
  (``MeasuredLatency(batch_size=--batch, context=...)``, a fresh timing cache), the time of one
  step of ``--batch`` sequences;
- ``whole_step_ms``: the same model packed in those formats (random codes), with the fusions
  :func:`hpsearch.packing.pack_model` applies (``--fusions on``: siblings as one launch, gated MLPs,
  rotary and cache write in the q/k/v launch), one eager decode step on a static cache captured as
  a CUDA graph and replayed (the setup the objective's remainder is timed in), median over
  ``--repeats`` of ``--tokens`` steps after the ``--context`` prompt (``--batch`` sequences: several
  rows reach the packed kernels' few-row path, and the fused epilogues, one-row only, stand aside);
- ``error``: ``(assembled - whole) / whole``.

Plans: ``uniform<b>`` (every block linear at b bits), ``attn8_mlp4`` (attention at 8 bits, the MLP at
4), ``mixed`` (each linear at 2, 3, 4 or 8 bits drawn with a fixed seed: siblings of different
formats do not share a launch), ``fp16``.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

PLANS = ("fp16", "uniform2", "uniform3", "uniform4", "uniform8", "attn8_mlp4", "mixed")


def plan_bits(plan: str, names: list[str], seed: int = 0) -> dict[str, int]:
    """Bits of each block linear under ``plan`` (16: left dense)."""
    if plan not in PLANS:
        raise ValueError(f"plan: {plan!r}; allowed: {', '.join(PLANS)}")
    if plan == "fp16":
        return dict.fromkeys(names, 16)
    if plan.startswith("uniform"):
        return dict.fromkeys(names, int(plan[len("uniform"):]))
    if plan == "attn8_mlp4":
        return {n: 8 if ".self_attn." in n else 4 for n in names}
    rng = random.Random(seed)  # "mixed"
    return {n: rng.choice((2, 3, 4, 8)) for n in names}


def run(args: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench latency_assembly")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=256, help="tokens in the cache before the timed step")
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="sequences a step decodes")
    p.add_argument("--plans", default="uniform4,uniform3,attn8_mlp4,mixed",
                   help=f"comma-separated, of: {', '.join(PLANS)}")
    p.add_argument("--tokens", type=int, default=16, help="decode steps per timed repeat of the whole step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fusions", choices=("on", "off"), default="on",
                   help="on: the packed model gets pack_model's fusions (siblings, gated MLP, rope attention)")
    a = p.parse_args(args)
    plans = [x for x in a.plans.split(",") if x]
    bad = [x for x in plans if x not in PLANS]
    if bad or not plans:
        p.error(f"--plans: {bad or a.plans!r} not known; allowed: {', '.join(PLANS)}")
    if a.kv_heads <= 0 or 32 % a.kv_heads:
        p.error(f"--kv-heads must divide the 32 query heads (1, 2, 4, 8, 16 or 32), got {a.kv_heads}")
    if a.batch < 1:
        p.error(f"--batch must be at least 1, got {a.batch}")
    if not torch.cuda.is_available():
        return {"error": "needs a CUDA GPU", "device": "cpu"}

    from hpsearch.bench.decode import build_model, decode_tok_s, pack_random
    from hpsearch.manifest import Manifest
    from hpsearch.objectives.base import EvalContext
    from hpsearch.objectives.measured_latency import MeasuredLatency
    from hpsearch.structure import structure_of

    torch.manual_seed(0)
    dense = build_model(a.layers, a.kv_heads)
    structure = structure_of(dense)
    names = [li.name for li in structure.block_linears()]
    cache_dir = Path(tempfile.mkdtemp(prefix="hpsearch-assembly-"))
    objective = MeasuredLatency(batch_size=a.batch, context=a.context, cache_file=str(cache_dir / "latency.json"))
    rows = []
    for plan in plans:
        bits = plan_bits(plan, names)
        manifest = Manifest.for_structure("llama-7b-shaped-random", structure)
        for name, b in bits.items():
            if b < 16:
                manifest.update_layer(name, bits=b, group_size=128, method="rtn")
        ctx = EvalContext(structure, manifest, None, torch.device("cuda"), {}, source_model=dense)
        assembled = objective.evaluate(dense, ctx)
        print(f"{plan}: assembled {assembled:.4f} ms ({ctx.attrs.get('latency_source')})", file=sys.stderr)

        model = copy.deepcopy(dense)
        packed = pack_random(model, bits, 128)
        fused: dict[str, int] = {}
        if a.fusions == "on" and packed:
            from hpsearch.kernels import fuse_gated_mlps, fuse_packed_siblings, fuse_rope_attention

            example = torch.randint(0, model.config.vocab_size, (1, 4), device="cuda")
            fused["sibling_groups"] = len(fuse_packed_siblings(model, input_ids=example))
            fused["gated_mlps"] = len(fuse_gated_mlps(model, input_ids=example))
            fused["rope_attention"] = len(fuse_rope_attention(model, example))
        whole = decode_tok_s(model, a.context, a.tokens, a.repeats, compile_step=False, batch=a.batch)["ms_per_step"]
        print(f"{plan}: whole step {whole:.4f} ms, fused {fused}", file=sys.stderr)
        del model
        torch.cuda.empty_cache()
        rows.append({
            "plan": plan,
            "packed_linears": packed,
            **fused,
            "assembled_ms": round(assembled, 4),
            "linears_ms": round(ctx.attrs["latency_linears_ms"], 4),
            "remainder_ms": round(ctx.attrs["latency_remainder_ms"], 4),
            "whole_step_ms": round(whole, 4),
            "error": round((assembled - whole) / whole, 4),
        })
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": f"random Llama, hidden 4096, MLP 11008, {a.layers} blocks, 32 heads, {a.kv_heads} kv heads",
        "context": a.context,
        "batch": a.batch,
        "fusions": a.fusions,
        "whole_step": "eager step in one CUDA graph, static cache, median over repeats",
        "rows": rows,
    }
