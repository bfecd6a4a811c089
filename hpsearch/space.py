"""The search space: declared in config, expanded against the model's structure.

A ``search`` config names per-unit parameters (``layer:``), model-wide parameters (``model:``),
values that are fixed rather than searched, and the granularity that decides what a *unit* is:

========== ======================================== =====================================
granularity one unit per                             parameter names
========== ======================================== =====================================
model      the whole model                          ``bits``
block      decoder block                            ``bits.block3``
layer_type kind of linear (``mlp.down_proj``)       ``bits.mlp.down_proj``
layer      linear layer                             ``bits.3.mlp.down_proj``
========== ======================================== =====================================

A parameter is ``{choices: [...]}`` (categorical) or ``{low, high, [step], [log], [type]}``
(int or float) and may carry ``if: {other_field: [values]}``: it is suggested only when the other
field of the same unit (or a model-wide field) took one of those values, e.g. a group size only
for quantized layers. The same parameters always give the same :class:`~hpsearch.plan.Plan`, so the
sweeper and the trial job build plans independently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hpsearch.errors import ConfigError
from hpsearch.plan import ALLOWED_BITS, LAYER_FIELDS, LayerPlan, Plan
from hpsearch.structure import LinearInfo, ModelStructure

__all__ = ["ParamSpec", "SearchSpace", "GRANULARITIES"]

GRANULARITIES = ("model", "block", "layer_type", "layer")


@dataclass(frozen=True)
class ParamSpec:
    """One searched field: its distribution and its condition."""

    field: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    is_int: bool = False
    condition: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def suggest(self, trial, name: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def allows(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.condition)


def _to_plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return value


def _parse_spec(key: str, name: str, raw: Any) -> ParamSpec:
    raw = _to_plain(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping with 'choices' or 'low'/'high', got {raw!r}")
    unknown = set(raw) - {"choices", "low", "high", "step", "log", "type", "if"}
    if unknown:
        raise ConfigError(key, f"unknown keys {sorted(unknown)}; allowed: choices, low, high, step, log, type, if")
    condition = tuple((k, tuple(v if isinstance(v, list) else [v])) for k, v in (raw.get("if") or {}).items())
    if "choices" in raw:
        choices = tuple(raw["choices"])
        if not choices:
            raise ConfigError(f"{key}.choices", "must not be empty")
        return ParamSpec(name, choices=choices, condition=condition)
    if "low" not in raw or "high" not in raw:
        raise ConfigError(key, "needs 'choices', or both 'low' and 'high'")
    low, high = raw["low"], raw["high"]
    if low > high:
        raise ConfigError(key, f"low={low} is above high={high}")
    is_int = raw.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float") == "int"
    return ParamSpec(name, low=low, high=high, step=raw.get("step"), log=bool(raw.get("log", False)),
                     is_int=is_int, condition=condition)


def _check_layer_values(key: str, name: str, values: tuple[Any, ...]) -> None:
    """Values a per-layer field may take, checked before any trial runs."""
    if name == "bits":
        bad = [v for v in values if v not in ALLOWED_BITS]
        if bad:
            raise ConfigError(key, f"bit-width {bad[0]!r} is not allowed; allowed: {', '.join(map(str, ALLOWED_BITS))}")
    elif name == "group_size":
        bad = [v for v in values if not isinstance(v, int) or (v != -1 and v < 1)]
        if bad:
            raise ConfigError(key, f"group size {bad[0]!r} is not allowed; allowed: a positive integer (32, 64, 128...) or -1 (per channel)")
    elif name == "sparsity":
        bad = [v for v in values if not 0.0 <= float(v) < 1.0]
        if bad:
            raise ConfigError(key, f"sparsity {bad[0]!r} is not allowed; allowed: 0 <= sparsity < 1")
    elif name == "pattern":
        for v in values:
            if v == "unstructured":
                continue
            parts = str(v).split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
                raise ConfigError(key, f"pattern {v!r} is not allowed; allowed: unstructured or N:M with N < M (2:4, 4:8)")


@dataclass
class SearchSpace:
    """A ``search`` config expanded against one model's structure."""

    structure: ModelStructure
    granularity: str
    units: dict[str, tuple[LinearInfo, ...]]
    layer_params: tuple[ParamSpec, ...]
    model_params: tuple[ParamSpec, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    model_fixed: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, search_cfg: Mapping[str, Any], structure: ModelStructure) -> SearchSpace:
        cfg = _to_plain(search_cfg) or {}
        allowed_keys = {"granularity", "targets", "layer", "model", "fixed", "model_fixed", "baselines"}
        unknown = set(cfg) - allowed_keys
        if unknown:
            raise ConfigError(f"search.{sorted(unknown)[0]}", f"unknown key; allowed: {', '.join(sorted(allowed_keys))}")
        granularity = cfg.get("granularity", "layer_type")
        if granularity not in GRANULARITIES:
            raise ConfigError("search.granularity", f"{granularity!r} is not allowed; allowed: {', '.join(GRANULARITIES)}")
        targets = cfg.get("targets", "blocks")
        if targets not in ("blocks", "all"):
            raise ConfigError("search.targets", f"{targets!r} is not allowed; allowed: blocks, all")
        linears = structure.block_linears() if targets == "blocks" else structure.linears
        units = _expand_units(linears, granularity)

        layer_params = []
        for name, raw in (cfg.get("layer") or {}).items():
            key = f"search.layer.{name}"
            if name not in LAYER_FIELDS and not name.startswith("x_"):
                raise ConfigError(key, f"unknown layer field; allowed: {', '.join(LAYER_FIELDS)} or x_<name> for stage-specific fields")
            spec = _parse_spec(key, name, raw)
            if spec.choices is not None:
                _check_layer_values(f"{key}.choices", name, spec.choices)
            layer_params.append(spec)
        model_params = [_parse_spec(f"search.model.{n}", n, raw) for n, raw in (cfg.get("model") or {}).items()]
        fixed = dict(cfg.get("fixed") or {})
        for name, value in fixed.items():
            if name not in LAYER_FIELDS and not name.startswith("x_"):
                raise ConfigError(f"search.fixed.{name}", f"unknown layer field; allowed: {', '.join(LAYER_FIELDS)}")
            _check_layer_values(f"search.fixed.{name}", name, (value,))
        field_names = {p.field for p in layer_params} | {p.field for p in model_params} | set(fixed)
        for spec in (*layer_params, *model_params):
            for other, _ in spec.condition:
                if other not in field_names and other not in (cfg.get("model_fixed") or {}):
                    raise ConfigError(f"search.{spec.field}.if", f"refers to {other!r}, which is not a field of this space")
        baselines = {str(k): dict(v or {}) for k, v in (cfg.get("baselines") or {}).items()}
        return cls(structure, granularity, units, tuple(layer_params), tuple(model_params), fixed,
                   dict(cfg.get("model_fixed") or {}), baselines)

    # -- names -----------------------------------------------------------------------------
    def param_name(self, field_name: str, unit: str) -> str:
        return field_name if self.granularity == "model" else f"{field_name}.{unit}"

    # -- sampling --------------------------------------------------------------------------
    def suggest(self, trial) -> dict[str, Any]:
        """Ask ``trial`` for every active parameter; returns the parameters suggested."""
        params: dict[str, Any] = {}
        model_values = dict(self.model_fixed)
        for spec in self.model_params:
            if spec.active(model_values):
                model_values[spec.field] = params[spec.field] = spec.suggest(trial, spec.field)
        for unit in self.units:
            values = {**model_values, **self.fixed}
            for spec in self.layer_params:
                if spec.active(values):
                    name = self.param_name(spec.field, unit)
                    values[spec.field] = params[name] = spec.suggest(trial, name)
        return params

    # -- plans -----------------------------------------------------------------------------
    def to_plan(self, params: Mapping[str, Any]) -> Plan:
        """The plan for a set of parameters; absent ones take the fixed value or the default."""
        model_values = dict(self.model_fixed)
        for spec in self.model_params:
            if spec.field in params and spec.active(model_values):
                model_values[spec.field] = params[spec.field]
        layers: dict[str, LayerPlan] = {}
        for unit, members in self.units.items():
            values = dict(self.fixed)
            for spec in self.layer_params:
                name = self.param_name(spec.field, unit)
                if name in params and spec.active({**model_values, **values}):
                    values[spec.field] = params[name]
            plain = {k: v for k, v in values.items() if k in LAYER_FIELDS}
            extra = tuple(sorted((k, v) for k, v in values.items() if k not in LAYER_FIELDS))
            layer_plan = replace(LayerPlan(), **plain, extra=extra)
            for li in members:
                layers[li.name] = layer_plan
        return Plan(layers=layers, model=model_values)

    def baseline_params(self, name: str) -> dict[str, Any]:
        """The parameters that pin the named baseline (e.g. uniform 4-bit) in this space.

        Raises:
            ValueError: the baseline needs a value the space does not allow (say 16 bits when
                the bit choices are 2-4); the sweeper then skips that baseline.
        """
        spec_values = self.baselines[name]
        params: dict[str, Any] = {}
        model_values = dict(self.model_fixed)
        for spec in self.model_params:
            if spec.active(model_values) and spec.field in spec_values:
                value = spec_values[spec.field]
                if not spec.allows(value):
                    raise ValueError(f"baseline {name!r}: {spec.field}={value!r} is outside the space")
                model_values[spec.field] = params[spec.field] = value
        for unit in self.units:
            values = {**model_values, **self.fixed}
            for spec in self.layer_params:
                if not spec.active(values) or spec.field not in spec_values:
                    continue
                value = spec_values[spec.field]
                if not spec.allows(value):
                    raise ValueError(f"baseline {name!r}: {spec.field}={value!r} is outside the space")
                values[spec.field] = params[self.param_name(spec.field, unit)] = value
        return params

    def describe(self) -> str:
        fields = ", ".join(p.field for p in self.layer_params) or "-"
        return (f"{len(self.units)} units ({self.granularity}) x [{fields}] over "
                f"{sum(len(m) for m in self.units.values())} linear layers, "
                f"{len(self.model_params)} model-wide parameters")


def _expand_units(linears: tuple[LinearInfo, ...], granularity: str) -> dict[str, tuple[LinearInfo, ...]]:
    units: dict[str, list[LinearInfo]] = {}
    for li in linears:
        if granularity == "model":
            unit = "all"
        elif li.block < 0:
            unit = li.kind
        elif granularity == "block":
            unit = f"block{li.block}"
        elif granularity == "layer_type":
            unit = li.kind
        else:
            unit = f"{li.block}.{li.kind}"
        units.setdefault(unit, []).append(li)
    return {u: tuple(m) for u, m in units.items()}
