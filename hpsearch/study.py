"""Opening (or resuming) the Optuna study a sweep writes to.

Storage URLs: ``sqlite:///path.db`` and ``postgresql://...`` open an RDB storage with heartbeats,
so trials of a killed run are failed (not left RUNNING) when the study resumes; a path ending in
``.log`` or ``.jsonl`` opens a journal file storage.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from hpsearch.errors import ConfigError

__all__ = ["open_storage", "make_sampler", "open_study", "SAMPLERS"]

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SAMPLERS = {
    "tpe": "optuna.samplers.TPESampler",
    "nsgaii": "optuna.samplers.NSGAIISampler",
    "nsgaiii": "optuna.samplers.NSGAIIISampler",
    "gp": "optuna.samplers.GPSampler",
    "random": "optuna.samplers.RandomSampler",
    "qmc": "optuna.samplers.QMCSampler",
}


def open_storage(url: str, heartbeat_interval: int | None = 60) -> optuna.storages.BaseStorage:
    """The storage for ``url``; creates the directory of a SQLite or journal file."""
    if url.endswith((".log", ".jsonl")) and "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in url:
        raise ConfigError("hydra.sweeper.storage", f"{url!r} is not a storage URL; use sqlite:///path.db, postgresql://..., or a journal file path ending in .log")
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=heartbeat_interval * 3)
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # bad driver, unreachable server...
        raise ConfigError("hydra.sweeper.storage", f"cannot open {url!r}: {str(exc).splitlines()[0][:160]}") from None


def make_sampler(sampler_cfg: DictConfig | Mapping[str, Any], seed: int | None) -> optuna.samplers.BaseSampler:
    """Instantiate the sampler config group entry; a ``null`` seed takes ``seed``."""
    from hydra.utils import instantiate

    node = OmegaConf.to_container(sampler_cfg, resolve=True) if isinstance(sampler_cfg, DictConfig) else dict(sampler_cfg)
    target = node.get("_target_")
    if target not in SAMPLERS.values():
        raise ConfigError("hydra.sweeper.sampler", f"{target!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
    if node.get("seed") is None:
        node["seed"] = seed
    try:
        return instantiate(node)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError("hydra.sweeper.sampler", f"cannot build {target}: {str(cause).splitlines()[0][:160]}") from None


def open_study(*, storage: optuna.storages.BaseStorage, study_name: str, directions: Sequence[str],
               metric_names: Sequence[str], sampler_cfg: Any, seed: int | None) -> optuna.Study:
    """Create the study or load it; a resumed study must have the same objectives.

    The sampler's seed is shifted by the number of trials already in the study, so a resumed run
    does not replay the first run's random proposals.
    """
    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        old = existing.metric_names or []
        if existing.directions and [d.name.lower() for d in existing.directions] != list(directions):
            raise ConfigError("objectives", f"study {study_name!r} exists with directions {[d.name.lower() for d in existing.directions]}, not {list(directions)}; use another hydra.sweeper.study_name")
        if old and list(old) != list(metric_names):
            raise ConfigError("objectives", f"study {study_name!r} exists with objectives {old}, not {list(metric_names)}; use another hydra.sweeper.study_name")
        done = len(existing.trials)
    else:
        done = 0
    sampler = make_sampler(sampler_cfg, None if seed is None else seed + done)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=list(directions),
                                sampler=sampler, load_if_exists=True)
    if not study.metric_names:
        study.set_metric_names(list(metric_names))
    if done:
        from optuna.storages import fail_stale_trials

        try:
            fail_stale_trials(study)
        except (ValueError, NotImplementedError):  # storages without heartbeats
            pass
    return study
