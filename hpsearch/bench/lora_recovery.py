"""How much of the perplexity lost to compression LoRA recovery wins back.

The model (embedded default) is quantized uniformly (3 bits, group 128, GPTQ when the quantize
stage has it, else RTN), then ``stages.lora`` (``conf/stage/lora.yaml``: its default steps and
time budget) trains rank-16 adapters over the frozen compressed weights on the calibration text.
Perplexity is the configured held-out objective (``embedded:test``), before and after:

* ``baseline``: the uncompressed model; ``compressed``: after quantization; ``recovered``: with
  the trained adapters;
* ``recovered_fraction = (compressed - recovered) / (compressed - baseline)``, the share of the
  gap closed;
* ``train_s``: wall-clock seconds of the training loop (``stage_s`` adds set-up and bookkeeping).

    python -m hpsearch.bench lora_recovery [--bits 3] [--rank 16] [--threads 2] [--repeats 1]
        [--model hpsearch/embedded-llama] [--method auto] [override ...]

Trailing ``key=value`` arguments are Hydra overrides of the composed config (e.g.
``stages.lora.time_budget_s=60``). With ``--repeats N`` every number is the median of N runs with
seeds 0..N-1.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

CONF = Path(__file__).resolve().parents[2] / "conf"


def _parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench lora_recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hpsearch/embedded-llama")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--method", default="auto", help="quantizer: auto (gptq if configured, else rtn), rtn, gptq...")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the done-when is on 2 cores)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. stages.lora.time_budget_s=60")
    return p.parse_args(args)


def _compose(ns: argparse.Namespace):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base=None):
        return compose("config", overrides=[f"model.name_or_path={ns.model}", "+stage@stages.lora=lora",
                                            "logging.wandb=false", *ns.overrides])


def _one(cfg, ns: argparse.Namespace, seed: int) -> dict[str, Any]:
    from hpsearch.configuring import instantiate_checked
    from hpsearch.manifest import Manifest
    from hpsearch.models import fresh_copy, load_model
    from hpsearch.objectives.base import EvalContext
    from hpsearch.plan import LayerPlan, Plan
    from hpsearch.stages.base import StageContext
    from hpsearch.structure import structure_of

    loaded = load_model(cfg.model)
    structure = structure_of(loaded.model)
    quantize = instantiate_checked(cfg.stages.quantize, "stages.quantize")
    lora = instantiate_checked(cfg.stages.lora, "stages.lora")
    ppl = instantiate_checked(cfg.objectives.perplexity, "objectives.perplexity")
    method = ns.method if ns.method != "auto" else ("gptq" if "gptq" in quantize.methods else "rtn")
    layer = LayerPlan(bits=ns.bits, group_size=ns.group_size, method=method)
    plan = Plan(layers={li.name: layer for li in structure.block_linears()}, model={"lora_rank": ns.rank})

    def evaluate(model, manifest) -> float:
        return float(ppl.evaluate(model, EvalContext(structure, manifest, loaded.tokenizer, loaded.device, {})))

    baseline = evaluate(loaded.model, Manifest.for_structure(loaded.name, structure))
    model = fresh_copy(loaded)
    manifest = Manifest.for_structure(loaded.name, structure)
    ctx = StageContext(structure, manifest, loaded.tokenizer, loaded.device, seed=seed, calib=cfg.get("calib"),
                       source_model=loaded.model)
    start = time.perf_counter()
    needs = quantize.requires(plan) | lora.requires(plan)
    if needs:
        from hpsearch.calib import calibration_for

        ctx.calibration = calibration_for(ctx, needs)
    quantize.apply(model, plan, ctx)
    quantize_s = time.perf_counter() - start
    compressed = evaluate(model, manifest)
    start = time.perf_counter()
    summary = lora.apply(model, plan, ctx)
    stage_s = time.perf_counter() - start
    recovered = evaluate(model, manifest)
    return {"baseline": baseline, "compressed": compressed, "recovered": recovered,
            "recovered_fraction": (compressed - recovered) / (compressed - baseline),
            "train_s": summary["train_s"], "train_cpu_s": summary["train_cpu_s"], "stage_s": stage_s, "quantize_s": quantize_s, "steps": summary["steps"],
            "method": method, "adapter_params": summary["params"], "adapter_bytes": summary["bytes"],
            "loss_first": summary["loss_first"], "loss_last": summary["loss_last"]}


def run(args: list[str]) -> dict[str, Any]:
    ns = _parse(args)
    torch.set_num_threads(ns.threads)
    cfg = _compose(ns)
    runs = []
    for seed in range(ns.repeats):
        runs.append(_one(cfg, ns, seed))
        print(f"lora_recovery: seed {seed}: {runs[-1]}", file=sys.stderr)
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    result: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    result.update(
        method=runs[0]["method"], bits=ns.bits, group_size=ns.group_size, rank=ns.rank, repeats=ns.repeats,
        model=ns.model, steps_config=int(cfg.stages.lora.steps), time_budget_s=cfg.stages.lora.time_budget_s,
        batch_size=int(cfg.stages.lora.batch_size), seq_len=int(cfg.stages.lora.seq_len),
        lr=float(cfg.stages.lora.lr), alpha=float(cfg.stages.lora.alpha),
        device=f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(), runs=runs if ns.repeats > 1 else None,
    )
    return result
