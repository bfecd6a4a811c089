"""hpsearch's Hydra sweeper: an Optuna 5 ask/tell loop whose batches go through Hydra's launcher.

The loop (after Hydra's own ``BasicSweeper`` and the Optuna plugin's ``_impl.py``):

1. validate the config and expand the search space against the model's structure (no weights);
2. open or resume the study; enqueue the baselines (uncompressed, uniform 8-bit, uniform 4-bit);
3. until the study holds ``n_trials`` finished trials: ask ``n_jobs`` trials, turn each one's
   parameters into job overrides, ``launcher.launch`` the batch, tell the results; a job that
   raised, or returned a NaN, is a FAILED trial with its reason in ``fail_reason``;
4. write the report and the W&B ``pareto`` run.

The official ``hydra-optuna-sweeper`` pins ``optuna<3``, which cannot live beside
optuna-dashboard or SQLAlchemy 2; this is why the project has its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hpsearch.constraints import Constraint, parse_constraints
from hpsearch.errors import ConfigError
from hpsearch.models import load_config, resolve_device, resolve_dtype
from hpsearch.structure import structure_from_config
from hpsearch.study import open_storage, open_study
from hpsearch.trial import TrialSetup

__all__ = ["StudySweeper", "format_override_value", "params_override", "REPORTED_ATTRS"]

log = logging.getLogger("hpsearch")

# Ask/tell with heartbeats, metric names and grouped TPE are what this sweeper is built on; the
# warnings that they are experimental or "meant for Study.optimize" only add noise to every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

#: Attributes objectives report beside their values, usable in ``constraints``.
REPORTED_ATTRS = ("weights_gb", "kv_cache_gb", "prefill_ms", "decode_tok_s")


def format_override_value(value: Any) -> str:
    """A value in Hydra's override grammar (strings quoted, so ``2:4`` stays a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return "null"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def params_override(params: dict[str, Any]) -> str:
    body = ",".join(f"{k}:{format_override_value(v)}" for k, v in params.items())
    return f"trial.params={{{body}}}"


class _Heartbeat:
    """Records heartbeats of running trials while a batch runs, so a killed sweep's trials are
    failed on resume instead of staying RUNNING forever."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_ids: Sequence[int], interval: float) -> None:
        self._storage, self._ids, self._interval = storage, list(trial_ids), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for trial_id in self._ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:  # best effort: never break the sweep
                    pass

    def __enter__(self) -> _Heartbeat:
        if isinstance(self._storage, optuna.storages.RDBStorage) and self._storage.get_heartbeat_interval():
            for trial_id in self._ids:
                self._storage.record_heartbeat(trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


class StudySweeper:
    """The sweeper's behaviour; :class:`hydra_plugins.hpsearch_sweeper.HPSearchSweeper` forwards to it.

    Args:
        sampler: a ``hydra/sweeper/sampler`` entry (tpe, nsgaii, nsgaiii, gp, random, qmc).
        storage: Optuna storage URL (default a SQLite file under ``multirun/``).
        study_name: the study to create or resume.
        n_trials: finished trials (complete or failed) the study should hold.
        n_jobs: trials per launcher batch.
        seed: sampler seed (shifted by the trials already run when resuming).
        baselines: enqueue the search config's baselines.
        max_failure_rate: stop when more than this share of this run's trials failed.
        report: write the report at the end.
        heartbeat_interval: seconds between heartbeats of running trials (RDB storages).
    """

    def __init__(self, *, sampler: Any, storage: str = "sqlite:///multirun/hpsearch.db", study_name: str = "hpsearch",
                 n_trials: int = 20, n_jobs: int = 1, seed: int | None = 0, baselines: bool = True,
                 max_failure_rate: float = 1.0, report: bool = True, heartbeat_interval: int = 60,
                 sensitivity_seeds: int = 0) -> None:
        if n_trials < 1:
            raise ConfigError("hydra.sweeper.n_trials", f"{n_trials} is not allowed; allowed: an integer >= 1")
        if n_jobs < 1:
            raise ConfigError("hydra.sweeper.n_jobs", f"{n_jobs} is not allowed; allowed: an integer >= 1")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ConfigError("hydra.sweeper.max_failure_rate", f"{max_failure_rate} is not allowed; allowed: 0..1")
        self.sampler_cfg, self.storage_url, self.study_name = sampler, str(storage), str(study_name)
        self.n_trials, self.n_jobs, self.seed = int(n_trials), int(n_jobs), seed
        self.enqueue_baselines, self.max_failure_rate, self.write_report = baselines, max_failure_rate, report
        self.heartbeat_interval = heartbeat_interval
        if sensitivity_seeds < 0:
            raise ConfigError("hydra.sweeper.sensitivity_seeds", f"{sensitivity_seeds} is not allowed; allowed: an integer >= 0")
        self.sensitivity_seeds = int(sensitivity_seeds)
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- the loop --------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        setup, constraints = validate(self.config)
        space = setup.space
        log.info("search space: %s", space.describe())
        storage = open_storage(self.storage_url, self.heartbeat_interval)
        study = open_study(storage=storage, study_name=self.study_name, directions=setup.directions,
                           metric_names=setup.objective_names, sampler_cfg=self.sampler_cfg, seed=self.seed)
        baseline_params = self._enqueue_baselines(study, space) if self.enqueue_baselines else {}
        if self.sensitivity_seeds and not study.user_attrs.get("sensitivity_seeded"):
            self._enqueue_sensitivity_seeds(study, space)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study.set_user_attr("model", str(self.config.model.name_or_path))
        study.set_user_attr("objectives", setup.objective_names)

        finished = sum(t.state.is_finished() for t in study.trials)
        if finished:
            log.info("resuming study %r: %d of %d trials finished", self.study_name, finished, self.n_trials)
        returns: list[Sequence[JobReturn]] = []
        run_done = run_failed = 0
        while finished < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - finished)
            trials = [study.ask() for _ in range(batch)]
            overrides = []
            for trial in trials:
                params = space.suggest(trial)
                name = next((n for n, p in baseline_params.items() if p == trial.params), None)
                if name is not None:
                    trial.set_user_attr("baseline", name)
                overrides.append([*arguments, f"trial.number={trial.number}",
                                  f"trial.study={format_override_value(self.study_name)}", params_override(params)])
            start = time.perf_counter()
            try:
                with _Heartbeat(storage, [t._trial_id for t in trials], self.heartbeat_interval or 60):
                    results = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException as exc:  # Ctrl-C or a launcher crash: record, never leave RUNNING
                for trial in trials:
                    _fail(study, trial, f"interrupted: {type(exc).__name__}")
                raise
            self.job_idx += batch
            seconds = (time.perf_counter() - start) / batch
            for trial, result in zip(trials, results):
                ok = self._tell(study, trial, result, setup.objective_names, constraints)
                run_done += 1
                run_failed += not ok
                finished += 1
                self._print_line(study, trial.number, finished, seconds)
            returns.append(results)
            if run_done >= max(2, self.n_jobs) and run_failed / run_done > self.max_failure_rate:
                log.error("stopping: %d of %d trials failed (max_failure_rate=%s)", run_failed, run_done, self.max_failure_rate)
                break
        self._finish(study, sweep_dir)
        return returns

    def _enqueue_baselines(self, study: optuna.Study, space) -> dict[str, dict[str, Any]]:
        baseline_params = {}
        for name in space.baselines:
            try:
                params = space.baseline_params(name)
            except ValueError as exc:
                log.warning("baseline skipped: %s", exc)
                continue
            baseline_params[name] = params
            study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
        return baseline_params

    def _enqueue_sensitivity_seeds(self, study: optuna.Study, space) -> None:
        from hpsearch.sensitivity import sensitivity_seeds

        seeds = sensitivity_seeds(space, self.config, self.sensitivity_seeds)
        for i, params in enumerate(seeds):
            study.enqueue_trial(params, user_attrs={"seed": f"sensitivity-{i}"}, skip_if_exists=True)
        study.set_user_attr("sensitivity_seeded", len(seeds))
        log.info("enqueued %d sensitivity-seeded trials (Fisher- and Hessian-weighted error of the method vs bytes)", len(seeds))

    def _tell(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn, names: list[str],
              constraints: list[Constraint]) -> bool:
        if result.status == JobStatus.FAILED:
            exc = result._return_value
            _fail(study, trial, f"{type(exc).__name__}: {str(exc).strip()[:500]}")
            return False
        ret = result.return_value or {}
        values, attrs = ret.get("values", {}), ret.get("attrs", {})
        missing = [n for n in names if n not in values]
        if missing:
            _fail(study, trial, f"objectives missing from the job's result: {missing}")
            return False
        bad = [n for n in names if not math.isfinite(float(values[n]))]
        for key, value in {**attrs, **{f"time_{k}": v for k, v in ret.get("timings", {}).items()}}.items():
            if isinstance(value, (int, float, str, bool)) and not (isinstance(value, float) and math.isnan(value)):
                trial.set_user_attr(key, value)
        if "manifest" in ret:
            trial.set_user_attr("manifest", ret["manifest"])
        if bad:
            _fail(study, trial, f"objective {bad[0]} is {values[bad[0]]}")
            return False
        metrics = {**{k: v for k, v in attrs.items() if isinstance(v, (int, float))}, **values}
        for c in constraints:
            trial.set_constraint(c.key, c.violation(float(metrics[c.metric])))
        study.tell(trial, [float(values[n]) for n in names])
        return True

    def _print_line(self, study: optuna.Study, number: int, finished: int, seconds: float) -> None:
        frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        if frozen.state == optuna.trial.TrialState.COMPLETE:
            names = study.metric_names or [f"v{i}" for i in range(len(frozen.values))]
            text = "  ".join(f"{n}={v:.4g}" for n, v in zip(names, frozen.values))
        else:
            text = f"FAILED: {frozen.user_attrs.get('fail_reason', '?')}"
        label = frozen.user_attrs.get("baseline") or frozen.user_attrs.get("seed")
        tag = f" [{label}]" if label else ""
        log.info("trial %d (%d/%d)%s %s  (%.1fs)", number, finished, self.n_trials, tag, text, seconds)

    def _finish(self, study: optuna.Study, sweep_dir: Path) -> None:
        from hpsearch.report import report_directory, write_report

        if not self.write_report:
            return
        out = report_directory(self.storage_url, self.study_name, sweep_dir)
        paths = write_report(study, out, storage_url=self.storage_url)
        try:
            from hpsearch.report import log_pareto_run

            log_pareto_run(study, self.config, sweep_dir)
        except Exception as exc:  # the report on disk is what matters
            log.warning("W&B pareto run failed: %s", exc)
        print(paths["front_text"], flush=True)
        log.info("report: %s", paths["report"])
        log.info("dashboard: optuna-dashboard %s", self.storage_url)


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def validate(config: DictConfig) -> tuple[TrialSetup, list[Constraint]]:
    """Everything checkable before a trial runs: model, space, stages, objectives, constraints."""
    device = resolve_device(str(config.model.get("device", "auto")))
    resolve_dtype(str(config.model.get("dtype", "auto")), device)
    structure = structure_from_config(load_config(str(config.model.name_or_path)))
    setup = TrialSetup(config, structure)
    metrics = [*setup.objective_names, *REPORTED_ATTRS]
    raw = config.get("constraints") or []
    raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else list(raw)
    constraints = parse_constraints(raw, metrics)
    return setup, constraints

