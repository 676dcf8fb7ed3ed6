"""What a user brings and reads: a dated CSV with labels and gaps, two columns without typed
matrices, a report over calibrate runs, and calibration from Python.

Every fit is checked against the exact OU MLE on the same transitions (irregular steps
included), not against the code's own earlier output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

THETA, MEAN, SIGMA = 4.0, 0.5, 0.6  # per year


def _ou_path(times: np.ndarray, seed: int) -> np.ndarray:
    """The exact OU transition along arbitrary times (years)."""
    rng = np.random.default_rng(seed)
    x = np.empty(times.size)
    x[0] = MEAN
    for k in range(1, times.size):
        a = math.exp(-THETA * (times[k] - times[k - 1]))
        sd = SIGMA * math.sqrt((1 - a * a) / (2 * THETA))
        x[k] = MEAN + (x[k - 1] - MEAN) * a + sd * rng.standard_normal()
    return x


def _business_days(n: int) -> np.ndarray:
    days = np.arange(np.datetime64("2019-01-01"), np.datetime64("2019-01-01") + 2 * n)
    return days[np.is_busday(days)][:n]


def _close_to_exact(fit: dict, tol: float = 0.1) -> None:
    exact = fit["baselines"]["exact"]
    for name, value in fit["estimates"].items():
        assert abs(value - exact["estimates"][name]) < tol * exact["se"][name], name


def test_a_dated_csv_with_a_label_column_and_gaps(tmp_path: Path):
    """ISO dates (calendar days / 365.25, said first in the log), a label column left out by
    data.columns, 'NA' and '.' cells skipped so the transition spans the gap."""
    days = _business_days(360)
    t = 2019.0 + (days - np.datetime64("2019-01-01")) / np.timedelta64(1, "D") / 365.25
    x = _ou_path(t, seed=1)
    lines = ["Date,ticker,rate"] + [f"{d},OU,{float(v)!r}" for d, v in zip(days, x)]
    lines[40] = lines[40].rsplit(",", 1)[0] + ",NA"
    lines[200] = lines[200].rsplit(",", 1)[0] + ",."
    (tmp_path / "rates.csv").write_text("\n".join(lines) + "\n")
    refused = run_cli(["calibrate", "data=rates.csv", "hydra.run.dir=no"], tmp_path)
    assert refused.returncode == 2 and not (tmp_path / "no").exists()
    assert "column ticker: 'OU' is not a number; a column of labels? choose the state columns " \
           "with data.columns=[rate]" in refused.stderr
    result = run_cli(["calibrate", "data=rates.csv", "data.columns=[rate]", "fit.profile_points=0",
                      "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    log = (run / "calibrate.log").read_text()
    first = log.splitlines()[0]
    # no silence after the last iteration: each stage says what it computes
    for stage in ("the optimum found after", "standard errors: the observed information from 6 "
                  "gradients", "diagnostics: the PIT", "sandwich standard errors"):
        assert stage in log, stage
    assert "dates in column 'Date' → years by calendar days / 365.25" in first
    assert "2019-01-01 … " in first
    fit = json.loads((run / "fit.json").read_text())
    assert fit["data"]["skipped_lines"] == [41, 201] and fit["data"]["columns"] == ["rate"]
    assert fit["n_transitions"] == 357
    assert fit["dt"]["max"] * 365.25 == pytest.approx(4.0)  # Friday → Tuesday across a gap
    _close_to_exact(fit)
    with np.load(run / "diagnostics.npz") as d:
        assert d["transition_date"][0] == "2019-01-02" and d["transition_date"].size == 357
        assert np.isfinite(d["logdensity_exact"]).all()
        # each transition's fitted log-density is the exact one's (the law is Gaussian)
        assert np.abs(d["logdensity_fit"] - d["logdensity_exact"]).max() < 1e-3
    for plot in ("transition", "pit_time"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 10_000


def test_two_columns_fit_with_no_matrix_typed(tmp_path: Path):
    """equation.dim=2 alone: θ, mean and σ start from the data's VAR(1)."""
    rng = np.random.default_rng(2)
    theta = np.array([[1.0, 0.5], [-0.3, 0.8]])
    from scipy.linalg import expm
    dt, n = 0.25, 300
    a = expm(-theta * dt)
    x = np.zeros((n + 1, 2))
    for k in range(n):  # a stable VAR(1) with a real log: an OU observed every dt, exactly
        x[k + 1] = a @ x[k] + 0.25 * rng.standard_normal(2)
    lines = ["time,u,v"] + [f"{k * dt},{float(p)!r},{float(q)!r}" for k, (p, q) in enumerate(x)]
    (tmp_path / "two.csv").write_text("\n".join(lines) + "\n")
    result = run_cli(["calibrate", "data=two.csv", "equation.dim=2", "fit.profile_points=0",
                      "fit.density_bins=1", "fit.baselines=[exact]", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr
    fit = json.loads((tmp_path / "run" / "fit.json").read_text())
    assert fit["start"]["baselines_from"] == "VAR(1)" and fit["converged"]
    _close_to_exact(fit)


def test_report_marks_a_dead_writer_interrupted_with_its_own_resume(tmp_path: Path):
    """A calibrate run killed by SIGHUP leaves "running" and a non-empty lock nobody holds."""
    run = tmp_path / "sweep" / "0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    (run / ".neuralpde.lock").write_text("pid 123 on host since 2026-12-07 10:00:00\n")
    (run / "summary.json").write_text(json.dumps({"status": "running", "command": "calibrate"}))
    result = run_cli(["report", "sweep"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "interrupted" in result.stdout
    assert "neuralpde calibrate resume=sweep/0" in result.stdout
    assert "neuralpde calibrate resume=sweep/0" in (tmp_path / "sweep" / "report" /
                                                    "report.md").read_text()


def test_calibrate_from_python(tmp_path: Path):
    """neuralpde_cli.calibrate on an array (and on a path): the same fit as the CLI's, read
    back as a result with estimates, SEs, the verdict and a statsmodels-like summary."""
    import neuralpde_cli

    x = _ou_path(np.arange(400) * 0.1, seed=3)
    result = neuralpde_cli.calibrate(x, sde="ou", dt=0.1, overrides={"fit.profile_points": 0},
                                     run_dir=tmp_path / "api", quiet=True)
    assert result.converged and set(result.estimates) == {"theta", "mean", "sigma"}
    _close_to_exact(result.fit)
    assert result.loglik == pytest.approx(result.baselines["exact"]["loglik"], abs=0.05)
    text = result.summary()
    assert "coef" in text and "std err" in text and "The fit converged" in text
    assert result.verdict["lines"][-1] in text and str(tmp_path / "api") in text
    assert (tmp_path / "api" / "calibrate.log").read_text().count("iteration") >= 2
    with pytest.raises(Exception, match=r"an array needs dt > 0"):
        neuralpde_cli.calibrate(x, sde="ou", run_dir=tmp_path / "no_dt")
    with pytest.raises(Exception, match=r"fit.max_iter=0 must be ≥ 1"):
        neuralpde_cli.calibrate(tmp_path / "api" / "data.csv", overrides=["fit.max_iter=0"],
                                run_dir=tmp_path / "bad")


def _result(names, estimates, se, loglik=0.0):
    from neuralpde_cli.likelihood.fit import FitResult
    p = len(names)
    return FitResult(names=list(names), estimates=np.array(estimates, float),
                     se=np.array(se, float), hessian=np.eye(p), covariance=np.eye(p),
                     correlation=np.eye(p),
                     loglik=loglik, iterations=5, evaluations=9, converged=True)


def test_the_verdict_names_a_poorly_identified_parameter_from_its_profile():
    """A quadratic profile (SE right) passes; one that stays within χ²₁(95 %)/2 of the
    maximum at −3 SE is named with where, and one that rises above the fit's log L too."""
    from neuralpde_cli.tasks.calibrate import _verdict

    result = _result(["rate", "level"], [0.05, 4.0], [0.06, 1.0], loglik=-200.0)
    offsets = np.linspace(-3, 3, 7)
    grid = np.array([0.05 + 0.06 * offsets, 4.0 + offsets])
    quadratic = -200.0 - 0.5 * offsets ** 2
    flat_below = np.where(offsets < 0, -200.0 - 0.1 * offsets ** 2, quadratic)
    pit = (np.arange(200) + 0.5) / 200
    lines = _verdict(result, pit, {"profile_grid": grid,
                                   "profile_loglik": np.array([flat_below, quadratic])})["lines"]
    flagged = [line for line in lines if "poorly identified" in line]
    assert len(flagged) == 1 and flagged[0].startswith(
        f"rate is poorly identified: its profile log L stays within 1.92 of the maximum below "
        f"to {grid[0, 0]:.4g}: its 95% profile interval is wider than the Wald interval")
    # a positive parameter's profile stops at −0.9θ: the interval reaches the domain's edge
    edge = grid.copy()
    edge[0, 0] = 0.005
    lines = _verdict(result, pit, {"profile_grid": edge,
                                   "profile_loglik": np.array([flat_below, quadratic])})["lines"]
    assert any(line.startswith("rate is poorly identified: its profile log L stays within 1.92 "
                               "of the maximum below to 0.005, near the edge of its domain: the "
                               "data do not bound rate away from it") for line in lines)
    rising = np.array([quadratic, quadratic + np.where(offsets == 1, 1.2, 0.0)])  # −200.5 + 1.2
    lines = _verdict(result, pit, {"profile_grid": grid, "profile_loglik": rising})["lines"]
    assert any(line.startswith("level's profile rises 0.7 above the fit's log L") for line in lines)


def test_an_unreliable_bootstrap_correction_is_said():
    """A bias three times the estimate (the issue's 120 monthly rates: +0.453 on 0.140) is
    called unreliable; a bias inside its Monte Carlo noise is called that."""
    from neuralpde_cli.tasks.calibrate import _bootstrap_caveats

    result = _result(["rate", "noise"], [0.140, 0.5], [0.1, 0.02])
    lines = _bootstrap_caveats(result, {
        "estimates": {"rate": 0.0336, "noise": 0.501}, "bias": {"rate": 0.453, "noise": 0.001},
        "bias_mc_se": {"rate": 0.05, "noise": 0.002},
        "corrected_in_fit_coordinates": ["rate"]})
    assert lines[0].startswith("The bootstrap's bias for rate (+0.453) is 3.2× the estimate "
                               "(0.14), so the correction was made in the fitter's coordinate: "
                               "the corrected rate is unreliable")
    assert lines[1].startswith("The bootstrap's bias for noise (+0.001) is within twice its "
                               "Monte Carlo error")
    assert _bootstrap_caveats(result, {"estimates": None}) == []


def test_calibrate_from_a_dataframe_with_a_date_index(tmp_path: Path):
    """A pandas DataFrame as users hold prices: a date index, a label column chosen away."""
    pd = pytest.importorskip("pandas")
    days = _business_days(300)
    t = 2019.0 + (days - np.datetime64("2019-01-01")) / np.timedelta64(1, "D") / 365.25
    frame = pd.DataFrame({"ticker": "OU", "rate": _ou_path(t, seed=4)},
                         index=pd.DatetimeIndex(days, name="Date"))
    import neuralpde_cli
    result = neuralpde_cli.calibrate(frame, sde="ou", columns=["rate"],
                                     overrides={"fit.profile_points": 0}, run_dir=tmp_path / "df",
                                     quiet=True)
    assert result.n_transitions == 299 and result.fit["data"]["first"] == "2019-01-01"
    _close_to_exact(result.fit)


def test_a_fixed_matrix_entry_stays_as_typed_when_others_start_from_the_data():
    """fit.params names some entries: the VAR(1) start replaces those, never a value the
    user holds fixed; a matrix not typed at all (wrong shape) is replaced whole."""
    from neuralpde_cli.data import Observations
    from neuralpde_cli.sdes import SDEConfig
    from neuralpde_cli.tasks.calibrate import _data_start

    rng = np.random.default_rng(6)
    x = np.zeros((301, 2))
    for k in range(300):
        x[k + 1] = 0.8 * x[k] + 0.3 * rng.standard_normal(2)
    obs = Observations(np.arange(301) * 0.25, x, np.zeros(301))
    cfg = SDEConfig(kind="ou", theta=[[1.0]], mean=[0.0, 0.0], sigma=[[0.2, 0.0], [0.0, 0.3]])
    fitted = ["theta[0][0]", "theta[0][1]", "theta[1][0]", "theta[1][1]", "mean[0]", "mean[1]"]
    assert _data_start(cfg, 2, obs.transitions(), obs, "baseline", fitted)
    assert cfg.sigma == [[0.2, 0.0], [0.0, 0.3]]  # held fixed: as typed
    assert np.shape(cfg.theta) == (2, 2) and abs(cfg.theta[0][0] - 0.89) < 0.3  # −log 0.8 / 0.25
    assert cfg.mean != [0.0, 0.0]


def test_report_reads_a_fit_with_nan_standard_errors(tmp_path: Path):
    """fit.json writes NaN as null (a fit that did not converge): report and the Python
    result read it as NaN, never a TypeError."""
    from neuralpde_cli.api import CalibrationResult

    run = tmp_path / "runs" / "0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "command": "calibrate",
                                                  "sde": "cir"}))
    (run / "fit.json").write_text(json.dumps({
        "names": ["rate"], "estimates": {"rate": 0.1}, "se": {"rate": None}, "loglik": -5.0,
        "aic": 12.0, "bic": None, "converged": False, "n_transitions": 9,
        "verdict": {"lines": ["The fit did NOT converge"]}, "data": {"path": "d.csv"}}))
    result = run_cli(["report", "runs"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rate 0.1 (nan)" in result.stdout and "not converged" in result.stdout
    assert "nan" in CalibrationResult.from_run(run).summary()
