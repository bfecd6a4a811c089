"""The study's report: the Pareto front as a table, ``report.md``, ``pareto.csv``, ``trials.csv``
and plots (accuracy against every other objective, PNG), next to the storage.

``python -m hpsearch.report --storage sqlite:///multirun/hpsearch.db --study quickstart``
renders it again for any storage and study.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["report_directory", "front", "beats_baselines", "feature_wins", "FEATURES", "write_report", "log_pareto_run", "main"]


def report_directory(storage_url: str, study_name: str, fallback: Path) -> Path:
    """``<storage dir>/<study>`` for file storages, else ``<fallback>/<study>``."""
    if storage_url.startswith("sqlite:///"):
        return Path(storage_url[len("sqlite:///"):]).expanduser().parent / study_name
    if "://" not in storage_url:
        return Path(storage_url).expanduser().parent / study_name
    return Path(fallback) / study_name


def front(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible non-dominated complete trials (Optuna's own definition)."""
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def beats_baselines(study: optuna.Study, accuracy: int = 0, memory: int = 1) -> list[tuple[int, str]]:
    """Pairs (trial number, baseline name) where a front point uses less memory than the
    baseline at equal or better accuracy (objective indices as given)."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    baselines = [t for t in complete if "baseline" in t.user_attrs]
    sign = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]
    out = []
    for t in front(study):
        if "baseline" in t.user_attrs:
            continue
        for b in baselines:
            acc_ok = sign[accuracy] * t.values[accuracy] <= sign[accuracy] * b.values[accuracy]
            mem_better = sign[memory] * t.values[memory] < sign[memory] * b.values[memory]
            if acc_ok and mem_better:
                out.append((t.number, b.user_attrs["baseline"]))
    return out


def _field_values(params: dict[str, Any], *fields: str) -> list[Any]:
    """Values of the parameters named ``field`` or ``field.<unit>``."""
    return [v for k, v in params.items() if k.split(".", 1)[0] in fields]


#: Compression families a study may search; each is compared with the trials that do without it.
FEATURES = {
    "sparsity": lambda p: any(float(v) > 0 for v in _field_values(p, "sparsity")),
    "LoRA adapters": lambda p: bool(p.get("lora", True)) and any(int(v) > 0 for v in _field_values(p, "lora_rank")),
    "a quantized KV cache": lambda p: any(int(v) < 16 for v in _field_values(p, "kv_k_bits", "kv_v_bits")),
}


def feature_wins(study: optuna.Study, uses, accuracy: int = 0, memory: int = 1) -> tuple[list[int], int, int] | None:
    """Front trials using a feature that no trial without it matches on memory at equal or better
    accuracy; ``None`` when the study did not compare (all trials use it, or none does)."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    with_f = [t for t in complete if uses(t.params)]
    without = [t for t in complete if not uses(t.params)]
    if not with_f or not without:
        return None
    sign = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]

    def covers(w, t):  # w is at least as accurate and at most as large as t
        return (sign[accuracy] * w.values[accuracy] <= sign[accuracy] * t.values[accuracy]
                and sign[memory] * w.values[memory] <= sign[memory] * t.values[memory])

    wins = [t.number for t in front(study) if uses(t.params) and not any(covers(w, t) for w in without)]
    return wins, len(with_f), len(without)


def roofline_agreement(trials: Sequence[FrozenTrial]) -> dict[str, float] | None:
    """How the roofline model compares with measured latency over the trials that have both.

    Returns ``None`` when no trial was measured; else the number of trials, the median absolute
    relative error of the roofline, its range (signed: positive means the roofline is slower than
    measured) and the Spearman rank correlation of the two (does the model order trials as the
    measurement does?).
    """
    pairs = [(float(t.user_attrs["latency_roofline_ms"]), float(t.user_attrs["roofline_error"]))
             for t in trials if t.state == TrialState.COMPLETE and "roofline_error" in t.user_attrs
             and "latency_roofline_ms" in t.user_attrs]
    if not pairs:
        return None
    errors = [e for _, e in pairs]
    measured = [r / (1.0 + e) for r, e in pairs]  # error = (roofline - measured) / measured
    out = {"trials": len(pairs), "median_abs_error": statistics.median(abs(e) for e in errors),
           "min_error": min(errors), "max_error": max(errors),
           "spearman": _spearman([r for r, _ in pairs], measured)}
    if len(pairs) >= 3:
        out.update(_affine_calibration([r for r, _ in pairs], measured))
    return out


def _affine_calibration(roofline: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Least-squares ``measured ~ offset + slope * roofline`` over the study's trials: the roofline
    calibrated to this device and deployment (the offset absorbs what the model leaves out, e.g.
    kernel launches on small models). Returns the fit, its R^2 and the median absolute relative
    error of the calibrated roofline (in-sample)."""
    n = len(roofline)
    mr, mm = sum(roofline) / n, sum(measured) / n
    srr = sum((r - mr) ** 2 for r in roofline)
    slope = sum((r - mr) * (m - mm) for r, m in zip(roofline, measured)) / srr if srr else 0.0
    offset = mm - slope * mr
    fitted = [offset + slope * r for r in roofline]
    ss_res = sum((m - f) ** 2 for m, f in zip(measured, fitted))
    ss_tot = sum((m - mm) ** 2 for m in measured)
    return {"calibrated_offset_ms": offset, "calibrated_slope": slope,
            "calibrated_r2": 1.0 - ss_res / ss_tot if ss_tot else float("nan"),
            "calibrated_median_abs_error": statistics.median(abs(f - m) / m for f, m in zip(fitted, measured))}


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def _rows(study: optuna.Study, trials: Sequence[FrozenTrial], front_ids: set[int]) -> tuple[list[str], list[list[Any]]]:
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    param_names = sorted({k for t in trials for k in t.params})
    columns = ["number", "state", "baseline", "is_pareto", "feasible", *names, *param_names, "fail_reason"]
    rows = []
    for t in trials:
        values = list(t.values) if t.values else [None] * len(names)
        rows.append([t.number, t.state.name, t.user_attrs.get("baseline", ""), t.number in front_ids, _feasible(t),
                     *values, *[t.params.get(p, "") for p in param_names], t.user_attrs.get("fail_reason", "")])
    return columns, rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _plots(study: optuna.Study, out: Path, front_ids: set[int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    paths = []
    for j in range(1, len(names)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        rest = [t for t in complete if t.number not in front_ids]
        ax.scatter([t.values[j] for t in rest], [t.values[0] for t in rest], s=14, c="#b0b0b0", label="trials")
        pf = sorted((t for t in complete if t.number in front_ids), key=lambda t: t.values[j])
        ax.plot([t.values[j] for t in pf], [t.values[0] for t in pf], "o-", c="#d62728", ms=5, label="Pareto front")
        for t in complete:
            if "baseline" in t.user_attrs:
                ax.scatter([t.values[j]], [t.values[0]], marker="s", s=40, c="#1f77b4", zorder=3)
                ax.annotate(t.user_attrs["baseline"], (t.values[j], t.values[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(names[j])
        ax.set_ylabel(names[0])
        if complete and min(t.values[0] for t in complete) > 0 and max(t.values[0] for t in complete) / min(t.values[0] for t in complete) > 20:
            ax.set_yscale("log")
        ax.set_title(f"{study.study_name}: {names[0]} vs {names[j]}")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        path = out / f"{names[0]}_vs_{names[j]}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(study: optuna.Study, out: Path, storage_url: str | None = None) -> dict[str, Any]:
    """Write the report files into ``out``; returns their paths and the front as text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.trials
    best = front(study) if any(t.state == TrialState.COMPLETE for t in trials) else []
    front_ids = {t.number for t in best}
    columns, rows = _rows(study, trials, front_ids)
    with open(out / "trials.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    names = study.metric_names or []
    front_rows = sorted((r for r in rows if r[3]), key=lambda r: r[5 + 1] if len(names) > 1 else r[5])
    with open(out / "pareto.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, *front_rows])
    plots = _plots(study, out, front_ids) if best else []

    short_cols = columns[: 5 + len(names)]
    front_table = _markdown_table(short_cols, [r[: len(short_cols)] for r in front_rows])
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    wins = beats_baselines(study) if best and len(names) > 1 else []
    directions = [d.name.lower() for d in study.directions]
    latency_sources = sorted({str(t.user_attrs.get("latency_source")) for t in trials if "latency_source" in t.user_attrs})
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"- model: `{study.user_attrs.get('model', '?')}`",
        "- objectives: " + ", ".join(f"{n} ({d})" for n, d in zip(names, directions)),
        "- trials: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()),
        f"- latency: {', '.join(latency_sources) if latency_sources else 'n/a'}"
        + (" (modelled, not measured)" if any(s.startswith("roofline") for s in latency_sources) else ""),
        "",
        f"## Pareto front ({len(best)} trials)",
        "",
        front_table,
        "",
        "## Against the uniform baselines",
        "",
    ]
    if wins:
        by_baseline: dict[str, list[int]] = {}
        for number, name in wins:
            by_baseline.setdefault(name, []).append(number)
        for name, numbers in by_baseline.items():
            lines.append(f"- `{name}`: beaten on {names[1]} at equal or better {names[0]} by trials {', '.join(map(str, numbers))}")
    else:
        lines.append("- no front point uses less memory than a baseline at equal or better accuracy")
    comparisons = []
    for feature, uses in FEATURES.items():
        result = feature_wins(study, uses) if best and len(names) > 1 else None
        if result is None:
            continue
        wins, n_with, n_without = result
        if wins:
            comparisons.append(f"- {feature}: for front trials {', '.join(map(str, wins))} no trial without it has both "
                               f"as little {names[1]} and as good {names[0]} ({n_with} trials with, {n_without} without)")
        else:
            comparisons.append(f"- {feature}: no trial using it beats the trials without it on {names[1]} at equal "
                               f"or better {names[0]} ({n_with} trials with, {n_without} without)")
    if comparisons:
        lines += ["", "## What the searched families bring", "", *comparisons]
    agreement = roofline_agreement(trials)
    if agreement:
        lines += ["", "## Roofline against measured latency", "",
                  f"- {agreement['trials']} trials measured; the roofline is off by a median of "
                  f"{100 * agreement['median_abs_error']:.1f}% (from {100 * agreement['min_error']:+.1f}% to "
                  f"{100 * agreement['max_error']:+.1f}%; + means the roofline is slower than measured)",
                  f"- rank agreement (Spearman) between roofline and measured latency: {agreement['spearman']:.2f}"]
        if "calibrated_slope" in agreement:
            lines.append(f"- calibrated on these trials, measured ~ {agreement['calibrated_offset_ms']:.4g} ms + "
                         f"{agreement['calibrated_slope']:.3g} x roofline: median error "
                         f"{100 * agreement['calibrated_median_abs_error']:.1f}%, R^2 {agreement['calibrated_r2']:.2f} "
                         "(R^2 near 0: the roofline does not explain the measured differences between trials)")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {t.number}: {t.user_attrs.get('fail_reason', 'no reason recorded')}" for t in failed]
    lines += ["", "## Files", ""] + [f"- ![{p.stem}]({p.name})" for p in plots]
    lines += ["- `pareto.csv` (front), `trials.csv` (all trials)"]
    if storage_url:
        lines += ["", f"Browse: `optuna-dashboard {storage_url}`"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    front_text = f"Pareto front of {study.study_name} ({len(best)} of {len(trials)} trials):\n" + front_table
    return {"report": out / "report.md", "pareto_csv": out / "pareto.csv", "trials_csv": out / "trials.csv",
            "plots": plots, "front_text": front_text, "beats_baselines": wins}


def log_pareto_run(study: optuna.Study, config: Any, directory: Path) -> str | None:
    """The W&B ``pareto`` run: a table of all trials with an ``is_pareto`` flag."""
    from omegaconf import OmegaConf

    from hpsearch.tracking import log_pareto

    logging_cfg = OmegaConf.to_container(config.get("logging") or {}, resolve=True) if config is not None else {}
    best = front(study) if any(t.state == TrialState.COMPLETE for t in study.trials) else []
    columns, rows = _rows(study, study.trials, {t.number for t in best})
    return log_pareto(logging_cfg=logging_cfg, directory=directory, study_name=study.study_name, columns=columns,
                      rows=rows, summary={"n_trials": len(study.trials), "n_pareto": len(best)})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpsearch.report", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="sqlite:///multirun/hpsearch.db", help="Optuna storage URL")
    parser.add_argument("--study", help="study name (default: the only study in the storage)")
    parser.add_argument("--out", help="output directory (default: next to the storage)")
    args = parser.parse_args(argv)
    from hpsearch.study import open_storage

    storage = open_storage(args.storage, heartbeat_interval=None)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if args.study is None:
        if len(names) != 1:
            parser.error(f"--study is needed; studies in {args.storage}: {', '.join(names) or 'none'}")
        args.study = names[0]
    if args.study not in names:
        parser.error(f"--study {args.study!r} not in {args.storage}; studies: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=args.study, storage=storage)
    out = Path(args.out) if args.out else report_directory(args.storage, args.study, Path("multirun"))
    paths = write_report(study, out, storage_url=args.storage)
    print(paths["front_text"])
    print(f"report: {paths['report']}")
    print(f"dashboard: optuna-dashboard {args.storage}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
