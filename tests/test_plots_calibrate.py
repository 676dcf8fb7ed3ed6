"""Plots of a calibrate run directory, written from a synthetic but genuine OU fit.

The run directory is what `calibrate` writes (fit.json, metrics.csv, diagnostics.npz), filled
from data sampled from the exact OU transition and fitted here by scipy on the exact, Euler and
second-order (Kessler-type) Gaussian likelihoods, so every plotted number is a plausible one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, stats

from neuralpde_cli.run.plots_calibrate import (
    CHI2_95_HALF, Z_95, ks_band, make_calibration_plots, profile_interval,
)

PLOTS = ("trace.png", "profiles.png", "transition.png", "pit.png", "estimates.png",
         "correlation.png")
NAMES = ["theta", "mean", "sigma"]
TRUTH = {"theta": 1.0, "mean": 0.5, "sigma": 0.4}
DT = 0.5


def _moments(kind: str, x0: np.ndarray, theta: float, mean: float, sigma: float):
    """Conditional mean and variance of x_{k+1} | x_k under each Gaussian transition."""
    if kind == "exact":
        b, var = math.exp(-theta * DT), sigma**2 * (1 - math.exp(-2 * theta * DT)) / (2 * theta)
    elif kind == "euler":
        b, var = 1 - theta * DT, sigma**2 * DT
    else:  # kessler: the exact moments' Taylor expansion to second order in Δt
        b = 1 - theta * DT + 0.5 * (theta * DT) ** 2
        var = sigma**2 * DT * (1 - theta * DT + 2 / 3 * (theta * DT) ** 2)
    return mean + (x0 - mean) * b, var


def _loglik(kind: str, p: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> float:
    if p[0] <= 0 or p[2] <= 0:
        return -math.inf
    m, var = _moments(kind, x0, *p)
    if var <= 0:
        return -math.inf
    return float(stats.norm.logpdf(x1, m, math.sqrt(var)).sum())


def _hessian(f, p: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Central differences of f at p, relative steps."""
    n = len(p)
    H = np.empty((n, n))
    step = h * np.maximum(np.abs(p), 1e-2)
    for i in range(n):
        for j in range(n):
            e_i, e_j = np.eye(n)[i] * step[i], np.eye(n)[j] * step[j]
            H[i, j] = (f(p + e_i + e_j) - f(p + e_i - e_j) - f(p - e_i + e_j)
                       + f(p - e_i - e_j)) / (4 * step[i] * step[j])
    return H


def _mle(kind: str, x0, x1, start, history: list | None = None):
    nll = lambda p: -_loglik(kind, p, x0, x1)  # noqa: E731
    cb = None if history is None else (lambda xk: history.append(np.array(xk)))
    res = optimize.minimize(nll, start, method="L-BFGS-B", callback=cb,
                            bounds=[(1e-3, None), (None, None), (1e-3, None)])
    cov = np.linalg.inv(_hessian(nll, res.x))
    return res.x, np.sqrt(np.diag(cov)), cov, -res.fun


def _write_run(run: Path, n: int = 1500, seed: int = 3) -> None:
    """fit.json, metrics.csv and diagnostics.npz of an OU fit at Δt = 0.5 (the 'pde' fit is the
    exact MLE nudged by a few hundredths of an SE, as a good PDE likelihood would give)."""
    rng = np.random.default_rng(seed)
    x = np.empty(n + 1)
    x[0] = TRUTH["mean"]
    for k in range(n):
        m, var = _moments("exact", x[k:k + 1], *TRUTH.values())
        x[k + 1] = m[0] + math.sqrt(var) * rng.standard_normal()
    x0, x1 = x[:-1], x[1:]
    start = np.array([0.3, 0.0, 1.0])
    history = [start]
    est, se, cov, ll = _mle("exact", x0, x1, start, history)
    baselines = {}
    for kind in ("exact", "euler", "kessler"):
        e, s, _, l = (est, se, cov, ll) if kind == "exact" else _mle(kind, x0, x1, est)
        baselines[kind] = {"estimates": dict(zip(NAMES, e)), "se": dict(zip(NAMES, s)),
                           "loglik": l, "wall_time_s": 0.01,
                           "distance_se": dict(zip(NAMES, (e - est) / se))}
    pde = est + np.array([0.04, -0.02, 0.03]) * se
    pde_se = se * 1.01
    corr = cov / np.outer(se, se)
    fit = {"method": "pde", "names": NAMES, "estimates": dict(zip(NAMES, pde)),
           "se": dict(zip(NAMES, pde_se)), "correlation": corr.tolist(), "loglik": ll,
           "aic": 6 - 2 * ll, "bic": 3 * math.log(n) - 2 * ll, "n_transitions": n, "n_paths": 1,
           "dt": {"min": DT, "median": DT, "max": DT}, "wall_time_s": 1.0,
           "true_values": TRUTH, "baselines": baselines, "config": {}}
    (run / "fit.json").write_text(json.dumps(fit, indent=2))

    with (run / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["iteration", "loglik", "grad_norm", "step_size", *NAMES])
        for i, p in enumerate(history):
            grad = optimize.approx_fprime(p, lambda q: _loglik("exact", q, x0, x1), 1e-7)
            step = np.linalg.norm(p - history[i - 1]) if i else math.nan
            writer.writerow([i, _loglik("exact", p, x0, x1), np.linalg.norm(grad), step, *p])

    grid = np.array([e + se_i * np.linspace(-3, 3, 13) for e, se_i in zip(est, se)])
    prof = np.empty_like(grid)
    for i in range(3):
        for j, value in enumerate(grid[i]):
            free = [k for k in range(3) if k != i]

            def nll(q, i=i, value=value, free=free):
                p = np.empty(3)
                p[i], p[free] = value, q
                return -_loglik("exact", p, x0, x1)
            prof[i, j] = -optimize.minimize(nll, est[free], method="Nelder-Mead",
                                            options={"xatol": 1e-7, "fatol": 1e-9}).fun
    m_fit, var_fit = _moments("exact", x0, *pde)
    pit = stats.norm.cdf(x1, m_fit, math.sqrt(var_fit))
    centres = np.quantile(x0, [0.1, 0.3, 0.5, 0.7, 0.9])
    half = 0.1 * x0.std()
    edges = np.column_stack([centres - half, centres + half])
    bin_index = np.full(n, -1)
    for b, (lo, hi) in enumerate(edges):
        bin_index[(x0 >= lo) & (x0 < hi)] = b
    keep = bin_index >= 0
    density_x = np.array([np.linspace(c - 1.5, c + 1.5, 201) for c in centres])
    dens = {}
    for kind, p in (("fit", pde), ("exact", est)):
        m, var = _moments("exact", centres, *p)
        dens[kind] = stats.norm.pdf(density_x, m[:, None], math.sqrt(var))
    np.savez(run / "diagnostics.npz", pit=pit, profile_names=np.array(NAMES), profile_grid=grid,
             profile_loglik=prof, bin_edges=edges, bin_dt=np.full(len(centres), DT),
             density_x=density_x, density_fit=dens["fit"], density_exact=dens["exact"],
             bin_x1=x1[keep], bin_index=bin_index[keep])


@pytest.fixture(scope="module")
def ou_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("calibrate_run")
    _write_run(run)
    return run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("plots"))
    return dst


def _check_png(path: Path) -> None:
    from PIL import Image
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert 450 <= width <= 2500 and 300 <= height <= 2500, (path.name, img.size)
    assert pixels.std() > 5, f"{path.name} is blank"


def test_five_plots_from_a_full_run(ou_run: Path) -> None:
    out = make_calibration_plots(ou_run)
    assert sorted(p.name for p in out) == sorted(PLOTS)
    for name in PLOTS:
        _check_png(ou_run / "plots" / name)


def test_synthetic_fit_is_a_genuine_one(ou_run: Path) -> None:
    """The plots' input is what a fit would write: the profile is maximal at the exact MLE and its
    95% interval agrees with the Wald one (OU, 1,500 transitions: a near-quadratic likelihood)."""
    fit = json.loads((ou_run / "fit.json").read_text())
    exact = fit["baselines"]["exact"]
    with np.load(ou_run / "diagnostics.npz") as d:
        for name, grid, ll in zip(d["profile_names"], d["profile_grid"], d["profile_loglik"]):
            est, se = exact["estimates"][name], exact["se"][name]
            assert abs(grid[np.argmax(ll)] - est) < 1e-9 + 0.6 * se
            lo, hi = profile_interval(grid, ll)
            assert lo == pytest.approx(est - Z_95 * se, abs=0.15 * se), name
            assert hi == pytest.approx(est + Z_95 * se, abs=0.15 * se), name
        assert stats.kstest(d["pit"], "uniform").pvalue > 0.01


def test_profile_interval_of_a_quadratic_is_the_wald_interval() -> None:
    centre, se = 2.0, 0.3
    grid = centre + se * np.linspace(-3, 3, 601)
    lo, hi = profile_interval(grid, 7.0 - 0.5 * ((grid - centre) / se) ** 2)
    assert lo == pytest.approx(centre - Z_95 * se, abs=1e-4 * se)
    assert hi == pytest.approx(centre + Z_95 * se, abs=1e-4 * se)
    assert CHI2_95_HALF == pytest.approx(0.5 * stats.chi2.ppf(0.95, 1), rel=1e-12)
    narrow = centre + se * np.linspace(-1, 3, 41)  # the grid never reaches the left end
    lo, hi = profile_interval(narrow, -0.5 * ((narrow - centre) / se) ** 2)
    assert math.isnan(lo) and hi == pytest.approx(centre + Z_95 * se, abs=1e-2 * se)


def test_ks_band_against_closed_forms() -> None:
    # n = 1: D = max(u, 1 - u), P(D <= d) = 2d - 1, so the 95% point is 0.975
    assert ks_band(1) == pytest.approx(0.975, rel=1e-9)
    # large n: Kolmogorov's limit, sqrt(n) D -> K with P(K <= 1.3581) = 0.95
    assert ks_band(20000) * math.sqrt(20000) == pytest.approx(1.3581, rel=5e-3)


def test_partial_run_directories_do_not_crash(ou_run: Path, tmp_path: Path, caplog) -> None:
    # no baselines, no truth, one parameter, no exact density, no profiles, an empty bin,
    # a null SE, and a one-row metrics.csv
    run = _copy(ou_run, tmp_path / "partial")
    fit = json.loads((run / "fit.json").read_text())
    fit.update(names=["theta"], estimates={"theta": fit["estimates"]["theta"]},
               se={"theta": None}, true_values=None)
    del fit["baselines"]
    (run / "fit.json").write_text(json.dumps(fit))
    lines = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")
    with np.load(run / "diagnostics.npz") as d:
        arrays = {k: d[k] for k in d.files if not k.startswith("profile_")}
    arrays["density_exact"] = np.full_like(arrays["density_fit"], np.nan)
    keep = arrays["bin_index"] != 2
    arrays["bin_index"], arrays["bin_x1"] = arrays["bin_index"][keep], arrays["bin_x1"][keep]
    np.savez(run / "diagnostics.npz", **arrays)
    with caplog.at_level(logging.INFO, logger="neuralpde_cli.run.plots_calibrate"):
        out = make_calibration_plots(run)
    assert sorted(p.name for p in out) == sorted(set(PLOTS) - {"profiles.png", "correlation.png"})
    assert not (run / "plots" / "profiles.png").exists()
    assert "profiles.png skipped" in caplog.text
    for path in out:
        _check_png(path)

    # nothing but fit.json: only the estimates
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ou_run / "fit.json", bare / "fit.json")
    assert [p.name for p in make_calibration_plots(bare)] == ["estimates.png", "correlation.png"]


def test_nine_parameters_lay_out_on_a_grid(ou_run: Path, tmp_path: Path) -> None:
    """A 2-D OU's nine scalars (theta 2×2, mean 2, sigma lower triangle), no exact baseline."""
    run = _copy(ou_run, tmp_path / "nine")
    names = ["theta[0][0]", "theta[0][1]", "theta[1][0]", "theta[1][1]", "mean[0]", "mean[1]",
             "sigma[0][0]", "sigma[1][0]", "sigma[1][1]"]
    fit = json.loads((run / "fit.json").read_text())
    old = fit["names"]
    pick = {n: old[i % 3] for i, n in enumerate(names)}
    for key in ("estimates", "se", "true_values"):
        fit[key] = {n: fit[key][pick[n]] for n in names}
    fit["names"] = names
    fit["baselines"] = {"euler": {k: ({n: v[pick[n]] for n in names} if isinstance(v, dict) else v)
                                  for k, v in fit["baselines"]["euler"].items()}}
    (run / "fit.json").write_text(json.dumps(fit))
    with (run / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (run / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["iteration", "loglik", "grad_norm", "step_size", *names])
        for r in rows:
            writer.writerow([r["iteration"], r["loglik"], r["grad_norm"], r["step_size"],
                             *(r[pick[n]] for n in names)])
    with np.load(run / "diagnostics.npz") as d:  # transition and pit do not depend on P
        arrays = {k: d[k] for k in d.files if k.startswith("profile_")}
    arrays["profile_names"] = np.array(names)
    arrays["profile_grid"] = np.tile(arrays["profile_grid"], (3, 1))
    arrays["profile_loglik"] = np.tile(arrays["profile_loglik"], (3, 1))
    np.savez(run / "diagnostics.npz", **arrays)
    out = make_calibration_plots(run)
    assert sorted(p.name for p in out) == ["estimates.png", "profiles.png", "trace.png"]
    for path in out:
        _check_png(path)


def test_plots_against_time_use_the_data_dates_not_years_from_1970():
    """Trading-day years counted from 1970 put 2014-01-03 at 2015.6 on a 'years' axis; with
    dates in the diagnostics the axis is the calendar."""
    from neuralpde_cli.run.plots_calibrate import _time_axis

    dates = np.array(["2014-01-03", "2014-01-06", "2018-12-31"])
    diag = {"transition_time": np.array([45.62, 45.63, 50.6]), "transition_date": dates}
    x, label = _time_axis(diag, "transition_time", "transition_date")
    assert label == "date" and x[0] == np.datetime64("2014-01-03") and x[-1] == np.datetime64("2018-12-31")
    x, label = _time_axis({"transition_time": np.array([0.0, 0.5])}, "transition_time",
                          "transition_date")
    assert label == "time (years)" and np.allclose(x, [0.0, 0.5])
