"""The Hydra application: ``python -m hpsearch [overrides] [-m]``.

With ``-m`` the hpsearch sweeper runs a study (each job is one trial); without it, one trial of
``trial.params`` runs and prints its objectives. Before Hydra starts, the command line is composed
and checked (:func:`precheck`), so a bad key or value fails in about a second with one line naming
the key and what is allowed, instead of a traceback minutes into a study.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig

from hpsearch.errors import ConfigError

__all__ = ["task", "precheck", "main"]

log = logging.getLogger("hpsearch")

_HYDRA_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                           "--experimental-rerun", "--package", "-p", "--info", "-i", "--cfg", "-c"}


@hydra.main(version_base="1.3", config_path="pkg://hpsearch.conf", config_name="config")
def task(cfg: DictConfig) -> dict[str, Any]:
    from hpsearch.trial import run_trial

    result = run_trial(cfg)
    if cfg.trial.get("number") is None:  # a single run: show what it measured
        values = "  ".join(f"{k}={v:.4g}" for k, v in result["values"].items())
        log.info("objectives: %s", values)
        log.info("manifest: %s", result["manifest"])
    return result


def _overrides(argv: Sequence[str]) -> list[str] | None:
    """The config overrides of a command line, or ``None`` when Hydra is asked for something else
    (``--help``, ``--cfg``, shell completion...)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-h", "--help", "--hydra-help", "--version", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"):
            return None
        if arg in _HYDRA_FLAGS_WITH_VALUE:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        out.append(arg)
    return out


def _missing_option_message(exc: Exception) -> str:
    """One line from Hydra's 'Could not find ...' error: the group, the value, the options."""
    from hydra.errors import MissingConfigException

    text = str(exc).strip().splitlines()
    if isinstance(exc, MissingConfigException) and getattr(exc, "options", None):
        missing = getattr(exc, "missing_cfg_file", "") or ""
        group, _, value = str(missing).rpartition("/")
        return f"{group or 'config'}: {value!r} is not allowed; allowed: {', '.join(sorted(exc.options))}"
    return text[0] if text else type(exc).__name__


def _unknown_key_message(exc: Exception, compose, overrides: list[str]) -> str | None:
    """For ``Could not override 'a.b.c'``: name the key and the keys its parent allows."""
    import re

    from omegaconf import OmegaConf

    match = re.search(r"Could not override '([^']+)'", str(exc))
    if not match:
        return None
    key = match.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
    try:
        node = OmegaConf.select(compose("config", overrides=rest), parent) if parent else compose("config", overrides=rest)
    except Exception:
        node = None
    if node is None or not OmegaConf.is_dict(node):
        return f"{key}: unknown key ({parent or 'config'} does not exist); prefix with + to add it"
    allowed = ", ".join(str(k) for k in node.keys() if not str(k).startswith("_")) or "none"
    return f"{key}: unknown key; allowed keys of {parent or 'the config'}: {allowed} (prefix with + to add a key)"


def precheck(argv: Sequence[str]) -> None:
    """Compose the config of ``argv`` and validate it; raises :class:`ConfigError` (one line)."""
    overrides = _overrides(argv)
    if overrides is None:
        return
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="hpsearch.conf", version_base="1.3"):
            try:
                cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            except Exception as exc:
                message = _unknown_key_message(exc, compose, list(overrides)) or _missing_option_message(exc)
                raise ConfigError("overrides", message) from None
            from hpsearch.study import make_sampler
            from hpsearch.sweeper import StudySweeper, validate

            validate(cfg)
            if any(a in ("-m", "--multirun") for a in argv):
                sweeper = {k: v for k, v in cfg.hydra.sweeper.items() if not str(k).startswith("_")}
                make_sampler(sweeper["sampler"], 0)
                StudySweeper(**sweeper)
    finally:
        GlobalHydra.instance().clear()


def _expose_plugin() -> None:
    """Make Hydra's plugin scan see this checkout's ``hydra_plugins`` under an editable install.

    setuptools' editable finder serves packages through a path hook that ``pkgutil`` cannot list,
    and Hydra lists ``hydra_plugins`` with ``pkgutil``; a regular install needs nothing here.
    """
    from pathlib import Path

    import hydra_plugins

    local = Path(__file__).resolve().parent.parent / "hydra_plugins"
    if (local / "hpsearch_sweeper").is_dir() and str(local) not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(str(local))


def main() -> None:
    _expose_plugin()
    try:
        precheck(sys.argv[1:])
    except ConfigError as exc:
        print(f"hpsearch: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    task()
