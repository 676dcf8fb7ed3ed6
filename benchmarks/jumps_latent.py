"""Issue 27's models, as a user runs them (`neuralpde simulate` then `neuralpde calibrate`, the
defaults), against their exact references in the same run:

- **Merton** (μ 0.05, σ 0.15, λ 5, m_J −0.03, s_J 0.05, daily, 2,500 observations): the PDE fit's
  distance from the exact MLE (Merton's Poisson mixture of Gaussians) in SEs, and beside it the
  fit that ignores the jumps (Brownian motion with drift, its exact Gaussian MLE): σ absorbs
  the jumps, and log L and AIC say how much they matter.
- **Heston from prices alone** (κ 3, θ 0.04, ξ 0.4, ρ −0.7, daily log S only, 2,000 days): the
  grid filter's log-likelihood at the true θ against a bootstrap particle filter (10⁵ particles
  in the full tier, its Monte Carlo SE from independent runs), and one whole fit's time and
  estimates against the truth in SEs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Column, Row, Spec, attempt, row, tier

SPEC = Spec(
    "jumps_latent",
    "Jump diffusions and a latent variance: the PDE fits against exact and Monte Carlo references",
    (Column("n", "n", "int"), Column("time_s", "wall"), Column("loglik", "log L", "float"),
     Column("reference_loglik", "reference log L", "float"),
     Column("max_distance_se", "max |Δ|/SE", "float"), Column("target", "target (issue 27)", "text")),
    ratio_key="time_s", plot="settings", plot_key="time_s",
)

SETTINGS = {"full": {"merton": 2500, "heston": 2000, "particles": 100_000, "pf_runs": 4},
            "quick": {"merton": 2500, "heston": 500, "particles": 20_000, "pf_runs": 3},
            "smoke": {"merton": 300, "heston": 100, "particles": 2_000, "pf_runs": 2}}
MERTON = {"mu": 0.05, "noise": 0.15, "jump_rate": 5.0, "jump_mean": -0.03, "jump_std": 0.05}
HESTON = {"mu": 0.05, "rate": 3.0, "level": 0.04, "noise": 0.4, "rho": -0.7}
DAY = 1.0 / 252


def _cli(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neuralpde_cli.cli", *args], cwd=cwd, check=True,
                   capture_output=True, timeout=3600, env={"OMP_NUM_THREADS": "1",
                                                           **__import__("os").environ})
    return time.perf_counter() - start


def _merton(work: Path, n: int) -> list[Row]:
    _cli(["simulate", "equation.sde.kind=merton", *[f"equation.sde.{k}={v}" for k, v in MERTON.items()],
          f"simulate.observations={n}", f"simulate.dt={DAY}", "hydra.run.dir=sim"], work)
    wall = _cli(["calibrate", "data=sim/data.csv", "equation.sde.kind=merton", "hydra.run.dir=cal"], work)
    fit = json.loads((work / "cal" / "fit.json").read_text())
    exact = fit["baselines"]["exact"]
    distance = max(abs(v) for v in fit["distance_se"].values())
    data = np.genfromtxt(work / "sim" / "data.csv", delimiter=",", names=True)
    steps, dts = np.diff(data["x"]), np.diff(data["time"])
    # the model without jumps: Brownian motion with drift, its exact MLE in closed form
    mu = steps.sum() / dts.sum()
    var = np.mean((steps - mu * dts) ** 2 / dts)
    gauss = float(np.sum(-0.5 * ((steps - mu * dts) ** 2 / (var * dts) + np.log(2 * np.pi * var * dts))))
    k = len(MERTON)
    return [
        row("neuralpde calibrate (merton)", f"Merton daily, n = {n}", n=n, time_s=wall,
            loglik=fit["loglik"], reference_loglik=exact["loglik"], max_distance_se=distance,
            target=f"every parameter ≤ 0.1 SE of the exact MLE: {'met' if distance <= 0.1 else 'not met'}",
            note="; ".join(f"{p} {fit['estimates'][p]:.4g} (exact {exact['estimates'][p]:.4g} ± "
                           f"{exact['se'][p]:.2g})" for p in MERTON)
            + f"; AIC {fit['aic']:.1f}"),
        row("no jumps (Brownian, exact MLE)", f"Merton daily, n = {n}", n=n, loglik=gauss,
            reference_loglik=exact["loglik"],
            target="—", note=f"σ {math.sqrt(var):.4g} (the jumps' variance absorbed; true 0.15); "
                             f"AIC {4 - 2 * gauss:.1f} against Merton's {2 * k - 2 * fit['loglik']:.1f}"),
    ]


def _heston(work: Path, n: int, particles: int, runs: int) -> list[Row]:
    import torch

    from neuralpde_cli.ansatz.gmm import GMMConfig
    from neuralpde_cli.likelihood.filter import FilteredDensity
    from neuralpde_cli.likelihood.pde import PDELikelihoodConfig, TransitionSet
    from neuralpde_cli.references.particle_filter import heston_log_likelihood
    from neuralpde_cli.sdes import SDEConfig, build_sde_with
    from neuralpde_cli.solvers.time_march import TimeMarchConfig

    _cli(["simulate", "equation.dim=2", "equation.sde.kind=heston",
          *[f"equation.sde.{k}={v}" for k, v in HESTON.items()], "equation.initial_mean=[0.0,0.04]",
          f"simulate.observations={n}", f"simulate.dt={DAY}", "seed=1", "hydra.run.dir=hsim"], work)
    data = np.genfromtxt(work / "hsim" / "data.csv", delimiter=",", names=True)
    y, t = data["x1"], data["time"]
    (work / "prices.csv").write_text("time,logS,V\n" + "".join(
        f"{float(a)!r},{float(b)!r},{float(c)!r}\n" for a, b, c in zip(t, y, data["x2"])))
    torch.set_num_threads(1)
    f64, cpu = torch.float64, torch.device("cpu")
    tset = TransitionSet.from_arrays(y[:-1], y[1:], t[:-1], np.diff(t), f64, cpu)
    density = FilteredDensity(lambda v: build_sde_with(SDEConfig(kind="heston"), 2, v, f64, cpu),
                              tset, np.r_[True, np.zeros(n - 1, bool)], GMMConfig(components=3),
                              TimeMarchConfig(ridge=1e-2), PDELikelihoodConfig(), HESTON)
    values = {k: torch.tensor(v, dtype=f64) for k, v in HESTON.items()}
    density.freeze_steps(values)
    start = time.perf_counter()
    with torch.no_grad():
        grid = float(density.log_density(values, False).sum())
    grid_time = time.perf_counter() - start
    start = time.perf_counter()
    pf = np.array([heston_log_likelihood(np.diff(y), np.diff(t), **HESTON, particles=particles,
                                         seed=s)[0] for s in range(runs)])
    pf_time = (time.perf_counter() - start) / runs
    mc_se = float(pf.std(ddof=1) / math.sqrt(runs))
    gap = grid - float(pf.mean())
    wall = _cli(["calibrate", "data=prices.csv", "data.columns=[logS]", "data.observed=[0]",
                 "data.proxy=V", "equation.dim=2", "equation.sde.kind=heston", "hydra.run.dir=hcal"],
                work)
    fit = json.loads((work / "hcal" / "fit.json").read_text())
    distance = {p: (fit["estimates"][p] - HESTON[p]) / fit["se"][p] if fit["se"][p] else math.nan
                for p in HESTON}  # a null SE (not finite) is written as null
    return [
        row("grid filter (log L at the true θ)", f"Heston, log S only, n = {n}", n=n,
            time_s=grid_time, loglik=grid, reference_loglik=float(pf.mean()),
            target=f"within 0.5 of the particle filter: {'met' if abs(gap) <= 0.5 else 'not met'} "
                   f"({gap:+.2f})",
            note=f"{density.s.shape[0]} nodes; particle filter {particles} particles × {runs} runs, "
                 f"MC SE {mc_se:.2f}, {pf_time:.0f} s a run"),
        row("neuralpde calibrate (heston, V latent)", f"Heston, log S only, n = {n}", n=n,
            time_s=wall, loglik=fit["loglik"], max_distance_se=max(abs(v) for v in distance.values()),
            target=f"one fit ≤ 5 min: {'met' if wall <= 300 else 'not met'}",
            note="; ".join(f"{p} {fit['estimates'][p]:.4g} ± {fit['se'][p] or math.nan:.2g} (true "
                           f"{HESTON[p]:g}, {distance[p]:+.1f} SE)" for p in HESTON)
            + f"; converged: {fit['converged']}"),
    ]


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    work = Path(tempfile.mkdtemp(prefix="neuralpde-bench-jumps-"))
    return (attempt("neuralpde calibrate (merton)", "Merton daily",
                    lambda: _merton(work, s["merton"]))
            + attempt("grid filter (log L at the true θ)", "Heston, log S only",
                      lambda: _heston(work, s["heston"], s["particles"], s["pf_runs"])))
