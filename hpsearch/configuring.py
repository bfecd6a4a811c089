"""Instantiating config entries (stages, objectives) with one-line errors for bad keys.

``hydra.utils.instantiate`` reports an unknown keyword as a multi-line traceback from deep in
the constructor; here every ``_target_`` node is checked against its class's signature first,
so ``stages.quantize.methodz`` fails at once, naming the key and the keys allowed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from hpsearch.errors import ConfigError

__all__ = ["instantiate_checked", "check_node"]


def _locate(target: str, key: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}._target_", f"{target!r} cannot be imported") from None


def check_node(node: Any, key: str) -> None:
    """Raise :class:`ConfigError` for unknown keyword arguments anywhere under ``node``."""
    if isinstance(node, (DictConfig, Mapping)):
        if "_target_" in node:
            cls = _locate(str(node["_target_"]), key)
            params = inspect.signature(cls).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            allowed = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            for k in node:
                if str(k).startswith("_"):
                    continue
                if not takes_any and k not in allowed:
                    raise ConfigError(f"{key}.{k}", f"unknown key for {cls.__name__}; allowed: {', '.join(allowed) or 'none'}")
        for k in node:
            check_node(node[k], f"{key}.{k}")
    elif isinstance(node, (ListConfig, list)):
        for i, item in enumerate(node):
            check_node(item, f"{key}[{i}]")


def instantiate_checked(node: Any, key: str) -> Any:
    """Check ``node`` then instantiate it; a constructor's :class:`ConfigError` propagates as it is."""
    from hydra.utils import instantiate

    check_node(node, key)
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    try:
        return instantiate(node, _convert_="all")
    except ConfigError:
        raise
    except Exception as exc:  # hydra wraps constructor errors in InstantiationException
        cause = exc.__cause__ or exc
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(key, f"cannot build it: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
