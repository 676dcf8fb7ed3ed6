r"""Case: calibration on the series users bring, with the defaults (issue 24).

Every fit is ``neuralpde calibrate data=FILE equation.sde.kind=KIND`` in a fresh process and
nothing else: no K, grid or start is set by hand, so a row measures what a user gets.

* **Real positive series** that statsmodels ships (quarterly: the US 3-month T-bill rate
  1959–2009 in percent, the Danish bond and deposit rates 1974–1987 and the German rate
  1972–1998 as decimals). CIR against the exact non-central χ² MLE on the same data: each
  parameter's distance in the exact SEs, log L's error per 1,000 transitions at the PDE's own
  estimate (the density's error, not the optimizer's), and that error in bands of |z| (the
  move's normal score under the exact law), so a wrong far tail cannot hide in an average.
  CEV beside, with the likelihood-ratio test of γ = ½ against the nested CIR fit.
* **The VIX and the S&P 500** that arch ships (daily closes 2014–2018, the February 2018 spike
  included): CIR on the VIX, weekly and daily, against the exact MLE as above; Heston on log
  S&P 500 with its variance observed as (VIX/100)², weekly and daily, with the verdict.
* **Simulated, at the sizes the issue names**: 1-D OU 5,000 × Δt 0.5, 2-D OU 3,000 × Δt 0.25
  (exact transitions; the nine starting values given, as 2-D needs today), CIR 7,900 daily (a
  VIX-like level, to show the cost flat in n).

The time column is the whole command's wall time (baselines, fit, SEs, profiles, plots),
the median of the tier's repeats. Run it alone with
``python -m benchmarks.run --cases calibrate_real [--quick]``.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import (Column, Row, Spec, Unavailable, attempt, exact_cir_path, row,
                               run_neuralpde, tier)

SETTINGS = {
    "full": dict(repeats=3, timeout_s=1800, simulated=True, series=4, equity=True),
    "quick": dict(repeats=1, timeout_s=900, simulated=False, series=4, equity=False),
    "smoke": dict(repeats=1, timeout_s=600, simulated=False, series=1, equity=False),
}
#: targets of issue 24: distance from the exact MLE (SE), |log L error| per 1,000 transitions,
#: whole command seconds for a series of this length
MAX_SE, MAX_LOGLIK_PER_1000, MAX_SERIES_S = 0.1, 0.1, 30.0
SPEC = Spec(
    "calibrate_real",
    "Calibration with the defaults on real series (CIR against the exact MLE; CEV with the "
    "likelihood-ratio test of γ = ½) and on simulated data at the issue's sizes",
    (Column("estimates", "estimates", "text"), Column("distance", "distance (exact SE)", "text"),
     Column("density", "log L error /1,000, by |z|", "text"), Column("time_s", "time"),
     Column("target", "target", "text")),
    ratio_key="time_s", plot="settings", plot_key="time_s",
)


def _real_series() -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """name → (time in years, level, what it is), from the data sets statsmodels ships."""
    try:
        import statsmodels.api as sm
    except ImportError as exc:  # the bench extra installs it
        raise Unavailable(f"statsmodels is not installed ({exc}); make bench installs it") from None
    macro = sm.datasets.macrodata.load_pandas().data
    danish = sm.datasets.danish_data.load_pandas().data
    german = sm.datasets.interest_inflation.load_pandas().data
    quarters = lambda n, first: first + np.arange(n) / 4.0  # noqa: E731
    return {
        "US 3-month T-bill (percent, quarterly 1959–2009)":
            (np.asarray(macro.year + (macro.quarter - 1) / 4.0), np.asarray(macro.tbilrate), "tbill"),
        "Danish bond rate IBO (quarterly 1974–1987)":
            (quarters(len(danish), 1974.0), np.asarray(danish.ibo), "ibo"),
        "Danish deposit rate IDE (quarterly 1974–1987)":
            (quarters(len(danish), 1974.0), np.asarray(danish.ide), "ide"),
        "German interest rate R (quarterly 1972–1998)":
            (np.asarray(german.year + (german.quarter - 1) / 4.0), np.asarray(german.R), "german"),
    }


def _equity_series() -> dict[str, Any]:
    """The VIX (daily closes 2014–2018, arch's ``vix``) and the S&P 500 (arch's ``sp500``):
    VIX daily and on Fridays for CIR; log S&P 500 with V = (VIX/100)² for Heston with its
    variance observed. Times in years: 252 trading days, 52 weeks."""
    try:
        from arch.data import sp500, vix
    except ImportError as exc:
        raise Unavailable(f"arch is not installed ({exc}); make bench installs it") from None
    import pandas as pd
    level = vix.load()["vix"].dropna()
    weekly = level[level.index.dayofweek == 4]
    joint = pd.concat([np.log(sp500.load()["Adj Close"].dropna()), (level / 100.0) ** 2],
                      axis=1, join="inner").dropna()
    joint_weekly = joint[joint.index.dayofweek == 4]
    return {"vix_daily": (np.arange(len(level)) / 252.0, level.to_numpy()),
            "vix_weekly": (np.arange(len(weekly)) / 52.0, weekly.to_numpy()),
            "heston_weekly": (np.arange(len(joint_weekly)) / 52.0, joint_weekly.to_numpy()),
            "heston_daily": (np.arange(len(joint)) / 252.0, joint.to_numpy())}


def _equity_rows(s: dict[str, Any], work: Path) -> list[Row]:
    series = _equity_series()
    rows = []
    for slug, label in (("vix_weekly", "CIR: VIX, Fridays 2014–2018"),
                        ("vix_daily", "CIR: VIX, daily 2014–2018")):
        t, v = series[slug]
        data = _write(work / f"{slug}.csv", t, v, ["vix"])
        fit, walls = _fit(data, ["equation.sde.kind=cir"], s, work, slug)
        rows += [_cir_row(label, fit, walls, MAX_SERIES_S), *_baseline_rows(label, fit)]
    one = dict(s, repeats=1)  # a few minutes each: one run
    for slug, label in (("heston_weekly", "Heston: S&P 500 and VIX², Fridays 2014–2018"),
                        ("heston_daily", "Heston: S&P 500 and VIX², daily 2014–2018")):
        t, x = series[slug]
        data = _write(work / f"{slug}.csv", t, x, ["logS", "V"])
        fit, walls = _fit(data, ["equation.dim=2", "equation.sde.kind=heston"], one, work, slug)
        verdict = fit.get("verdict", {})
        names = fit["names"]
        finite = all(math.isfinite(fit["se"][n]) for n in names)
        rows.append(row("neuralpde calibrate (PDE)", label, values=fit["estimates"], se=fit["se"],
                        loglik=fit["loglik"], converged=fit["converged"], verdict=verdict,
                        estimates=_text(fit["estimates"], names), distance="—", density="—",
                        time_s=walls[0],
                        target=f"{'met' if fit['converged'] and finite else 'NOT met'}: converged, "
                               "finite SEs, no traceback; verdict: "
                               + " ".join(verdict.get("lines", [])[1:2]),
                        note=f"n = {fit['n_transitions']}, start {fit['start']['from']}, K = "
                             f"{fit['time_march'].get('components')}, "
                             f"{fit['time_march'].get('steps')} steps"))
        rows += _baseline_rows(label, fit)
    return rows


def _write(path: Path, time_: np.ndarray, state: np.ndarray, names: list[str]) -> Path:
    state = state.reshape(len(time_), -1)
    lines = ["time," + ",".join(names)]
    lines += [f"{t:.10g}," + ",".join(f"{v:.17g}" for v in s) for t, s in zip(time_, state)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _fit(data: Path, overrides: list[str], s: dict[str, Any], work: Path, slug: str
         ) -> tuple[dict[str, Any], list[float]]:
    """fit.json of the last of the tier's repeats, and every repeat's wall time."""
    walls, fit = [], {}
    for r in range(s["repeats"]):
        run_dir = work / f"{slug}-{r}"
        _, wall = run_neuralpde("calibrate", [f"data={data}", *overrides], run_dir, "cpu",
                                s["timeout_s"])
        walls.append(wall)
        fit = json.loads((run_dir / "fit.json").read_text())
    return fit, walls


def _text(d: dict[str, float] | None, names: list[str], digits: int = 4) -> str:
    return ", ".join(f"{n} {d[n]:.{digits}g}" for n in names if d and d.get(n) is not None) or "—"


def _bands(error: dict[str, Any] | None) -> str:
    if not error:
        return "—"
    parts = [f"{b['band']}: {b['n']} (max {b['max_abs']:.1e})" for b in error["bands"] if b["n"]]
    return f"{error['loglik_error_per_1000']:+.3f}; " + "; ".join(parts)


def _cir_row(setting: str, fit: dict[str, Any], walls: list[float], max_s: float) -> Row:
    names, exact = fit["names"], fit["baselines"]["exact"]
    dist = {n: (fit["estimates"][n] - exact["estimates"][n]) / exact["se"][n] for n in names}
    worst = max(abs(v) for v in dist.values())
    error = fit.get("density_error") or {}
    per_1000 = error.get("loglik_error_per_1000", math.inf)
    wall = statistics.median(walls)
    ok = fit["converged"] and worst <= MAX_SE and abs(per_1000) <= MAX_LOGLIK_PER_1000 \
        and wall <= max_s
    march = fit["time_march"]
    return row("neuralpde calibrate (PDE)", setting, values=fit["estimates"], se=fit["se"],
               loglik=fit["loglik"], distance_se=dist, density_error=error, wall_s=walls,
               converged=fit["converged"], start=fit["start"]["from"],
               components=march.get("components"), coordinates=march.get("march_coordinates"),
               estimates=_text(fit["estimates"], names), distance=_text(dist, names, 2),
               density=_bands(error), time_s=wall,
               target=f"{'met' if ok else 'NOT met'}: converged, ≤ {MAX_SE:g} SE ({worst:.2g}), "
                      f"|log L error| ≤ {MAX_LOGLIK_PER_1000:g}/1,000 ({per_1000:+.2g}), "
                      f"≤ {max_s:g} s ({wall:.1f} s)",
               note=f"n = {fit['n_transitions']}, start {fit['start']['from']}, K = "
                    f"{march.get('components')}, {march.get('steps')} steps, coordinates "
                    f"{march.get('march_coordinates')}; exact log L {exact['loglik']:.3f}, "
                    f"PDE {fit['loglik']:.3f}")


def _baseline_rows(setting: str, fit: dict[str, Any]) -> list[Row]:
    out = []
    names = fit["names"]
    for name, b in fit["baselines"].items():
        dist = b.get("distance_se")
        out.append(row({"exact": "exact MLE (scipy)", "euler": "Euler quasi-MLE",
                        "kessler": "Kessler quasi-MLE"}.get(name, name), setting,
                       values=b["estimates"], se=b["se"], loglik=b["loglik"],
                       estimates=_text(b["estimates"], names),
                       distance=_text(dist, names, 2) if dist else "—", time_s=b["wall_time_s"],
                       note=f"log L {b['loglik']:.3f}" + ("" if name == "exact" else
                                                          " (a quasi-likelihood)")))
    return out


def _series_rows(label: str, series: tuple[np.ndarray, np.ndarray, str], s: dict[str, Any],
                 work: Path) -> list[Row]:
    from scipy.stats import chi2

    time_, level, slug = series
    data = _write(work / f"{slug}.csv", time_, level, ["rate"])
    cir, walls = _fit(data, ["equation.sde.kind=cir"], s, work, f"{slug}-cir")
    rows = [_cir_row(f"CIR: {label}", cir, walls, MAX_SERIES_S),
            *_baseline_rows(f"CIR: {label}", cir)]
    cev, cev_walls = _fit(data, ["equation.sde.kind=cev"], dict(s, repeats=1), work, f"{slug}-cev")
    lr = 2.0 * (cev["loglik"] - cir["loglik"])
    p = float(chi2.sf(max(lr, 0.0), 1))
    names = cev["names"]
    rows.append(row("neuralpde calibrate (PDE), CEV", f"CEV: {label}", values=cev["estimates"],
                    se=cev["se"], loglik=cev["loglik"], lr_gamma_half=lr, p_value=p,
                    converged=cev["converged"], estimates=_text(cev["estimates"], names),
                    distance="—", density="—", time_s=statistics.median(cev_walls),
                    target=f"LR test of γ = ½ (CIR nested): 2Δℓ = {lr:.2f}, p = {p:.2g}"
                           + ("" if cev["converged"] else "; NOT converged"),
                    note=f"log L {cev['loglik']:.3f} against CIR's {cir['loglik']:.3f}; start "
                         f"{cev['start']['from']}"))
    rows += _baseline_rows(f"CEV: {label}", cev)
    return rows


def _ou_paths(n: int, dt: float, theta: np.ndarray, mean: np.ndarray, sigma: np.ndarray,
              seed: int) -> np.ndarray:
    """One path of n + 1 exact OU draws from the mean (Van Loan's covariance)."""
    from scipy.linalg import expm
    d = len(mean)
    rng = np.random.default_rng(seed)
    phi = expm(-theta * dt)
    block = expm(np.block([[theta, sigma @ sigma.T], [np.zeros((d, d)), -theta.T]]) * dt)
    cov = block[d:, d:].T @ block[:d, d:]
    chol = np.linalg.cholesky(0.5 * (cov + cov.T))
    x = np.empty((n + 1, d))
    x[0] = mean
    for i in range(n):
        x[i + 1] = mean + phi @ (x[i] - mean) + chol @ rng.standard_normal(d)
    return x


def _simulated_rows(s: dict[str, Any], work: Path) -> list[Row]:
    rows = []
    one = _ou_paths(5000, 0.5, np.eye(1), np.zeros(1), np.eye(1), seed=11)
    data = _write(work / "ou1.csv", np.arange(5001) * 0.5, one, ["x"])
    fit, walls = _fit(data, [], s, work, "ou1")
    rows.append(_simulated_row("OU 1-D, 5,000 × Δt 0.5 (defaults: K = 3 asked)", fit, walls, 20.0))
    theta, mean = np.array([[1.0, 0.6], [-0.4, 0.8]]), np.array([1.0, -0.5])
    two = _ou_paths(3000, 0.25, theta, mean, np.array([[0.8, 0.0], [0.4, 0.6]]), seed=21)
    data = _write(work / "ou2.csv", np.arange(3001) * 0.25, two, ["x1", "x2"])
    fit, walls = _fit(data, ["equation.dim=2", "equation.sde.theta=[[1.0,0.0],[0.0,1.0]]",
                             "equation.sde.mean=[0.0,0.0]", "equation.sde.sigma=[[1.0,0.0],[0.0,1.0]]"],
                      s, work, "ou2")
    rows.append(_simulated_row("OU 2-D, 3,000 × Δt 0.25 (defaults: K = 3 asked)", fit, walls, 120.0))
    daily = exact_cir_path(7900, 1 / 252, 4.0, 20.0, 4.4, seed=31)
    data = _write(work / "cir_daily.csv", np.arange(7901) / 252, daily, ["level"])
    fit, walls = _fit(data, ["equation.sde.kind=cir"], s, work, "cir_daily")
    rows.append(_cir_row("CIR (4, 20, 4.4), 7,900 daily", fit, walls, 60.0))
    return rows


def _simulated_row(setting: str, fit: dict[str, Any], walls: list[float], max_s: float) -> Row:
    names, exact = fit["names"], fit["baselines"]["exact"]
    dist = {n: (fit["estimates"][n] - exact["estimates"][n]) / exact["se"][n] for n in names}
    worst, wall = max(abs(v) for v in dist.values()), statistics.median(walls)
    ok = fit["converged"] and worst <= MAX_SE and wall <= max_s
    return row("neuralpde calibrate (PDE)", setting, distance_se=dist, wall_s=walls,
               components=fit["time_march"].get("components"),
               estimates=f"worst distance {worst:.2g} SE", distance=_text(dist, names, 2)
               if len(names) <= 4 else f"max {worst:.2g}", density=_bands(fit.get("density_error")),
               time_s=wall,
               target=f"{'met' if ok else 'NOT met'}: ≤ {MAX_SE:g} SE ({worst:.2g}), ≤ {max_s:g} s "
                      f"({wall:.1f} s)",
               note=f"K = {fit['time_march'].get('components')} chosen, "
                    f"{fit['time_march'].get('steps')} steps; PDE fit {fit['fit_time_s']:.1f} s")


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    work = Path(tempfile.mkdtemp(prefix="neuralpde-bench-calibrate-real-"))
    rows: list[Row] = []
    try:
        for label, series in list(_real_series().items())[:s["series"]]:
            rows += _timed(label, lambda label=label, series=series: attempt(
                "neuralpde calibrate (PDE)", f"CIR: {label}",
                lambda: _series_rows(label, series, s, work)))
        if s["equity"]:
            rows += _timed("VIX and S&P 500", lambda: attempt(
                "neuralpde calibrate (PDE)", "VIX and S&P 500", lambda: _equity_rows(s, work)))
        if s["simulated"]:
            rows += _timed("simulated", lambda: attempt(
                "neuralpde calibrate (PDE)", "simulated", lambda: _simulated_rows(s, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _timed(what: str, fn: Callable[[], list[Row]]) -> list[Row]:
    import sys
    print(f"[calibrate_real {time.strftime('%H:%M:%S')}] {what} ...", file=sys.stderr, flush=True)
    return fn()
