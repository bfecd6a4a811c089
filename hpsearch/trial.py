"""One trial: model (cached) -> calibration statistics (cached) -> stages -> objectives -> log.

This is the Hydra task function's body. It rebuilds the trial's plan from ``trial.params``
with the same search space the sweeper used, so a job needs nothing from the sweeper but its
overrides (and works the same under joblib or SLURM launchers).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from hpsearch.configuring import instantiate_checked
from hpsearch.errors import ConfigError
from hpsearch.manifest import Manifest
from hpsearch.models import LoadedModel, fresh_copy, load_model
from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.plan import Plan
from hpsearch.space import SearchSpace
from hpsearch.stages.base import Stage, StageContext
from hpsearch.structure import ModelStructure, structure_of

__all__ = ["CompressedTrial", "TrialSetup", "compress", "compressed_model", "job_directory", "run_trial"]

log = logging.getLogger(__name__)


class TrialSetup:
    """Everything a trial builds from config alone: structure, space, stages, objectives."""

    def __init__(self, cfg: DictConfig, structure: ModelStructure) -> None:
        self.structure = structure
        self.space = SearchSpace.from_config(cfg.search, structure)
        pipeline = list(cfg.get("pipeline") or [])
        stages_cfg = cfg.get("stages") or {}
        for i, name in enumerate(pipeline):
            if name not in stages_cfg:
                raise ConfigError(f"pipeline[{i}]", f"{name!r} is not a configured stage; configured: {', '.join(stages_cfg) or 'none'}")
        self.stages: list[tuple[str, Stage]] = [
            (name, instantiate_checked(stages_cfg[name], f"stages.{name}")) for name in pipeline
        ]
        objectives_cfg = cfg.get("objectives") or {}
        if not objectives_cfg:
            raise ConfigError("objectives", "at least one objective is needed (perplexity, memory, latency...)")
        self.objectives: list[Objective] = [
            instantiate_checked(node, f"objectives.{key}") for key, node in objectives_cfg.items()
        ]
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ConfigError("objectives", f"objective names must be unique, got {names}")

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


@functools.lru_cache(maxsize=4)
def _structure(loaded: LoadedModel) -> ModelStructure:
    return structure_of(loaded.model)


def job_directory() -> Path:
    """The Hydra job's output directory (the working directory outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return Path.cwd()


def _wandb_directory(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)
    except (ValueError, ImportError):
        return Path.cwd()


def compress(model: torch.nn.Module, plan: Plan, setup: TrialSetup, ctx: StageContext) -> dict[str, float]:
    """Run the pipeline's stages on ``model`` in order; returns seconds per stage."""
    needs: set[str] = set()
    for _, stage in setup.stages:
        needs |= stage.requires(plan)
    if needs:
        from hpsearch.calib import calibration_for  # needs the calibration package (GPTQ issue)

        ctx.calibration = calibration_for(ctx, needs)
    timings: dict[str, float] = {}
    for name, stage in setup.stages:
        start = time.perf_counter()
        summary = stage.apply(model, plan, ctx)
        seconds = time.perf_counter() - start
        timings[f"stage_{name}_s"] = seconds
        ctx.manifest.add_stage(name, type(stage).__name__, seconds, summary or {})
    return timings


@dataclass
class CompressedTrial:
    """A trial's model after its stages, with what it was built from."""

    model: torch.nn.Module
    loaded: LoadedModel
    setup: TrialSetup
    structure: ModelStructure
    manifest: Manifest
    ctx: StageContext
    params: dict[str, Any]
    plan: Plan
    timings: dict[str, float]


def compressed_model(cfg: DictConfig) -> CompressedTrial:
    """Load the model and run the trial's stages for ``cfg.trial.params``, seeded as the trial is
    (``seed + trial.number``), so that the same config gives the same model: what a trial evaluates
    and what :mod:`hpsearch.export` writes out."""
    start = time.perf_counter()
    seed = int(cfg.get("seed", 0)) + int(cfg.trial.number or 0)
    torch.manual_seed(seed)
    loaded = load_model(cfg.model)
    structure = _structure(loaded)  # LoadedModel hashes by identity
    setup = TrialSetup(cfg, structure)
    params = OmegaConf.to_container(cfg.trial.params, resolve=True) if cfg.trial.get("params") else {}
    plan = setup.space.to_plan(params)
    timings = {"load_s": time.perf_counter() - start}

    model = fresh_copy(loaded)
    manifest = Manifest.for_structure(loaded.name, structure)
    ctx = StageContext(structure, manifest, loaded.tokenizer, loaded.device, seed=seed,
                       calib=cfg.get("calib"), source_model=loaded.model)
    timings.update(compress(model, plan, setup, ctx))
    return CompressedTrial(model, loaded, setup, structure, manifest, ctx, params, plan, timings)


def run_trial(cfg: DictConfig) -> dict[str, Any]:
    """Compress and evaluate the model for ``cfg.trial.params``; the Hydra task function's body.

    Returns:
        ``{"values": {objective: value}, "attrs": {...}, "timings": {...}}``. Raises on errors;
        the sweeper records a raised error or a NaN value as a failed trial.
    """
    start = time.perf_counter()
    built = compressed_model(cfg)
    model, loaded, setup, structure, manifest, ctx = (built.model, built.loaded, built.setup, built.structure,
                                                      built.manifest, built.ctx)
    params, plan, timings = built.params, built.plan, built.timings
    del built

    deployment = OmegaConf.to_container(cfg.get("deployment") or {}, resolve=True)
    ectx = EvalContext(structure, manifest, loaded.tokenizer, loaded.device, deployment, artifacts=ctx.artifacts,
                       source_model=loaded.model)
    values: dict[str, float] = {}
    for objective in setup.objectives:
        t = time.perf_counter()
        values[objective.name] = float(objective.evaluate(model, ectx))
        timings[f"objective_{objective.name}_s"] = time.perf_counter() - t
    del model
    timings["trial_s"] = time.perf_counter() - start

    job_dir = job_directory()
    job_dir.mkdir(parents=True, exist_ok=True)
    manifest.model.setdefault("plan_params", params)
    manifest.save(job_dir / "manifest.json")
    attrs = dict(ectx.attrs)
    study_name = str(cfg.trial.get("study") or "single")
    try:
        run_dir = _log_to_wandb(cfg, study_name, plan, values, attrs, timings, manifest)
        if run_dir:
            attrs["wandb_run_dir"] = run_dir
    except Exception as exc:  # logging must never lose a finished evaluation
        log.warning("W&B logging failed: %s", exc)
        attrs["wandb_error"] = str(exc)[:200]
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        attrs["nonfinite"] = ",".join(bad)
    return {"values": values, "attrs": attrs, "timings": timings, "manifest": str(job_dir / "manifest.json")}


def _log_to_wandb(cfg, study_name, plan, values, attrs, timings, manifest) -> str | None:
    from hpsearch.tracking import log_trial

    logging_cfg = OmegaConf.to_container(cfg.get("logging") or {}, resolve=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return log_trial(logging_cfg=logging_cfg, directory=_wandb_directory(cfg), study_name=study_name,
                     number=cfg.trial.get("number"), config=resolved, plan=plan.to_dict(), values=values,
                     attrs=attrs, timings=timings, manifest_table=manifest.table())
