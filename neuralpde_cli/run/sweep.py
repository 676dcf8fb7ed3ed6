"""After a multirun: ``sweep_summary.csv`` (one row per job) and the error against each swept value."""

from __future__ import annotations

import csv
import json
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    swept = sorted({k for r in rows for k in r if k.startswith("override.")})
    metric = next((m for m in FIELDS if any(r.get(m) is not None for r in rows)), None)
    if not swept or metric is None:
        return
    fig, axes = plt.subplots(1, len(swept), figsize=(4.2 * len(swept), 3.6), squeeze=False)
    for ax, key in zip(axes[0], swept):
        points = [(r[key], r[metric]) for r in rows if r.get(metric) is not None and key in r]
        labels = sorted({p[0] for p in points}, key=_sort_key)
        for i, label in enumerate(labels):
            ys = [y for v, y in points if v == label]
            ax.plot([i] * len(ys), ys, "o", color="C0")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel(key.removeprefix("override."))
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
