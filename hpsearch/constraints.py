"""Budgets as Optuna constraints: ``"memory_gb <= 1.5"`` becomes ``memory_gb - 1.5 <= 0``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hpsearch.errors import ConfigError

__all__ = ["Constraint", "parse_constraints"]

_PATTERN = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound`` on an objective or a reported attribute."""

    metric: str
    op: str
    bound: float

    @property
    def key(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"

    def violation(self, value: float) -> float:
        """Optuna's convention: feasible when the returned value is <= 0."""
        return value - self.bound if self.op == "<=" else self.bound - value


def parse_constraints(items: Iterable[str], metrics: Iterable[str]) -> list[Constraint]:
    """Parse the ``constraints`` list; each metric must be one the trials report."""
    known = list(metrics)
    out = []
    for i, item in enumerate(items or []):
        match = _PATTERN.match(str(item))
        if not match:
            raise ConfigError(f"constraints[{i}]", f"{item!r} is not '<metric> <= <number>' or '<metric> >= <number>'")
        metric, op, bound = match.group(1), match.group(2), float(match.group(3))
        if metric not in known:
            raise ConfigError(f"constraints[{i}]", f"unknown metric {metric!r}; allowed: {', '.join(known)}")
        out.append(Constraint(metric, op, bound))
    return out


def constraint_values(constraints: Iterable[Constraint], metrics: Mapping[str, float]) -> dict[str, float]:
    return {c.key: c.violation(float(metrics[c.metric])) for c in constraints}
