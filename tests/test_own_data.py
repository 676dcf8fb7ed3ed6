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
    first = (run / "calibrate.log").read_text().splitlines()[0]
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
                      "fit.density_bins=1", "hydra.run.dir=run"], tmp_path)
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
