"""Which swept hyper-parameters matter: each one's importance for the sweep's metric.

From the finished jobs of a sweep dir (the rows of :func:`engine.sweep.collect`):

- an Optuna sweep: Optuna's own fANOVA evaluator on the study, rebuilt in memory from the trials'
  parameters and results with the distributions the sweeper drew them from (read from a job's
  ``.hydra/hydra.yaml``);
- any other sweep (a grid): the same kind of estimate with scikit-learn alone: a random forest
  fitted to the job table, and each parameter's main effect (the forest's prediction averaged
  over the jobs while the parameter is set to each of its values); its importance is its share
  of the summed main-effect variances.

Both importances sum to 1. Beside them: the Pearson correlation of the parameter with the metric,
on a log scale for log-spaced parameters (Optuna's ``tag(log, ...)``; otherwise positive numbers
spanning 10x or more, such as learning rates). ``seed`` is a replicate, not a parameter;
parameters with a single value in the finished jobs are left out. With fewer finished jobs than
``max(MIN_JOBS, JOBS_PER_PARAMETER * parameters)`` no estimate is made: the summary says so.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

MIN_JOBS = 6  # below this a forest (or fANOVA) fits noise
JOBS_PER_PARAMETER = 2
LOG_SPAN = 10.0  # positive values whose max / min reaches this are treated as log-spaced
SEED_KEY = "seed"
FOREST = "random forest main effects (scikit-learn)"
OPTUNA = "Optuna's fANOVA evaluator on the study rebuilt from the trials"
OPTUNA_MDI = "Optuna's mean-decrease-impurity evaluator on the study rebuilt from the trials"


@dataclass
class Importance:
    """The estimate (``rows``, most important first) or why there is none (``note``)."""

    metric: str
    method: str | None = None
    jobs: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parameters(jobs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each overridden key that takes more than one value, with its value (as text) in each job."""
    settings = [dict(o.lstrip("+~").partition("=")[::2] for o in job["overrides"]) for job in jobs]
    keys = sorted({key for s in settings for key in s} - {SEED_KEY})
    table = {key: [s.get(key, "(default)") for s in settings] for key in keys}
    return {key: values for key, values in table.items() if len(set(values)) > 1}


def _is_numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    if np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def sweeper_config(sweep_dir: Path, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """``hydra.sweeper`` and the task overrides as a job of this sweep recorded them (empty if none did)."""
    for job in jobs:
        path = Path(sweep_dir) / job["job"] / ".hydra" / "hydra.yaml"
        if path.is_file():
            hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
            return {"sweeper": hydra.get("sweeper") or {}, "task": (hydra.get("overrides") or {}).get("task") or []}
    return {}


def _optuna_distributions(sweeper: dict[str, Any]) -> dict[str, Any]:
    """The search space as the Optuna sweeper builds it: its ``params`` and the sweep overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna 2 imports a SQLAlchemy name that 2.0 deprecates
        from hydra_plugins.hydra_optuna_sweeper._impl import (
            create_optuna_distribution_from_config,
            create_optuna_distribution_from_override,
        )

    parser = OverridesParser.create()
    params = sweeper.get("sweeper", {}).get("params") or {}
    texts = [f"{key}={value}" for key, value in params.items() if not isinstance(value, dict)]
    distributions = {
        key: create_optuna_distribution_from_config(value) for key, value in params.items() if isinstance(value, dict)
    }
    for override in parser.parse_overrides([*texts, *sweeper.get("task", [])]):
        if override.is_sweep_override():
            distributions[override.get_key_element()] = create_optuna_distribution_from_override(override)
    return distributions


def _trial_value(raw: str, distribution: Any) -> Any:
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return next((c for c in choices if str(c) == raw), _value(raw))
    if type(distribution).__name__.startswith("Int"):
        return int(float(raw))
    return float(raw)


def _is_log(distribution: Any) -> bool:
    return bool(getattr(distribution, "log", False)) or "Log" in type(distribution).__name__


def _optuna_importances(
    parameters: dict[str, list[str]], values: np.ndarray, distributions: dict[str, Any]
) -> tuple[dict[str, float], str, str | None]:
    """Optuna's fANOVA evaluator on the study; its mean-decrease-impurity one where fANOVA fails
    (Optuna 2.10's, which hydra-optuna-sweeper pins, raises a ValueError in its tree statistics
    with the NumPy and scikit-learn this project installs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna 2's experimental and SQLAlchemy deprecation notes
        import optuna
        from optuna.importance import (
            FanovaImportanceEvaluator,
            MeanDecreaseImpurityImportanceEvaluator,
            get_param_importances,
        )

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize")
        space = {key: distributions[key] for key in parameters}
        for i, value in enumerate(values):
            params = {key: _trial_value(column[i], distributions[key]) for key, column in parameters.items()}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=float(value)))
        try:
            result, method, note = (
                get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)),
                OPTUNA,
                None,
            )
        except ValueError as error:
            evaluator = MeanDecreaseImpurityImportanceEvaluator(seed=0)
            result, method = get_param_importances(study, evaluator=evaluator), OPTUNA_MDI
            reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            note = f"Optuna's fANOVA evaluator failed here ({reason}); its mean-decrease-impurity one answered."
    return {key: float(result.get(key, 0.0)) for key in parameters}, method, note


def _forest_importances(columns: dict[str, np.ndarray], values: np.ndarray) -> dict[str, float]:
    from sklearn.ensemble import RandomForestRegressor

    keys = list(columns)
    features = np.column_stack([columns[key] for key in keys])
    forest = RandomForestRegressor(n_estimators=256, random_state=0).fit(features, values)
    variances = {}
    for j, key in enumerate(keys):
        settings, counts = np.unique(features[:, j], return_counts=True)
        effects = []
        for setting in settings:
            probe = features.copy()
            probe[:, j] = setting
            effects.append(forest.predict(probe).mean())
        effects = np.asarray(effects)
        weights = counts / counts.sum()
        variances[key] = float(np.sum(weights * (effects - np.sum(weights * effects)) ** 2))
    total = sum(variances.values())
    return {key: (v / total if total > 0 else 0.0) for key, v in variances.items()}


def estimate(jobs: list[dict[str, Any]], sweeper: dict[str, Any] | None = None) -> Importance:
    """The importance of each swept parameter over the finished jobs (rows of ``engine.sweep.collect``)."""
    finished = [j for j in jobs if j["status"] == "finished" and j["value"] is not None and math.isfinite(j["value"])]
    result = Importance(metric=next((j["metric"] for j in finished if j["metric"]), "metric"), jobs=len(finished))
    parameters = _parameters(finished)
    if not parameters:
        result.note = "no swept parameter takes more than one value in the finished jobs: nothing to rank."
        return result
    needed = max(MIN_JOBS, JOBS_PER_PARAMETER * len(parameters))
    if len(finished) < needed:
        result.note = (
            f"too few finished jobs for a sound estimate: {len(finished)} over {len(parameters)} swept "
            f"parameter(s); it needs at least {needed} ({JOBS_PER_PARAMETER} per parameter, {MIN_JOBS} at the least)."
        )
        return result
    values = np.array([j["value"] for j in finished], dtype=np.float64)
    if np.ptp(values) == 0:
        result.note = f"{result.metric} is the same in every finished job: no parameter changes it."
        return result

    # An Optuna sweep: the search space its sweeper drew from, for Optuna's evaluator and the log scales.
    space: dict[str, Any] | None = None
    if "optuna" in str((sweeper or {}).get("sweeper", {}).get("_target_", "")).lower():
        try:
            space = _optuna_distributions(sweeper or {})
            missing = sorted(set(parameters) - set(space))
            if missing:
                raise ValueError(f"no distribution for {missing} in hydra.sweeper.params")
        except Exception as error:  # the Optuna plugin absent, or a space it cannot rebuild
            result.note = f"Optuna's search space was not usable ({type(error).__name__}: {error})."
            space = None
    typed = {key: [_value(v) for v in column] for key, column in parameters.items()}
    numeric = {key for key, column in typed.items() if _is_numeric(column)}
    if space is not None:
        log_keys = {key for key in parameters if _is_log(space[key])}
    else:
        log_keys = {key for key in numeric if min(typed[key]) > 0 and max(typed[key]) / min(typed[key]) >= LOG_SPAN}
    columns: dict[str, np.ndarray] = {}
    for key, column in typed.items():
        if key in numeric:
            columns[key] = np.log10(column) if key in log_keys else np.asarray(column, dtype=np.float64)
        else:  # categories as ordinal codes: a forest splits them like any number
            order = {v: i for i, v in enumerate(sorted(set(map(str, column))))}
            columns[key] = np.array([order[str(v)] for v in column], dtype=np.float64)

    importances: dict[str, float] | None = None
    if space is not None:
        try:
            importances, result.method, result.note = _optuna_importances(parameters, values, space)
        except Exception as error:  # e.g. a trial value outside the distribution: the forest still answers
            result.note = f"Optuna's evaluator failed ({type(error).__name__}: {error})."
    if importances is None:
        importances, result.method = _forest_importances(columns, values), FOREST
        if result.note:
            result.note += f" Estimated with {FOREST} instead."
    for key in parameters:
        correlation = _correlation(columns[key], values) if key in numeric else None
        scale = ("log" if key in log_keys else "linear") if key in numeric else "categorical"
        row = {"parameter": key, "importance": importances[key], "correlation": correlation, "scale": scale}
        result.rows.append({**row, "values": len(set(parameters[key]))})
    result.rows.sort(key=lambda row: -row["importance"])
    return result


def markdown(result: Importance) -> list[str]:
    """The summary's section: the table, or why there is none."""
    lines = [f"## Which parameters matter (importance for best {result.metric})", ""]
    if not result.rows:
        return [*lines, f"No importance estimate: {result.note}", ""]
    lines += [
        f"Method: {result.method}, over {result.jobs} finished jobs. Importance: the parameter's share of the "
        f"variance its main effect explains (they sum to 1). Correlation: Pearson's r with {result.metric} "
        "(log scale where marked; + means a higher value goes with a higher metric).",
        "",
    ]
    if result.note:
        lines += [f"Note: {result.note}", ""]
    lines += ["| parameter | importance | correlation | scale | distinct values |", "|---|---|---|---|---|"]
    for row in result.rows:
        correlation = f"{row['correlation']:+.2f}" if row["correlation"] is not None else ""
        lines.append(
            f"| `{row['parameter']}` | {row['importance']:.3f} | {correlation} | {row['scale']} | {row['values']} |"
        )
    return [*lines, ""]


def csv_text(result: Importance) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["parameter", "importance", "correlation", "scale", "values", "method"])
    writer.writeheader()
    for row in result.rows:
        writer.writerow({**row, "method": result.method})
    return buffer.getvalue()


def plot(result: Importance, path: Path) -> Path | None:
    """A horizontal bar chart of the importances, most important on top; nothing without an estimate."""
    if not result.rows:
        return None
    from engine.plots import pyplot

    plt = pyplot()
    rows = result.rows[::-1]
    figure, axis = plt.subplots(figsize=(6.4, 1.2 + 0.45 * len(rows)), constrained_layout=True)
    bars = axis.barh([row["parameter"] for row in rows], [row["importance"] for row in rows], color="tab:blue")
    axis.bar_label(bars, labels=[f"{row['importance']:.2f}" for row in rows], padding=3)
    axis.set_xlim(0, 1.1)
    axis.set_xlabel(f"importance for best {result.metric}")
    axis.set_title(f"{result.method}, {result.jobs} jobs", fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
