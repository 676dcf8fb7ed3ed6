"""A report over run directories: one table of runs, their loss curves, their errors.

Reads only what run directories hold (summary.json, .hydra/overrides.yaml, metrics.csv), so
it works on a single run, a sweep (``-m``), a multigrid chain (``level_<k>/``), a study
(``trials/<n>/``) or any folder holding such, written by any launcher.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuralpde_cli.errors import UserError
from neuralpde_cli.run.rundir import RunLock, read_metrics

#: the final errors a table shows, in this order, when some run has them
ERRORS = ("rel_l2_error", "rel_l2_log_error", "cov_rel_error", "l1_error", "rel_residual")
#: a calibrate run's figures, in runs.csv beside the errors when some run has them
FIT_METRICS = ("loglik", "aic", "bic")
#: runs drawn on one loss plot at most (the best by the first error)
MAX_CURVES = 12


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    name: str
    summary: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """summary.json's status; "running" whose writer is gone (no process holds the run's
        lock, nor its sweep's) is "interrupted": killed without a chance to say so."""
        status = str(self.summary.get("status", "missing"))
        if status == "running" and RunLock.holder(self.path) is None \
                and RunLock.holder(self.path.parent) is None:
            return "interrupted"
        return status

    @property
    def command(self) -> str:
        """The subcommand that wrote the run (solve when summary.json does not say)."""
        return str(self.summary.get("command") or "solve")

    def error(self, metric: str) -> float | None:
        value = self.summary.get("metrics", {}).get(metric)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory at or below ``paths`` (a folder with summary.json; a study's own
    summary is not a run), named relative to the path it was found under."""
    runs: list[Run] = []
    for root in paths:
        if not root.exists():
            raise UserError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise UserError(f"{root}: not a directory; report takes run directories, sweeps, "
                            "multigrid chains or studies")
        found = sorted({p.parent for p in root.rglob("summary.json")}, key=_natural)
        here = []
        for folder in found:
            if "report" in folder.relative_to(root).parts:
                continue
            summary = _read_json(folder / "summary.json")
            if "study" in summary:
                continue
            name = str(folder.relative_to(root)) if folder != root else root.name
            if len(paths) > 1 and folder != root:
                name = f"{root.name}/{name}"
            overrides = _overrides(folder)
            level = re.fullmatch(r"level_(\d+)", folder.name)
            if level and (folder.parent / "summary.json").is_file():  # a chain's level
                overrides = {**_overrides(folder.parent), "level": level.group(1)}
            here.append(Run(folder, name, summary, overrides))
        if not here:
            raise UserError(f"{root}: no runs in it (no summary.json at or below it); report "
                            "takes a run directory, a sweep, a multigrid chain or a study")
        runs += here
    return runs


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "unreadable summary.json"}


def _overrides(folder: Path) -> dict[str, str]:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return {}
    pairs = (str(item).partition("=") for item in items)
    return {k.lstrip("+~"): v for k, _, v in pairs
            if not k.startswith("hydra.") and k not in ("trainer.progress",)}


def swept_keys(runs: list[Run]) -> list[str]:
    """Overrides whose value differs between runs (constant ones say nothing)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def error_metric(runs: list[Run], wanted: str | None) -> str | None:
    if wanted is not None:
        if not any(r.error(wanted) is not None for r in runs):
            have = sorted({k for r in runs for k in r.summary.get("metrics", {})})
            raise UserError(f"--metric {wanted}: no run has it; they have {have}")
        return wanted
    return next((m for m in ERRORS if any(r.error(m) is not None for r in runs)), None)


def rows(runs: list[Run], metric: str | None) -> tuple[list[str], list[dict[str, Any]]]:
    """The table: run, status, each swept override, the errors, wall time, steps, ranks, error."""
    keys = swept_keys(runs)
    errors = [m for m in ERRORS + FIT_METRICS if any(r.error(m) is not None for r in runs)]
    if metric is not None and metric not in errors:
        errors.insert(0, metric)
    table = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "status": r.status}
        row.update({k: r.overrides.get(k, "") for k in keys})
        row.update({m: r.error(m) for m in errors})
        row["wall_time_s"] = r.summary.get("wall_time_s")
        row["steps"] = r.summary.get("steps")
        row["world_size"] = r.summary.get("world_size", 1)
        row["error"] = r.summary.get("error", "")
        table.append(row)
    return ["run", "status", *keys, *errors, "wall_time_s", "steps", "world_size", "error"], table


def brief_columns(columns: list[str], table: list[dict[str, Any]], metric: str | None
                  ) -> list[str]:
    """The columns a terminal has room for: the swept keys, the chosen error, time, steps;
    ranks and errors only where some run has them."""
    def used(c: str) -> bool:
        return any(row[c] not in (None, "", 1) for row in table)
    keep = {"run", "status", "wall_time_s", "steps", *(c for c in columns if "." in c or c in
                                                        ("ansatz", "optimizer", "equation",
                                                         "level", "experiment"))}
    if metric is not None:
        keep.add(metric)
    return [c for c in columns if c in keep and (c in ("run", "status") or used(c))
            or c in ("world_size", "error") and used(c)]


def table_console(width: int) -> Any:
    """rich's console for a table on stdout: the terminal's own; piped or into a file, one at
    least ``width`` wide, so that no cell is cut to "…" or left blank."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, width))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3e}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def write_report(runs: list[Run], out: Path, metric: str | None) -> list[Path]:
    """runs.csv, report.md, losses.png and the error plots (against each swept key; a heatmap
    for two) under ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    metric = error_metric(runs, metric)
    columns, table = rows(runs, metric)
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    written = [out / "runs.csv"]
    pictures = plot_losses(runs, metric, out / "losses.png")
    pictures += plot_errors(runs, metric, out)
    written += pictures
    lines = [f"# Report: {len(runs)} runs", ""]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines += [", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ""]
    if metric is not None:
        done = [r for r in runs if r.error(metric) is not None]
        if done:
            best = min(done, key=lambda r: r.error(metric))  # type: ignore[arg-type,return-value]
            lines += [f"Best {metric}: {best.error(metric):.3e} ({best.name})", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_text(row[c]).replace("|", "/") for c in columns) + " |"
              for row in table]
    unfinished = [r for r in runs if r.status in ("interrupted", "running")
                  and (r.path / "checkpoints" / "last.pt").is_file()]
    if unfinished:
        lines += ["", "Unfinished runs (continue each with its command's `resume=DIR`):", ""]
        lines += [f"    neuralpde {r.command} resume={r.path}" for r in unfinished]
    fits = calibrations(runs)
    if fits:
        lines += ["", *comparison_markdown(fits)]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pictures]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return [out / "report.md", *written]


def _loss_curve(run: Run) -> tuple[Any, Any] | None:
    path = run.path / "metrics.csv"
    if not path.is_file():
        return None
    try:
        columns = read_metrics(path)
    except (OSError, ValueError, csv.Error):
        return None
    if "loss" not in columns or "step" not in columns:
        return None
    steps, loss = columns["step"], columns["loss"]
    keep = [i for i in range(len(loss)) if math.isfinite(loss[i]) and loss[i] > 0]
    return (steps[keep], loss[keep]) if keep else None


def plot_losses(runs: list[Run], metric: str | None, path: Path) -> list[Path]:
    """The training loss of each run against its step, on one log plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r, c) for r in runs if (c := _loss_curve(r)) is not None]
    if not curves:
        return []
    if len(curves) > MAX_CURVES and metric is not None:
        curves.sort(key=lambda rc: rc[0].error(metric) if rc[0].error(metric) is not None
                    else math.inf)
    shown = curves[:MAX_CURVES]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (run, (steps, loss)) in enumerate(shown):
        label = run.name if metric is None or run.error(metric) is None else \
            f"{run.name}  ({metric} {run.error(metric):.2e})"
        ax.plot(steps, loss, lw=1.2, color=f"C{i % 10}", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)")
    title = f"loss of {len(shown)} runs" + (f" (the {MAX_CURVES} best by {metric} of "
                                            f"{len(curves)})" if len(curves) > len(shown) else "")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _order(values: set[str]) -> list[str]:
    def key(v: str) -> tuple[int, Any]:
        try:
            return (0, float(v))
        except ValueError:
            return (1, v)
    return sorted(values, key=key)


def _label(run: Run, key: str) -> str:
    """A run's value of a swept key on an axis ("—": the run does not set it)."""
    return str(run.overrides.get(key, "")) or "—"


def plot_errors(runs: list[Run], metric: str | None, out: Path) -> list[Path]:
    """The final error against each swept key (one panel each); with exactly two swept keys,
    also a heatmap of the error over their grid (a blank cell: no finished run there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if metric is None:
        return []
    done = [r for r in runs if r.error(metric) is not None and r.error(metric) > 0]
    keys = [k for k in swept_keys(runs) if len({r.overrides.get(k) for r in done}) > 1]
    if not done or not keys:
        return []
    written = []
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        labels = _order({_label(r, key) for r in done})
        xs = [labels.index(_label(r, key)) for r in done]
        ax.plot(xs, [r.error(metric) for r in done], "o", ms=5)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {metric} (log scale)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{len(done)} of {len(runs)} runs with a {metric}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "error_vs_keys.png", dpi=110)
    plt.close(fig)
    written.append(out / "error_vs_keys.png")
    if len(keys) == 2:
        rows_k, cols_k = keys
        row_labels = _order({_label(r, rows_k) for r in done})
        col_labels = _order({_label(r, cols_k) for r in done})
        grid = np.full((len(row_labels), len(col_labels)), np.nan)
        for r in done:
            i = row_labels.index(_label(r, rows_k))
            j = col_labels.index(_label(r, cols_k))
            value = np.log10(r.error(metric))  # type: ignore[arg-type]
            grid[i, j] = value if np.isnan(grid[i, j]) else min(grid[i, j], value)
        fig, ax = plt.subplots(figsize=(1.2 * len(col_labels) + 3.5, 0.8 * len(row_labels) + 2.2))
        image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        for i in range(len(row_labels)):
            for j in range(len(col_labels)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{10 ** grid[i, j]:.1e}", ha="center", va="center",
                            fontsize=8, color="white" if grid[i, j] > np.nanmean(grid) else "black")
        ax.set_xticks(range(len(col_labels)), col_labels)
        ax.set_yticks(range(len(row_labels)), row_labels)
        ax.set_xlabel(cols_k)
        ax.set_ylabel(rows_k)
        fig.colorbar(image, ax=ax, label=f"log10 final {metric}")
        ax.set_title(f"final {metric} (best of the runs in a cell)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "error_heatmap.png", dpi=110)
        plt.close(fig)
        written.append(out / "error_heatmap.png")
    return written


def export_tensorboard(runs: list[Run], out: Path, metric: str | None) -> Path:
    """One TensorBoard run per run directory: metrics.csv as scalars by step, the swept
    overrides and final errors as hparams (``tensorboard --logdir OUT``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install '
                        '"neuralpde[tensorboard]"') from None
    keys = swept_keys(runs)
    for run in runs:
        folder = out / re.sub(r"[^A-Za-z0-9_.-]+", "_", run.name)
        with SummaryWriter(log_dir=str(folder)) as writer:
            path = run.path / "metrics.csv"
            columns = read_metrics(path) if path.is_file() else {}
            steps = columns.get("step")
            for name, values in columns.items():
                if name in ("step", "phase") or steps is None:
                    continue
                for step, value in zip(steps, values):
                    if math.isfinite(value) and math.isfinite(step):
                        writer.add_scalar(name, float(value), int(step))
            finals = {f"final/{m}": v for m in ERRORS if (v := run.error(m)) is not None}
            if run.summary.get("wall_time_s") is not None:
                finals["final/wall_time_s"] = float(run.summary["wall_time_s"])
            hparams = {k: run.overrides.get(k, "") for k in keys} or {"run": run.name}
            writer.add_hparams(hparams, finals, run_name=".")
    return out


# --- calibrate runs: a model comparison -------------------------------------------------------
#: (smaller kind, larger kind, the larger kind's restriction that gives the smaller, df,
#: whether the restriction sits on the boundary of the larger kind's parameter space)
NESTED = (("cir", "cev", "gamma = 1/2", 1, False), ("ou", "cev", "gamma = 0", 1, True))


@dataclass
class Calibration:
    """One completed calibrate run as a comparison sees it (from its fit.json)."""

    run: Run
    sde: str
    data: str
    n: int
    k: int
    loglik: float
    aic: float
    bic: float
    converged: bool
    verdict: dict[str, Any]
    estimates: dict[str, float]
    se: dict[str, float]

    @property
    def rejected(self) -> bool:
        return bool(self.verdict.get("rejected_by"))

    def verdict_words(self) -> str:
        if not self.converged:
            return "not converged"
        short = {"pit_uniform_ks_p": "KS", "pit_independent_ljung_box_p": "Ljung–Box",
                 "pit_squares_independent_ljung_box_p": "on squares"}
        ps = "; ".join(f"{word} p={self.verdict[k]:.2g}" for k, word in short.items()
                       if isinstance(self.verdict.get(k), (int, float)))
        return f"{'rejected at 1%' if self.rejected else 'not rejected at 1%'} ({ps})"


def calibrations(runs: list[Run]) -> list[Calibration]:
    """The completed calibrate runs with a readable fit.json."""
    out = []
    for r in runs:
        if r.command != "calibrate" or r.status != "completed":
            continue
        fit = _read_json(r.path / "fit.json")
        if "loglik" not in fit or "estimates" not in fit:
            continue
        names = list(fit.get("names") or fit["estimates"])
        read = fit.get("data") or {}
        data = str(read.get("path") or r.summary.get("data") or "")
        columns = read.get("columns")
        if columns:
            data += f" [{', '.join(map(str, columns))}]"
        estimates = fit["estimates"] if isinstance(fit["estimates"], dict) \
            else dict(zip(names, fit["estimates"]))
        se = fit.get("se") if isinstance(fit.get("se"), dict) \
            else dict(zip(names, fit.get("se") or []))
        out.append(Calibration(  # JSON null (a NaN written by jsonable) reads as NaN
            run=r, sde=str(r.summary.get("sde", "?")), data=data,
            n=int(fit.get("n_transitions", 0)), k=len(names), loglik=_number(fit["loglik"]),
            aic=_number(fit.get("aic")), bic=_number(fit.get("bic")),
            converged=bool(fit.get("converged")), verdict=fit.get("verdict") or {},
            estimates={n: _number(v) for n, v in estimates.items()},
            se={n: _number(v) for n, v in se.items()}))
    return out


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def ranked(fits: list[Calibration]) -> list[list[Calibration]]:
    """Fits grouped by data set (file and transition count: only those are comparable), each
    group ordered by AIC, best first."""
    groups: dict[tuple[str, int], list[Calibration]] = {}
    for f in fits:
        groups.setdefault((f.data, f.n), []).append(f)
    return [sorted(g, key=lambda f: (math.isnan(f.aic), f.aic)) for g in groups.values()]


def lr_tests(group: list[Calibration]) -> list[dict[str, Any]]:
    """Likelihood-ratio tests between nested kinds fitted to the same data: 2Δlog L against
    χ² with df degrees of freedom (on a boundary, the ½χ²₀ + ½χ²_df mixture, which halves p)."""
    from scipy.stats import chi2

    out = []
    by_kind: dict[str, Calibration] = {}  # the best converged fit of each kind
    for f in group:
        if f.converged and math.isfinite(f.loglik) and (
                f.sde not in by_kind or f.loglik > by_kind[f.sde].loglik):
            by_kind[f.sde] = f
    for small, big, restriction, df, boundary in NESTED:
        if small in by_kind and big in by_kind and by_kind[big].k - by_kind[small].k == df:
            s, b = by_kind[small], by_kind[big]
            stat = max(0.0, 2.0 * (b.loglik - s.loglik))
            p = float(chi2.sf(stat, df)) * (0.5 if boundary else 1.0)
            out.append({"null": small, "alternative": big, "restriction": restriction,
                        "statistic": stat, "df": df, "p": p, "boundary": boundary,
                        "words": f"{small} against {big} ({restriction}): LR = {stat:.2f}, "
                                 f"p = {p:.2g}{' (boundary: ½χ²₀ + ½χ²₁)' if boundary else ''}"
                                 f" — {small} is {'rejected' if p < 0.01 else 'not rejected'} "
                                 "at 1%"})
    return out


def _estimates_text(f: Calibration) -> str:
    return ", ".join(f"{n} {v:.4g} ({f.se.get(n, math.nan):.2g})" for n, v in f.estimates.items())


def comparison_markdown(fits: list[Calibration]) -> list[str]:
    """report.md's model comparison: per data set, the fits by AIC with log L, BIC, the
    verdict and the estimates (SE), then the likelihood-ratio tests of nested kinds."""
    lines = ["## Calibrations, ranked by AIC (per data set)", ""]
    for group in ranked(fits):
        best = group[0]
        lines += [f"Data {best.data} ({best.n} transitions): best by AIC is **{best.sde}** "
                  f"({best.run.name}).", "",
                  "| rank | run | sde | k | log L | AIC | ΔAIC | BIC | verdict | estimates (SE) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for i, f in enumerate(group, 1):
            lines.append(f"| {i} | {f.run.name} | {f.sde} | {f.k} | {f.loglik:.3f} | {f.aic:.2f} | "
                         f"{f.aic - best.aic:.2f} | {f.bic:.2f} | {f.verdict_words()} | "
                         f"{_estimates_text(f)} |")
        tests = lr_tests(group)
        if tests:
            lines += ["", "Likelihood-ratio tests of nested kinds:", ""]
            lines += [f"- {t['words']}" for t in tests]
        lines.append("")
    return lines
