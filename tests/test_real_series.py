"""`neuralpde calibrate` with its defaults on a real series: the US 3-month Treasury bill rate
(percent, quarterly 1959–2009; statsmodels' ``macrodata``, public-domain US data), against the
exact non-central χ² MLE of CIR on the same data.

What makes it hard, and what each assertion guards: from the config's values Kessler's
estimate collapsed (a rate of 1e-16 with no SE), the series comes within 0.12 % of zero where
a start grid in x reached below 0, and Feller's condition fails at the MLE, so the law from
the lowest starts is far from Gaussian."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

TBILL = Path(__file__).resolve().parent / "data" / "us_tbill_quarterly.csv"


def test_cir_on_the_tbill_rate_with_the_defaults(tmp_path: Path):
    result = run_cli(["calibrate", f"data={TBILL}", "equation.sde.kind=cir", "fit.profile_points=3",
                      "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr
    fit = json.loads((tmp_path / "run" / "fit.json").read_text())
    # the baselines start from the data's AR(1) moments; from the config's κ = 1, level = 1
    # Kessler's rate collapsed to 7e-16 (no SE) and the PDE fit had no sound start
    assert fit["start"]["baselines_from"] == "moments"
    assert fit["baselines"]["kessler"]["estimates"]["rate"] > 1e-3
    assert fit["start"]["from"] == "kessler"
    assert fit["converged"]
    march = fit["time_march"]
    assert march["march_coordinates"] == {"0": 0.5} and march["components"] == 1
    exact = fit["baselines"]["exact"]
    for name in ("rate", "level", "noise"):  # measured: 0.14, 0.05, 0.02
        assert abs(fit["estimates"][name] - exact["estimates"][name]) < 0.2 * exact["se"][name]
    error = fit["density_error"]
    assert abs(error["loglik_error_per_1000"]) < 0.5  # measured 0.39: Feller fails near zero
    bands = {b["band"]: b for b in error["bands"]}
    assert sum(b["n"] for b in bands.values()) == fit["n_transitions"] == 202
    assert bands["3–5"]["n"] >= 2 and bands["3–5"]["max_abs"] < 0.1  # the tail moves, right
