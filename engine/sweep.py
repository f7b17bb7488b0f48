"""Sweeps: Hydra multirun jobs that survive failures and re-runs, and the sweep summary.

``python -m engine.sweep <sweep dir>`` writes the summary for any sweep directory;
the ``SweepSummary`` Hydra callback writes it when a multirun ends. Which parameters matter
(their importance for the metric) comes from ``engine.importance``.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from engine import importance
from engine.checkpoint import BEST_INFO, atomic_write, atomic_write_json, load_info

log = logging.getLogger("engine.sweep")

FAILED = "failed.json"
SUMMARY = "summary.json"
TABLE_MD, TABLE_CSV, GROUPS_CSV, PLOT = "sweep_summary.md", "sweep_summary.csv", "sweep_groups.csv", "sweep_summary.png"
IMPORTANCE_CSV, IMPORTANCE_PLOT = "sweep_importance.csv", "sweep_importance.png"
SEED_KEY = "seed"
JOB_FIELDS = ("status", "metric", "value", "epoch", "step", "wall_s", "error")  # with job and overrides


def _job_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def record_failure(job_dir: Path, error: BaseException | str, overrides: list[str] | None = None) -> None:
    if isinstance(error, str):
        text = error
    else:
        cause = error.__cause__ or error.__context__
        text = f"{type(error).__name__}: {error}" + (f" ({str(cause).splitlines()[0]})" if cause else "")
    detail = "" if isinstance(error, str) else "".join(traceback.format_exception(error))[-4000:]
    atomic_write_json(job_dir / FAILED, {"error": text, "traceback": detail, "overrides": overrides or []})


def hydra_job(train: Callable[[Any], float], cfg: Any) -> float:
    """What ``@hydra.main`` runs: one clear error for a single run; for a sweep job, skip it if it
    already finished in this sweep dir, and record a failure instead of stopping the sweep."""
    from engine.errors import user_errors

    if not _is_multirun():
        with user_errors():
            return train(cfg)
    job_dir = _job_dir()
    done = job_dir / SUMMARY
    if done.is_file() and (job_dir / BEST_INFO).is_file():
        value = float(load_info(job_dir / BEST_INFO)["metric_value"])
        log.info("%s already finished (best %.4f): skipped", job_dir, value)
        return value
    (job_dir / FAILED).unlink(missing_ok=True)
    try:
        return train(cfg)
    except Exception as error:  # one job's failure is the sweep's data, not its end
        log.error("job failed: %s: %s", type(error).__name__, error)
        record_failure(job_dir, error)
        return float("nan")


# --- The summary -------------------------------------------------------------


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]
    failed = job_dir / FAILED
    if failed.is_file():
        return list(json.loads(failed.read_text()).get("overrides", []))
    return []


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a sweep: its overrides, status, best metric, wall time."""
    rows = []
    for job_dir in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        overrides = [o for o in _overrides(job_dir) if not _split(o)[0].startswith("hydra.")]
        if not overrides and not (job_dir / ".hydra").is_dir() and not (job_dir / FAILED).is_file():
            continue
        row: dict[str, Any] = dict.fromkeys(JOB_FIELDS)
        row.update(job=job_dir.name, overrides=overrides, status="incomplete", greater_is_better=True)
        if (job_dir / FAILED).is_file():
            row.update(status="failed", error=json.loads((job_dir / FAILED).read_text())["error"])
        elif (job_dir / SUMMARY).is_file():
            summary = json.loads((job_dir / SUMMARY).read_text())
            info = load_info(job_dir / BEST_INFO)
            row.update(
                status="finished",
                metric=info["metric_name"],
                value=float(info["metric_value"]),
                epoch=info["epoch"],
                step=info["step"],
                wall_s=round(summary["wall_seconds"], 1),
                greater_is_better=bool(info["config"]["trainer"]["greater_is_better"]),
            )
        rows.append(row)
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs that differ only in ``seed`` as mean, std (n-1) and n; ranked best first."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] != "finished":
            continue
        key = tuple(sorted(o for o in row["overrides"] if _split(o)[0] != SEED_KEY))
        groups.setdefault(key, []).append(row)
    result = []
    for key, members in groups.items():
        values = np.array([m["value"] for m in members], dtype=np.float64)
        seeds = sorted(_split(o)[1] for m in members for o in m["overrides"] if _split(o)[0] == SEED_KEY)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        group = {"overrides": list(key), "metric": members[0]["metric"], "mean": float(values.mean()), "std": std}
        result.append({**group, "n": len(values), "seeds": seeds, "greater_is_better": members[0]["greater_is_better"]})
    better = result[0]["greater_is_better"] if result else True
    return sorted(result, key=lambda g: -g["mean"] if better else g["mean"])


def _markdown(rows: list[dict[str, Any]], groups: list[dict[str, Any]], ranked: importance.Importance) -> str:
    metric = next((r["metric"] for r in rows if r["metric"]), "metric")
    lines = [
        f"# Sweep summary ({len(rows)} jobs: "
        f"{sum(r['status'] == 'finished' for r in rows)} finished, "
        f"{sum(r['status'] == 'failed' for r in rows)} failed)",
        "",
        f"## By configuration, seeds aggregated (best {metric} per job; mean ± std over n)",
        "",
        f"| rank | overrides | {metric} mean ± std | n | seeds |",
        "|---|---|---|---|---|",
    ]
    for rank, group in enumerate(groups, start=1):
        lines.append(
            f"| {rank} | `{' '.join(group['overrides']) or '(defaults)'}` | "
            f"{group['mean']:.4f} ± {group['std']:.4f} | {group['n']} | {', '.join(group['seeds'])} |"
        )
    lines += ["", *importance.markdown(ranked)]
    lines += [
        "## Jobs",
        "",
        f"| job | overrides | status | best {metric} | epoch | step | wall s | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    finished = [r for r in rows if r["status"] == "finished"]
    better = finished[0]["greater_is_better"] if finished else True
    ordered = sorted(finished, key=lambda r: -r["value"] if better else r["value"]) + [
        r for r in rows if r["status"] != "finished"
    ]
    for row in ordered:
        value = f"{row['value']:.4f}" if row["value"] is not None else ""
        error = (row["error"] or "").replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(
            f"| {row['job']} | `{' '.join(row['overrides'])}` | {row['status']} | {value} | "
            f"{row['epoch'] if row['epoch'] is not None else ''} | "
            f"{row['step'] if row['step'] is not None else ''} | {row['wall_s'] or ''} | {error} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    finished = [r for r in rows if r["status"] == "finished"]
    swept = sorted({_split(o)[0] for r in finished for o in r["overrides"]} - {SEED_KEY})
    if not finished or not swept:
        return None
    from engine.plots import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(1, len(swept), figsize=(4.2 * len(swept), 3.6), squeeze=False, constrained_layout=True)
    metric = finished[0]["metric"]
    for axis, key in zip(axes[0], swept, strict=True):
        values: dict[str, list[float]] = {}
        for row in finished:
            setting = dict(_split(o) for o in row["overrides"]).get(key, "(default)")
            values.setdefault(setting, []).append(row["value"])
        try:
            order = sorted(values, key=float)
        except ValueError:
            order = sorted(values)
        for x, setting in enumerate(order):
            axis.scatter([x] * len(values[setting]), values[setting], color="tab:blue", alpha=0.6)
            mean, std = np.mean(values[setting]), np.std(values[setting])
            axis.errorbar([x], [mean], yerr=[std], fmt="_", color="tab:red", markersize=18, capsize=4)
        axis.set_xticks(range(len(order)), labels=order, rotation=30, ha="right")
        axis.set_xlabel(key)
        axis.set_ylabel(f"best dev {metric}")
        axis.grid(alpha=0.3)
    figure.suptitle("Sweep: each job (dots), mean ± std (red)", fontsize=11)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """Write the Markdown and CSV tables and the plot into ``sweep_dir``; return what they hold."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    groups = aggregate(rows)
    ranked = importance.estimate(rows, importance.sweeper_config(sweep_dir, rows))
    atomic_write(sweep_dir / TABLE_MD, lambda h: h.write(_markdown(rows, groups, ranked).encode()))

    def write_csv(path: Path, records: list[dict[str, Any]], fields: list[str]) -> None:
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow(
                {
                    **record,
                    "overrides": " ".join(record["overrides"]),
                    **({"seeds": " ".join(record["seeds"])} if "seeds" in record else {}),
                }
            )
        atomic_write(path, lambda h: h.write(buffer.getvalue().encode()))

    write_csv(sweep_dir / TABLE_CSV, rows, ["job", "overrides", *JOB_FIELDS])
    write_csv(sweep_dir / GROUPS_CSV, groups, ["overrides", "metric", "mean", "std", "n", "seeds"])
    _plot(rows, sweep_dir / PLOT)
    if ranked.rows:
        atomic_write(sweep_dir / IMPORTANCE_CSV, lambda h: h.write(importance.csv_text(ranked).encode()))
        importance.plot(ranked, sweep_dir / IMPORTANCE_PLOT)
    else:  # no estimate now: an earlier one would mislead
        (sweep_dir / IMPORTANCE_CSV).unlink(missing_ok=True)
        (sweep_dir / IMPORTANCE_PLOT).unlink(missing_ok=True)
    return {"jobs": rows, "groups": groups, "importance": ranked}


class SweepSummary:
    """Hydra callback (``hydra.callbacks.sweep_summary``): write the summary when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            result = summarize(sweep_dir)
            failed = sum(r["status"] == "failed" for r in result["jobs"])
            log.info("sweep summary: %s (%d jobs, %d failed)", sweep_dir / TABLE_MD, len(result["jobs"]), failed)
            print((sweep_dir / TABLE_MD).read_text())

    def __getattr__(self, name: str) -> Any:  # every other Callback hook: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m engine.sweep <sweep dir> [<sweep dir> ...]", file=sys.stderr)
        return 2
    for folder in argv:
        if not Path(folder).is_dir():
            print(f"error: {folder}: no such sweep directory", file=sys.stderr)
            return 2
        summarize(folder)
        print((Path(folder) / TABLE_MD).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
