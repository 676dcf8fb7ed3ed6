"""Calibration from Python: ``neuralpde_cli.calibrate(data, sde="cir")``.

A thin function over the same task code as ``neuralpde calibrate`` (the config composed by
Hydra from the same YAML files, the same checks, the same run directory); what it returns is
read back from that run directory, the API between a run and everything after it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np


@dataclass
class CalibrationResult:
    """A calibrate run as Python sees it: estimates and SEs by name, log L, AIC/BIC, the
    verdict in words, the baselines, and the run directory with every file and plot."""

    run_dir: Path
    sde: str
    estimates: dict[str, float]
    se: dict[str, float]
    loglik: float
    aic: float
    bic: float
    converged: bool
    n_transitions: int
    verdict: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    se_sandwich: dict[str, float] | None = None
    bias_corrected: dict[str, float] | None = None
    fit: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "CalibrationResult":
        """The result of a finished calibrate run directory (its fit.json and summary.json)."""
        from neuralpde_cli.errors import UserError

        run_dir = Path(run_dir)
        try:
            fit = json.loads((run_dir / "fit.json").read_text())
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{run_dir} holds no finished calibration ({exc})") from None
        def number(value: Any) -> float:  # JSON null: a NaN written by jsonable
            return float(value) if isinstance(value, (int, float)) else math.nan

        return cls(run_dir=run_dir, sde=str(summary.get("sde")),
                   estimates={k: number(v) for k, v in fit["estimates"].items()},
                   se={k: number(v) for k, v in fit["se"].items()}, loglik=number(fit["loglik"]),
                   aic=number(fit.get("aic")), bic=number(fit.get("bic")),
                   converged=bool(fit["converged"]),
                   n_transitions=int(fit["n_transitions"]), verdict=fit.get("verdict") or {},
                   baselines=fit.get("baselines") or {}, se_sandwich=fit.get("se_sandwich"),
                   bias_corrected=(fit.get("bias_correction") or {}).get("estimates"), fit=fit)

    @property
    def rejected(self) -> bool:
        """Whether a test of the PIT rejects the model at 1 %."""
        return bool(self.verdict.get("rejected_by"))

    def summary(self) -> str:
        """A statsmodels-like text summary: the fit, a table of estimates with SEs, z and 95 %
        intervals, the baselines' estimates, and the verdict in words."""
        from scipy.stats import norm

        width = 78
        data = self.fit.get("data") or {}
        lines = ["=" * width, f"{'neuralpde calibration: ' + self.sde:^{width}}", "=" * width]
        info = [("SDE", self.sde), ("log L", f"{self.loglik:.4f}"),
                ("data", str(data.get("path", ""))[-30:]), ("AIC", f"{self.aic:.3f}"),
                ("transitions", str(self.n_transitions)), ("BIC", f"{self.bic:.3f}"),
                ("converged", str(self.converged)),
                ("iterations", str(self.fit.get("iterations", "")))]
        for (k1, v1), (k2, v2) in zip(info[::2], info[1::2]):
            lines.append(f"{k1 + ':':<14}{v1:>24}   {k2 + ':':<14}{v2:>23}")
        if data.get("time"):
            lines.append(str(data["time"])[:width])
        lines.append("-" * width)
        lines.append(f"{'':<16}{'coef':>12}{'std err':>11}{'z':>9}{'[0.025':>14}{'0.975]':>14}")
        lines.append("-" * width)
        q = norm.ppf(0.975)
        for name, value in self.estimates.items():
            s = self.se.get(name, math.nan)
            z = value / s if s and math.isfinite(s) else math.nan
            lines.append(f"{name:<16}{value:>12.5g}{s:>11.3g}{z:>9.2f}{value - q * s:>14.5g}"
                         f"{value + q * s:>14.5g}")
        if self.baselines:
            lines += ["-" * width, "baselines (Euler and Kessler: quasi-likelihoods)"]
            for method, entry in self.baselines.items():
                values = "  ".join(f"{n} {entry['estimates'].get(n, math.nan):.5g}"
                                   for n in self.estimates)
                lines.append(f"  {method:<9}{values}  log L {entry.get('loglik', math.nan):.3f}")
        lines.append("=" * width)
        lines += list(self.verdict.get("lines") or [])
        lines.append(f"run directory: {self.run_dir}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def calibrate(data: Any, sde: str = "ou", *, dt: float | None = None,
              columns: Iterable[str] | None = None, params: Iterable[str] | None = None,
              overrides: Iterable[str] | Mapping[str, Any] = (), run_dir: str | Path | None = None,
              quiet: bool = False) -> CalibrationResult:
    """Fit ``sde`` to ``data`` by maximum likelihood, exactly as ``neuralpde calibrate`` does.

    data: a path to a CSV or .npz in the data schema; a pandas DataFrame (a date index or a
    'time'/'date' column, one column per state, or choose them with ``columns``); or an
    array (N,) or (N, d) of observations ``dt`` years apart.
    sde: ``equation.sde.kind`` (ou, cir, cev, gbm, double_well, heston, ...); the dimension
    follows the data. params: the parameters to fit (default all). overrides: any other
    config keys, as ``["fit.profile_points=0"]`` or ``{"fit.profile_points": 0}``.
    run_dir: where the run goes (default outputs/api/DATE/TIME-N). quiet: print nothing (the
    log still goes to the run directory's calibrate.log).
    """
    from hydra import compose, initialize_config_dir

    from neuralpde_cli.errors import UserError
    from neuralpde_cli.run.rundir import RunDir, RunLock
    from neuralpde_cli.tasks import calibrate as task
    from neuralpde_cli.tasks.common import check_config, config_dir

    out = Path(run_dir) if run_dir is not None else \
        Path("outputs") / "api" / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    columns = None if columns is None else [str(c) for c in columns]
    params = None if params is None else [str(p) for p in params]
    extra = [f"{k}={_hydra_value(v)}" for k, v in overrides.items()] \
        if isinstance(overrides, Mapping) else list(overrides)
    lock = RunLock.claim(out, unique=run_dir is None, what=f"run_dir={out}")
    try:
        folder = lock.folder
        path, dim = _data_file(data, folder, dt, columns)
        keys = [f"data.path={_quoted(path)}", f"equation.sde.kind={sde}"]
        if dim is not None and not any(k.startswith(("data.", "equation.dim")) for k in extra):
            keys.append(f"equation.dim={dim}")
        if columns is not None:
            keys.append(f"data.columns={_hydra_value(columns)}")
        if params is not None:
            keys.append(f"fit.params={_hydra_value(params)}")
        keys += extra
        task.register()
        try:
            with initialize_config_dir(version_base="1.3", config_dir=config_dir(),
                                       job_name="calibrate"):
                cfg = compose(config_name="calibrate", overrides=keys)
        except Exception as exc:  # noqa: BLE001 - Hydra's own words, one line
            raise UserError(f"calibrate({sde!r}): {str(exc).splitlines()[0]}") from None
        check_config(cfg)
        task.check(cfg)
        run = RunDir(folder)
        with _log_to(folder / "calibrate.log"), _threads(1), \
                contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            try:
                task.calibrate(cfg, run)
            except BaseException as exc:  # the run directory says so, as the CLI's does
                from neuralpde_cli.tasks.common import mark
                mark(run, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                raise
    finally:
        lock.release()
    return CalibrationResult.from_run(folder)


def _hydra_value(value: Any) -> str:
    """A Python value as a Hydra override's value: strings quoted (a path or a column name
    with spaces, commas, brackets or '=' stays one string, never a sweep)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (int, float)) else _quoted(str(value))


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _data_file(data: Any, folder: Path, dt: float | None, columns: Iterable[str] | None
               ) -> tuple[str, int | None]:
    """A path the reader takes, and the state dimension when it is known here."""
    from neuralpde_cli.data import Observations, write_observations
    from neuralpde_cli.errors import UserError

    if isinstance(data, (str, Path)):
        if dt is not None:
            raise UserError("calibrate(data=PATH, dt=…): the file's time column gives the steps; "
                            "dt is for arrays")
        return str(Path(data).expanduser().resolve()), _file_dim(Path(data), columns)
    if hasattr(data, "to_csv") and hasattr(data, "columns"):  # a pandas DataFrame
        from neuralpde_cli.data import TIME_NAMES
        frame = data
        dated = getattr(frame.index, "inferred_type", "") in ("datetime64", "date")
        timed = str(frame.index.name).lower() in TIME_NAMES  # set_index('time'): keep it
        if dated:
            frame = frame.copy()
            frame.index.name = "date"
        elif dt is not None and not timed:
            frame = frame.copy()
            frame.insert(0, "time", np.arange(len(frame)) * float(dt))
        path = folder / "data.csv"
        frame.to_csv(path, index=dated or timed)
        names = list(columns) if columns is not None else \
            [c for c in frame.columns if str(c).lower() not in (*TIME_NAMES, "path")]
        return str(path.resolve()), len(names)
    array = np.asarray(data, dtype=float)
    if array.ndim not in (1, 2) or array.shape[0] < 2:
        raise UserError(f"calibrate(data=array of shape {array.shape}): give observations "
                        "(N,) or (N, d), N ≥ 2, with dt=the years between them")
    if dt is None or not dt > 0:
        raise UserError(f"calibrate(data=array, dt={dt}): an array needs dt > 0, the time "
                        "between observations in years (1/252 for daily trading data)")
    state = array.reshape(array.shape[0], -1)
    write_observations(Observations(np.arange(state.shape[0]) * float(dt), state,
                                    np.zeros(state.shape[0])), folder / "data")
    return str((folder / "data.csv").resolve()), state.shape[1]


def _file_dim(path: Path, columns: Iterable[str] | None) -> int | None:
    if columns is not None:
        return len(list(columns))
    from neuralpde_cli.data import DataConfig, read_observations
    from neuralpde_cli.errors import UserError
    try:
        return read_observations(path, options=DataConfig()).dim
    except UserError:
        return None  # the task's own check says what is wrong, in its words


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op threads set for the fit and given back after (a library call must not
    change its caller's process for good)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _log_to(path: Path):
    """The task's log lines into the run directory's log file, as the CLI keeps them."""
    import logging

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("neuralpde_cli")
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
