"""``neuralpde report PATH...``: one table over runs, sweeps, chains and studies.

Not a Hydra task: it takes folders, not a config, and writes no run directory of its own —
``report/`` under the (first) path: report.md, runs.csv, losses.png, error_vs_keys.png and,
for a two-key sweep, error_heatmap.png; ``--tensorboard`` adds event files there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuralpde_cli.errors import UserError
from neuralpde_cli.run import report


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``neuralpde: error:`` line like every other command's."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"report: {message} (neuralpde report --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="neuralpde report", description=__doc__.split("\n\n")[0],
                epilog="e.g. neuralpde report outputs/multirun/2026-11-25/10-00-00 "
                       "--metric rel_l2_error --tensorboard")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="run directories, sweeps, chains or studies (several: compared)")
    p.add_argument("--metric", default=None,
                   help="the final error to rank, plot and map (default: the first of "
                        f"{', '.join(report.ERRORS)} the runs have)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write (default: PATH/report, the first PATH's)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files under OUT/tensorboard")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    runs = report.find_runs(args.paths)
    out = args.out if args.out is not None else args.paths[0] / "report"
    try:
        written = report.write_report(runs, out, args.metric)
        if args.tensorboard:
            written.append(report.export_tensorboard(runs, out / "tensorboard", args.metric))
    except OSError as exc:
        raise UserError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    show(runs, args.metric)
    print(f"report: {len(runs)} runs; " + ", ".join(str(p) for p in written))


def show(runs: list[report.Run], metric: str | None) -> None:
    """The table on the terminal (rich)."""
    from rich.table import Table

    metric = report.error_metric(runs, metric)
    columns, rows = report.rows(runs, metric)
    columns = report.brief_columns(columns, rows, metric)
    table = Table(title=f"{len(runs)} runs", title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if c not in ("run", "status", "error") else "left",
                         overflow="fold", max_width=60 if c == "error" else None)
    style = {"completed": "green", "failed": "red", "diverged": "red", "interrupted": "yellow"}
    for row in rows:
        table.add_row(*(report._text(row[c]) for c in columns),
                      style=style.get(str(row["status"]), None))
    console = report.table_console(18 * len(columns))
    console.print(table)
    for r in runs:
        if r.status in ("interrupted", "running") and (r.path / "checkpoints" / "last.pt").is_file():
            console.print(f"{r.status}: {r.name}; continue it with neuralpde {r.command} "
                          f"resume={r.path}", soft_wrap=True)
    for group in report.ranked(report.calibrations(runs)):
        fits = Table(title=f"calibrations of {group[0].data} ({group[0].n} transitions), "
                           "best AIC first", title_justify="left")
        for c in ("run", "sde", "k", "log L", "AIC", "ΔAIC", "BIC", "verdict", "estimates (SE)"):
            fits.add_column(c, justify="left" if c in ("run", "sde", "verdict", "estimates (SE)")
                            else "right", overflow="fold")
        for f in group:
            fits.add_row(f.run.name, f.sde, str(f.k), f"{f.loglik:.3f}", f"{f.aic:.2f}",
                         f"{f.aic - group[0].aic:.2f}", f"{f.bic:.2f}", f.verdict_words(),
                         report._estimates_text(f),
                         style="red" if f.rejected or not f.converged else None)
        console = report.table_console(160)
        console.print(fits)
        for t in report.lr_tests(group):
            console.print(t["words"], soft_wrap=True)
