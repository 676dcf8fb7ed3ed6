"""Heston from prices alone: the root-variance coordinates, the grid filter against an
independent particle filter, and the CLI with data.observed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from neuralpde_cli.equations.base import DensityEquation
from neuralpde_cli.sdes import SDEConfig, build_sde, build_sde_with
from tests.conftest import run_cli

F64 = torch.float64
CPU = torch.device("cpu")
HESTON = dict(mu=0.05, rate=3.0, level=0.04, noise=0.4, rho=-0.7)


def _heston_path(n: int, seed: int, dt: float = 1 / 252) -> tuple[np.ndarray, np.ndarray]:
    """log S and V of one path from the project's own sampler (exact V, Broadie–Kaya log S)."""
    sde = build_sde(SDEConfig(kind="heston", **HESTON), 2, F64, CPU)
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([[0.0, HESTON["level"]]], dtype=F64)
    out = [x]
    for _ in range(n):
        x = sde.sample_transition(x, torch.zeros(1, dtype=F64), torch.full((1,), dt, dtype=F64), gen)
        out.append(x)
    path = torch.cat(out).numpy()
    return path[:, 0], path[:, 1]


def test_root_variance_coordinates_have_the_closed_form_divergences_autograd_finds():
    heston = build_sde(SDEConfig(kind="heston", **HESTON), 2, F64, CPU)
    heston.variance_power = 0.5
    marched = heston.in_march_coordinates(1e-4)
    x = torch.tensor([[0.1, 2 * math.sqrt(0.04) - 2], [-0.3, 2 * math.sqrt(0.2) - 2],
                      [0.0, 2 * math.sqrt(0.003) - 2]], dtype=F64)
    below = torch.tensor([[0.0, 2 * math.sqrt(1e-5) - 2], [0.2, -2.5]], dtype=F64)  # √V < √floor

    class Probe(DensityEquation):  # the base class's autograd fallbacks on these coefficients
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.dim, self.constant_diffusion = 2, False

        def drift(self, t, y):
            return marched.drift(t, y)

        def diffusion_sqrt(self, t, y):
            return marched.diffusion_sqrt(t, y)

    probe = Probe()
    for points in (x, below):  # below the floor too: the coefficients continue C¹ there
        torch.testing.assert_close(marched.drift_divergence(None, points),
                                   DensityEquation.drift_divergence(probe, None, points).detach())
        div, divdiv = marched.diffusion_divergences(None, points)
        auto_div, auto_divdiv = DensityEquation.diffusion_divergences(probe, None, points)
        torch.testing.assert_close(div, auto_div.detach())
        torch.testing.assert_close(divdiv, auto_divdiv.detach())
    # continuous across the floor (√V = 0.01): a quadrature point that crosses it moves the
    # march by as little as it moves
    edge = 2 * 0.01 - 2
    pair = torch.tensor([[0.0, edge - 1e-9], [0.0, edge + 1e-9]], dtype=F64)
    for field in (marched.drift(None, pair), marched.drift_divergence(None, pair),
                  marched.diffusion_divergences(None, pair)[0]):
        assert float((field[0] - field[1]).abs().max()) < 1e-6 * max(1.0, float(field.abs().max()))
    # Itô: 2√V − 2 has constant noise ξ and the drift (κθ − ξ²/4)/√V − κ√V
    s = 1 + x[:, 1] / 2
    d = HESTON
    want = (d["rate"] * d["level"] - d["noise"] ** 2 / 4) / s - d["rate"] * s
    torch.testing.assert_close(marched.drift(None, x)[:, 1], want)
    q = marched.diffusion_sqrt(None, x)
    torch.testing.assert_close(2 * (q @ q.transpose(-1, -2))[:, 1, 1],
                               torch.full((3,), d["noise"] ** 2, dtype=F64))


def test_the_grid_filter_agrees_with_a_particle_filter():
    """log p(y₁…yₙ) of 150 daily log prices, V latent, at the true θ: the grid filter (marched
    kernel) against the bootstrap particle filter (exact CIR variance, Broadie–Kaya prices),
    within 0.5 (the issue's bar) and a few Monte Carlo SEs."""
    from neuralpde_cli.ansatz.gmm import GMMConfig
    from neuralpde_cli.likelihood.filter import FilteredDensity
    from neuralpde_cli.likelihood.pde import PDELikelihoodConfig, TransitionSet
    from neuralpde_cli.references.particle_filter import heston_log_likelihood
    from neuralpde_cli.solvers.time_march import TimeMarchConfig

    n, dt = 150, 1 / 252
    y, _ = _heston_path(n, seed=4)
    tset = TransitionSet.from_arrays(y[:-1], y[1:], np.arange(n) * dt, np.full(n, dt), F64, CPU)
    cfg = SDEConfig(kind="heston")
    density = FilteredDensity(lambda v: build_sde_with(cfg, 2, v, F64, CPU), tset,
                              np.r_[True, np.zeros(n - 1, bool)], GMMConfig(components=3),
                              TimeMarchConfig(ridge=1e-2), PDELikelihoodConfig(), HESTON)
    values = {k: torch.tensor(v, dtype=F64) for k, v in HESTON.items()}
    density.freeze_steps(values)
    with torch.no_grad():
        grid = float(density.log_density(values, False).sum())
    runs = np.array([heston_log_likelihood(np.diff(y), np.full(n, dt), **HESTON,
                                           particles=20000, seed=s)[0] for s in range(3)])
    mc_se = runs.std(ddof=1) / math.sqrt(runs.size)
    assert abs(grid - runs.mean()) < max(0.5, 4 * mc_se), (grid, runs)
    # the filter's law of V is a law: its quantiles are ordered and inside the nodes
    summary = density.filtered_summary()
    assert np.all(summary["variance_q05"] <= summary["variance_q50"])
    assert np.all(summary["variance_q50"] <= summary["variance_q95"])
    # a wrong θ scores lower: the filter has power
    wrong = {**values, "level": torch.tensor(0.12, dtype=F64)}
    density.freeze_steps(wrong)
    with torch.no_grad():
        assert float(density.log_density(wrong, False).sum()) < grid - 5


def test_calibrate_heston_from_prices_alone(tmp_path):
    """The CLI with data.observed=[0]: log S only, V filtered; the proxy column drawn beside."""
    n, dt = 400, 1 / 252
    y, v = _heston_path(n, seed=7)
    lines = ["time,logS,V"] + [f"{k * dt:.10g},{a:.17g},{b:.17g}" for k, (a, b) in enumerate(zip(y, v))]
    (tmp_path / "prices.csv").write_text("\n".join(lines) + "\n")
    cal = run_cli(["calibrate", "data=prices.csv", "data.columns=[logS]", "data.observed=[0]",
                   "data.proxy=V", "equation.dim=2", "equation.sde.kind=heston",
                   "fit.profile_points=0", "hydra.run.dir=cal"], tmp_path, timeout=600)
    assert cal.returncode == 0, cal.stderr[-3000:]
    run = tmp_path / "cal"
    fit = json.loads((run / "fit.json").read_text())
    assert np.all(np.isfinite(list(fit["se"].values())))
    with np.load(run / "filtered.npz") as f:
        assert f["filtered_variance_mean"].shape == (n,)
        proxy = f["filtered_proxy"]
        inside = np.mean((proxy >= f["filtered_variance_q05"]) & (proxy <= f["filtered_variance_q95"]))
    assert np.allclose(proxy, v[1:])
    assert inside > 0.6  # the true V mostly inside the filter's 90 % band at the estimate
    assert (run / "plots" / "filtered.png").exists()
    assert "baselines skipped" in (run / "calibrate.log").read_text()


def test_data_observed_is_checked(tmp_path):
    (tmp_path / "p.csv").write_text("time,logS\n0,0\n0.004,0.01\n0.008,0.0\n")
    out = run_cli(["calibrate", "data=p.csv", "data.observed=[0,1]", "equation.dim=2",
                   "equation.sde.kind=heston"], tmp_path)
    assert out.returncode != 0 and "data.observed=[0, 1]" in out.stderr
    assert "Traceback" not in out.stderr
