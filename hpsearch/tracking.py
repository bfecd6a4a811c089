"""Weights & Biases logging: one run per trial, and one ``pareto`` run per study.

Runs are offline unless an API key is set (``logging.mode: auto``), so nothing reaches the
network by surprise; ``wandb sync <sweep dir>/wandb`` uploads them later. A failure to log never
fails a trial: the error is recorded in the trial's attributes instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["wandb_mode", "log_trial", "log_pareto"]

log = logging.getLogger(__name__)


def wandb_mode(mode: str) -> str:
    """``auto`` is ``online`` when an API key is configured, else ``offline``."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return "online"
    return "offline"


def _settings():
    import wandb

    # No system-stats sampler, console capture or git probing: a trial is seconds long and a
    # study has hundreds of them.
    return wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True,
                          disable_git=True, save_code=False, init_timeout=120)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def log_trial(*, logging_cfg: Mapping[str, Any], directory: str | Path, study_name: str, number: int | None,
              config: Mapping[str, Any], plan: Mapping[str, Any], values: Mapping[str, float],
              attrs: Mapping[str, Any], timings: Mapping[str, float], manifest_table: tuple[list[str], list[list[Any]]]
              ) -> str | None:
    """Log one trial as its own run; returns the run's directory (or ``None`` when logging is off)."""
    if not logging_cfg.get("wandb", True):
        return None
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    name = f"{study_name}-trial-{number}" if number is not None else f"{study_name}-single"
    run = wandb.init(
        project=logging_cfg.get("project", "hpsearch"), entity=logging_cfg.get("entity"), dir=str(directory),
        group=study_name, job_type="trial", name=name, mode=wandb_mode(logging_cfg.get("mode", "auto")),
        config={**config, "plan": plan, "trial_number": number}, reinit="finish_previous", settings=_settings(),
    )
    try:
        run.summary.update({k: _clean(v) for k, v in values.items()})
        run.summary.update({f"time/{k}": v for k, v in timings.items()})
        run.summary.update({f"attr/{k}": _clean(v) for k, v in attrs.items() if isinstance(v, (int, float, str, bool))})
        columns, rows = manifest_table
        run.log({"manifest": wandb.Table(columns=columns, data=[[_clean(c) for c in r] for r in rows], allow_mixed_types=True)})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def log_pareto(*, logging_cfg: Mapping[str, Any], directory: str | Path, study_name: str,
               columns: Sequence[str], rows: Sequence[Sequence[Any]], summary: Mapping[str, Any]) -> str | None:
    """One ``pareto`` run holding a table of all trials with an ``is_pareto`` flag."""
    if not logging_cfg.get("wandb", True):
        return None
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=logging_cfg.get("project", "hpsearch"), entity=logging_cfg.get("entity"), dir=str(directory),
        group=study_name, job_type="pareto", name=f"{study_name}-pareto",
        mode=wandb_mode(logging_cfg.get("mode", "auto")), reinit="finish_previous", settings=_settings(),
    )
    try:
        run.log({"trials": wandb.Table(columns=list(columns), data=[[_clean(c) for c in r] for r in rows], allow_mixed_types=True)})
        run.summary.update(dict(summary))
        return str(Path(run.dir).parent)
    finally:
        run.finish()
