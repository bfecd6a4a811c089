"""Hydra plugin entry point of hpsearch's sweeper.

Hydra imports every module under ``hydra_plugins`` when it discovers plugins, so this one stays
light: the real sweeper (torch, transformers, optuna) is imported on first use.
Selected with ``hydra/sweeper: hpsearch`` (``conf/hydra/sweeper/hpsearch.yaml``).
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


class HPSearchSweeper(Sweeper):
    """Lazy-import front of :class:`hpsearch.sweeper.StudySweeper` (see its docstring for keys)."""

    def __init__(self, **kwargs: Any) -> None:
        from hpsearch.sweeper import StudySweeper

        self._impl = StudySweeper(**kwargs)

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self._impl.sweep(arguments)
