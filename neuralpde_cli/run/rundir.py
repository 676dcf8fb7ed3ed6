"""The run directory: the stable interface between a run and everything after it.

Layout (documented in README): ``metrics.csv``, ``checkpoints/{last,best}.pt``, ``plots/``,
``solution.npz``, ``summary.json``, Hydra's ``.hydra/`` and the log.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from neuralpde_cli.errors import UserError
from neuralpde_cli.training.checkpoint import atomic_write, stale_temp_files


def check_writable(path: Path, what: str = "the run directory") -> None:
    """A UserError naming ``path`` unless a file can be written and synced there (or, when it does
    not exist yet, in the nearest folder above it): catches read-only, not-a-folder, full disks."""
    target = Path(path)
    probe_dir = target
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe_dir} is not a directory")
        with tempfile.TemporaryFile(dir=probe_dir) as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise UserError(f"cannot write to {what} {target}: {exc.strerror or exc}") from None


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            (self.path / "plots").mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write to the run directory {self.path}: {exc.strerror}") from None
        check_writable(self.path)
        for partial in stale_temp_files(self.path) + stale_temp_files(self.checkpoints):
            partial.unlink(missing_ok=True)  # left by a killed process; the real files are whole

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary_json(self) -> Path:
        return self.path / "summary.json"

    @property
    def solution_npz(self) -> Path:
        return self.path / "solution.npz"

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(jsonable(summary), indent=2, sort_keys=False)
        atomic_write(self.summary_json, lambda h: h.write(text.encode()))

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_json.read_text()) if self.summary_json.exists() else {}

    def write_solution(self, arrays: dict[str, np.ndarray]) -> None:
        def write(handle: Any) -> None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            handle.write(buf.getvalue())
        atomic_write(self.solution_npz, write)


class MetricsWriter:
    """Appends rows to metrics.csv, flushing each, with a header fixed at creation.

    On resume the rows past the checkpoint's step are dropped first, so the file reads as one
    uninterrupted run.
    """

    def __init__(self, path: Path, columns: list[str], resume_step: int | None = None) -> None:
        self.path = path
        self.columns = columns
        if resume_step is not None and path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if _step_of(r) <= resume_step]
            old_columns = path.read_text().splitlines()[0].split(",")
            self.columns = old_columns
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=old_columns)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write(path, lambda h: h.write(text.getvalue().encode()))
        else:
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerow(columns)
        self.handle = path.open("a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=self.columns, extrasaction="ignore")

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: _fmt(v) for k, v in row.items()})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv as columns of floats (blank → NaN; ``phase`` kept as strings)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "phase":
            out[key] = np.array(values)
        else:
            out[key] = np.array([float(v) if v not in ("", None) else math.nan for v in values])
    return out


def _step_of(row: dict[str, Any]) -> float:
    """A row's step; a row cut short by a killed process counts as past any checkpoint."""
    try:
        return int(row["step"]) if row.get("loss") not in ("", None) else math.inf
    except (TypeError, ValueError):
        return math.inf


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.8g}"
    return v


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN and ±Inf as null (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
