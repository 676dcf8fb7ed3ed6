"""A real equity series, as a user fits it: the S&P 500's daily closes 1999–2018 (the `arch`
package ships them), log S only, trading days (`data.time=trading`), the defaults otherwise.

- Heston from prices alone (`data.observed=[0]`: V filtered out), with VIX²/10⁴ (arch ships the
  VIX for 2014–2018) drawn beside the filtered variance where the dates overlap;
- Merton on the same log prices (jumps, constant volatility);
- GARCH(1, 1) from `arch` on the same returns (normal innovations, constant mean): the
  discrete-time benchmark a desk would fit first.

Each row: log L of the log prices (GARCH's rescaled from its percent returns), AIC, the wall
time, and for Heston how often the VIX² falls inside the filter's 5–95 % band. Needs the
``bench`` extra (arch); unavailable without it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Column, Row, Spec, Unavailable, attempt, row, tier

SPEC = Spec(
    "equity_real",
    "S&P 500 daily 1999–2018, log S only: Heston (V latent) and Merton against GARCH(1, 1)",
    (Column("n", "n", "int"), Column("time_s", "wall"), Column("loglik", "log L", "float"),
     Column("aic", "AIC", "float"), Column("verdict", "verdict", "text")),
    ratio_key="time_s", plot="settings", plot_key="time_s",
)
SETTINGS = {"full": {"start": "1999-01-01"}, "quick": {"start": "2014-01-01"},
            "smoke": {"start": "2018-06-01"}}


def _write(path: Path, start: str) -> int:
    try:
        from arch.data import sp500, vix
    except ImportError as exc:
        raise Unavailable(f"the arch package is not installed ({exc}); pip install '.[bench]'")
    prices = sp500.load()["Close"]
    prices = prices[prices.index >= start]
    proxy = (vix.load()["vix"] / 100.0) ** 2
    lines = ["date,logS,vix2"]
    for day, close in prices.items():
        v = proxy.get(day)
        lines.append(f"{day:%Y-%m-%d},{math.log(close)!r},{'' if v is None or v != v else repr(float(v))}")
    path.write_text("\n".join(lines) + "\n")
    return len(prices) - 1


def _cli(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neuralpde_cli.cli", *args], cwd=cwd, check=True,
                   capture_output=True, timeout=7200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def _fit_row(method: str, work: Path, name: str, wall: float, n: int, extra: str = "") -> Row:
    fit = json.loads((work / name / "fit.json").read_text())
    verdict = "rejected at 1 %" if fit["verdict"].get("rejected_at") else "not rejected"
    return row(method, f"S&P 500 daily, n = {n}", n=n, time_s=wall, loglik=fit["loglik"],
               aic=fit["aic"], verdict=verdict,
               note="; ".join(f"{p} {v:.4g} ± {fit['se'][p]:.2g}" for p, v in fit["estimates"].items())
               + extra)


def _heston(work: Path, n: int) -> Row:
    wall = _cli(["calibrate", "data=sp500.csv", "data.time=trading", "data.columns=[logS]",
                 "data.observed=[0]", "data.proxy=vix2", "equation.dim=2",
                 "equation.sde.kind=heston", "hydra.run.dir=heston"], work)
    with np.load(work / "heston" / "filtered.npz") as f:
        proxy, lo, hi = f["filtered_proxy"], f["filtered_variance_q05"], f["filtered_variance_q95"]
        ok = np.isfinite(proxy)
        inside = float(np.mean((proxy[ok] >= lo[ok]) & (proxy[ok] <= hi[ok]))) if ok.any() else math.nan
    return _fit_row("neuralpde calibrate (heston, V latent)", work, "heston", wall, n,
                    f"; VIX² inside the filtered 5–95 % band on {inside:.0%} of {int(ok.sum())} days")


def _merton(work: Path, n: int) -> Row:
    wall = _cli(["calibrate", "data=sp500.csv", "data.time=trading", "data.columns=[logS]",
                 "equation.sde.kind=merton", "hydra.run.dir=merton"], work)
    return _fit_row("neuralpde calibrate (merton)", work, "merton", wall, n)


def _garch(work: Path, n: int) -> Row:
    from arch import arch_model

    data = np.genfromtxt(work / "sp500.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    returns = 100.0 * np.diff(data["logS"])
    start = time.perf_counter()
    res = arch_model(returns, mean="Constant", vol="GARCH", p=1, q=1, dist="normal").fit(disp="off")
    wall = time.perf_counter() - start
    loglik = float(res.loglikelihood) + returns.size * math.log(100.0)  # of log S, not of %
    return row("GARCH(1, 1), arch", f"S&P 500 daily, n = {n}", n=n, time_s=wall, loglik=loglik,
               aic=2 * 4 - 2 * loglik, verdict="—",
               note="; ".join(f"{k} {v:.4g}" for k, v in res.params.items()) + " (percent returns)")


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    work = Path(tempfile.mkdtemp(prefix="neuralpde-bench-equity-"))
    setting = "S&P 500 daily"
    try:
        n = _write(work / "sp500.csv", s["start"])
    except Unavailable as exc:
        return [row("neuralpde calibrate", setting, status="unavailable", note=str(exc))]
    rows: list[Row] = []
    rows += attempt("neuralpde calibrate (heston, V latent)", setting, lambda: _heston(work, n))
    rows += attempt("neuralpde calibrate (merton)", setting, lambda: _merton(work, n))
    rows += attempt("GARCH(1, 1), arch", setting, lambda: _garch(work, n))
    return rows
