"""After a multirun: ``sweep_summary.csv`` (one row per job) and the error against each swept value."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

FIELDS = ("rel_l2_error", "rel_l2_log_error", "cov_rel_error", "l1_error", "rel_residual")


def summarize_sweep(sweep_dir: Path) -> tuple[Path, int, int]:
    """Write the sweep table from each job's summary.json; returns (path, jobs, failures)."""
    rows: list[dict[str, Any]] = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        summary_file = job / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        row: dict[str, Any] = {"job": int(job.name), "status": summary.get("status", "missing"),
                               "overrides": " ".join(overrides)}
        for item in overrides:
            key, _, value = str(item).partition("=")
            row[f"override.{key}"] = value
        metrics = summary.get("metrics", {})
        row.update({k: metrics.get(k) for k in FIELDS if k in metrics})
        row["loss"] = summary.get("final_loss")
        row["wall_time_s"] = summary.get("wall_time_s")
        row["error"] = summary.get("error", "")
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = sweep_dir / "sweep_summary.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    _plot_sweep(rows, sweep_dir / "sweep_error.png")
    failures = sum(r["status"] != "completed" for r in rows)
    return path, len(rows), failures


def _plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """The final error against each override that varies across the jobs (constant ones say
    nothing), one panel per key, three to a row; a second varying key draws one line per value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = next((m for m in FIELDS if any(r.get(m) is not None for r in rows)), None)
    done = [r for r in rows if metric is not None and _positive(r.get(metric))]
    keys = sorted({k for r in rows for k in r if k.startswith("override.")})
    swept = [k for k in keys if len({str(r.get(k)) for r in done}) > 1]
    if not swept:
        return
    cols = min(3, len(swept))
    rows_n = -(-len(swept) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.8 * rows_n), squeeze=False)
    values = [float(r[metric]) for r in done]
    for ax, key in zip(axes.flat, swept):
        labels = sorted({str(r.get(key)) for r in done}, key=_sort_key)
        others = [k for k in swept if k != key]
        group_key = others[0] if len(others) == 1 else None
        groups = sorted({str(r.get(group_key)) for r in done}, key=_sort_key) if group_key else [None]
        for g, group in enumerate(groups):
            pts = [(labels.index(str(r.get(key))), float(r[metric])) for r in done
                   if group_key is None or str(r.get(group_key)) == group]
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            name = f"{_short(group_key)}={group}" if group_key else None
            ax.plot(xs, ys, "o-" if group_key else "o", color=f"C{g % 10}", ms=5, lw=1.2,
                    label=name)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        _log_axis(ax, values)
        ax.set_xlabel(_short(key))
        ax.set_ylabel(f"final {metric} (log scale)")
        ax.grid(alpha=0.3, which="both")
        if group_key:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(swept):]:
        ax.set_visible(False)
    failed = len(rows) - len(done)
    fig.suptitle(f"{len(done)} of {len(rows)} jobs" + (f" ({failed} without an error value: "
                 "failed or not finite)" if failed else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def _short(key: str) -> str:
    return key.removeprefix("override.")


def _log_axis(ax: Any, values: list[float]) -> None:
    """A log y axis whose limits are whole decades around the values, so at least two
    labelled ticks bracket them (inside one decade a log axis would show no label at all)."""
    from matplotlib.ticker import LogLocator, LogFormatterSciNotation
    ax.set_yscale("log")
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    if high == low:
        high += 1
    ax.set_ylim(10.0 ** low, 10.0 ** high)
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    if high - low <= 2:  # few decades: label 2× and 5× as well
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=12))
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False,
                                                                    minor_thresholds=(3, 3)))
        ax.tick_params(axis="y", which="minor", labelsize=7)


def _sort_key(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


class SweepSummaryCallback(Callback):
    """Hydra callback: summarize when a multirun ends; exit non-zero if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        path, jobs, failures = summarize_sweep(sweep_dir)
        print(f"sweep: {jobs} jobs, {failures} failed; table: {path}")
        if failures:
            sys.exit(1)
