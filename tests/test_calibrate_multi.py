"""Calibration in several dimensions and with calendar time, against exact transition laws."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralpde_cli.ansatz.gmm import GMMConfig
from neuralpde_cli.likelihood.pde import (STALE_ERROR, PDELikelihoodConfig, TransitionDensity,
                                          TransitionSet)
from neuralpde_cli.sdes import SDEConfig, build_sde_with
from neuralpde_cli.solvers.time_march import TimeMarchConfig
from tests.conftest import run_cli

F64, CPU = torch.float64, torch.device("cpu")


def test_time_dependent_mean_is_marched_from_each_transition_own_time(tmp_path, monkeypatch):
    """dX = θ(b + c·sin ωt − X)dt + σdW: Gaussian, with the mean's forcing integrated from each
    transition's own start time t₀ (a start at t = 0 for all would be off by c·O(1))."""
    th, b, c, w, s = 1.5, 1.0, 2.0, 1.3, 0.4
    (tmp_path / "forced.py").write_text(
        "import torch\n"
        f"def drift(t, x, th, b, c):\n    return th * (b + c * torch.sin({w} * t)[:, None] - x)\n")
    monkeypatch.chdir(tmp_path)
    cfg = SDEConfig(kind="custom", drift="./forced.py:drift", sigma=[[s]],
                    params={"th": th, "b": b, "c": c})
    rng = np.random.default_rng(0)
    n = 60
    t0 = rng.uniform(0.0, 10.0, n)
    dt = rng.choice([0.3, 0.6], n)
    x0 = rng.normal(1.0, 1.0, n)

    def forcing(t):  # ∫ θe^{−θ(t₁−u)} c sin(ωu) du, antiderivative at u = t (times e^{θt₁})
        return c * th * math.e ** 0 * (th * np.sin(w * t) - w * np.cos(w * t)) / (th ** 2 + w ** 2)

    t1 = t0 + dt
    decay = np.exp(-th * dt)
    mean = x0 * decay + b * (1 - decay) + forcing(t1) - forcing(t0) * decay
    var = s ** 2 * (1 - decay ** 2) / (2 * th)
    x1 = mean + math.sqrt(1.0) * np.sqrt(var) * rng.standard_normal(n)
    exact = -0.5 * ((x1 - mean) ** 2 / var + np.log(2 * np.pi * var))
    ts = TransitionSet.from_arrays(x0, x1, t0, dt, F64, CPU)
    td = TransitionDensity(lambda v: build_sde_with(cfg, 1, v, F64, CPU), ts,
                           GMMConfig(components=1), TimeMarchConfig(rtol=1e-6),
                           PDELikelihoodConfig())
    assert td.time_dependent and not td.use_grid
    values = {k: torch.tensor(v, dtype=F64) for k, v in cfg.params.items()}
    td.freeze_steps(values)
    with torch.no_grad():
        lp = td.log_density(values, False).numpy()
    assert np.abs(lp - exact).max() < 1e-3


def write_ou2(path: Path, n: int, dt: float, seed: int) -> None:
    """A 2-D OU path (non-symmetric θ, correlated σ) from the exact Gaussian transition."""
    import scipy.linalg
    theta = np.array([[1.0, 0.6], [-0.4, 0.8]])
    mean = np.array([1.0, -0.5])
    sigma = np.array([[0.8, 0.0], [0.4, 0.6]])
    phi = scipy.linalg.expm(-theta * dt)
    q = sigma @ sigma.T
    block = scipy.linalg.expm(np.block([[theta, q], [np.zeros((2, 2)), -theta.T]]) * dt)
    cov = block[:2, 2:] @ phi.T
    cov = 0.5 * (cov + cov.T)
    chol = np.linalg.cholesky(cov)
    rng = np.random.default_rng(seed)
    x = [mean.copy()]
    for _ in range(n):
        x.append(mean + phi @ (x[-1] - mean) + chol @ rng.standard_normal(2))
    rows = [f"{i * dt:.6g},{a:.17g},{b:.17g}" for i, (a, b) in enumerate(x)]
    path.write_text("time,x1,x2\n" + "\n".join(rows) + "\n")


def test_two_dimensional_ou_density_on_the_start_grid_matches_the_exact_law(tmp_path: Path):
    """The 8 × 8 start grid and its tensor spline reproduce the exact 2-D OU transition (the
    mixture state is affine in x₀ there, so only the march's own error remains)."""
    from neuralpde_cli.data import read_observations
    from neuralpde_cli.references.transitions import ou_log_density
    write_ou2(tmp_path / "ou2.csv", 300, 0.5, seed=1)
    tr = read_observations(tmp_path / "ou2.csv", dim=2).transitions()
    cfg = SDEConfig(kind="ou")  # the same θ, m, σ as write_ou2
    ts = TransitionSet.from_arrays(tr.x0, tr.x1, tr.t0, tr.dt, F64, CPU)
    td = TransitionDensity(lambda v: build_sde_with(cfg, 2, v, F64, CPU), ts,
                           GMMConfig(components=1), TimeMarchConfig(rtol=1e-5),
                           PDELikelihoodConfig())
    assert td.use_grid and td.members == 64
    td.freeze_steps({})
    with torch.no_grad():
        lp = td.log_density({}, False).numpy()
    exact = ou_log_density(tr.x0, tr.x1, tr.dt, np.array([[1.0, 0.6], [-0.4, 0.8]]),
                           np.array([1.0, -0.5]), np.array([[0.8, 0.0], [0.4, 0.6]]))
    assert np.abs(lp - exact).max() < 1e-3


@pytest.mark.slow  # 30 s: nine parameters, their Hessian and sandwich through the CLI
def test_two_dimensional_ou_lands_on_the_exact_mle(tmp_path: Path):
    write_ou2(tmp_path / "ou2.csv", 400, 0.5, seed=4)
    result = run_cli(["calibrate", "data=ou2.csv", "equation.dim=2", "equation.sde.kind=ou",
                      "equation.sde.theta=[[1.0,0.0],[0.0,1.0]]", "equation.sde.mean=[0.0,0.0]",
                      "equation.sde.sigma=[[1.0,0.0],[0.0,1.0]]",
                      "fit.profile_points=0", "fit.density_bins=1", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr
    fit = json.loads((tmp_path / "run" / "fit.json").read_text())
    assert len(fit["names"]) == 9
    exact = fit["baselines"]["exact"]
    for name in fit["names"]:
        assert abs(fit["estimates"][name] - exact["estimates"][name]) < 0.05 * exact["se"][name], name
        assert abs(fit["se"][name] / exact["se"][name] - 1) < 0.05, name
    assert fit["stationary"] and set(fit["se_sandwich"]) == set(fit["names"])


@pytest.mark.parametrize("args,needle", [
    (["equation.sde.rho=1.0"], "rho"),
    (["data=neg.csv"], "x2"),
])
def test_heston_bad_input_is_one_line(tmp_path: Path, args, needle):
    rows = ["time,x1,x2"] + [f"{i * 0.01},{0.01 * i},{0.2 + 0.01 * math.sin(i)}" for i in range(30)]
    (tmp_path / "h.csv").write_text("\n".join(rows) + "\n")
    rows[10] = "0.09,0.09,-0.01"
    (tmp_path / "neg.csv").write_text("\n".join(rows) + "\n")
    result = run_cli(["calibrate", "data=h.csv", "equation.dim=2", "equation.sde.kind=heston",
                      *args, "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_solve_heston_from_zero_variance_is_one_line(tmp_path: Path):
    """`solve` with Heston's default start V = 0 (outside the state space, where the reference's
    matrix was singular and scipy's LU raised a traceback): one line naming the coordinate."""
    result = run_cli(["solve", "equation=fokker_planck", "equation.sde.kind=heston",
                      "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "coordinate 1 must lie above 0" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def _heston_weekly(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(log S, V) at weekly steps from the S&P-like setting, V from its exact (non-central χ²)
    law; log S does not matter to the V-marginal checked below, so it is a plain random walk."""
    k, th, xi, dt = 3.8, 0.044, 0.43, 0.0192
    c = xi * xi * (1 - math.exp(-k * dt)) / (4 * k)
    rng = np.random.default_rng(seed)
    v = np.empty(n + 1)
    v[0] = th
    for i in range(n):
        v[i + 1] = c * rng.noncentral_chisquare(4 * k * th / xi ** 2, v[i] * math.exp(-k * dt) / c)
    s = np.cumsum(np.r_[0.0, 0.02 * rng.standard_normal(n)])
    return np.stack([s, v], 1), np.full(n, dt)


def _calibrate_defaults() -> tuple[GMMConfig, TimeMarchConfig]:
    """The mixture and march `neuralpde calibrate` uses (configs/calibrate.yaml)."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "calibrate.yaml")
    return (GMMConfig(**OmegaConf.to_container(cfg.ansatz)),
            TimeMarchConfig(**OmegaConf.to_container(cfg.optimizer)))


HESTON_WEEKLY = dict(mu=0.05, rate=3.8, level=0.044, noise=0.43, rho=-0.67)


def _heston_density(x: np.ndarray, dt: np.ndarray, truth: dict[str, float] = HESTON_WEEKLY,
                    per_start: bool = False) -> TransitionDensity:
    cfg = SDEConfig(kind="heston", **truth)
    ts = TransitionSet.from_arrays(x[:-1], x[1:], np.cumsum(np.r_[0.0, dt[:-1]]), dt, F64, CPU)
    return TransitionDensity(lambda v: build_sde_with(cfg, 2, v, F64, CPU), ts,
                             *_calibrate_defaults(), PDELikelihoodConfig(per_start=per_start))


def test_heston_log_variance_coordinates_are_ito_of_heston():
    """The march runs in (log S, log V): its drift and D are Itô's lemma applied to Heston's,
    its closed-form divergences match autograd."""
    heston = build_sde_with(SDEConfig(kind="heston", **HESTON_WEEKLY), 2, {}, F64, CPU)
    logv = heston.in_march_coordinates()
    y = torch.tensor([[0.1, -6.0], [0.0, -1.5], [1.0, -3.1]], dtype=F64)
    v = torch.exp(y[:, 1])
    s = heston.diffusion_sqrt(None, torch.stack([y[:, 0], v], -1))
    d = s @ s.transpose(-1, -2)
    mu = heston.drift(None, torch.stack([y[:, 0], v], -1))
    ito = torch.stack([mu[:, 0], mu[:, 1] / v - d[:, 1, 1] / v ** 2], -1)
    torch.testing.assert_close(logv.drift(None, y), ito)
    jac = torch.diag_embed(torch.stack([torch.ones_like(v), 1.0 / v], -1))
    s_log = logv.diffusion_sqrt(None, y)
    torch.testing.assert_close(s_log @ s_log.transpose(-1, -2), jac @ d @ jac)
    yr = y.clone().requires_grad_(True)
    grad = lambda f: torch.autograd.grad(f.sum(), yr, create_graph=True)[0]  # noqa: E731
    m = logv.drift(None, yr)
    torch.testing.assert_close(logv.drift_divergence(None, y),
                               sum(grad(m[:, i])[:, i] for i in range(2)).detach())
    s_r = logv.diffusion_sqrt(None, yr)
    dm = s_r @ s_r.transpose(-1, -2)
    div = torch.stack([sum(grad(dm[:, i, j])[:, j] for j in range(2)) for i in range(2)], -1)
    first, second = logv.diffusion_divergences(None, y)
    torch.testing.assert_close(first, div.detach())
    torch.testing.assert_close(second, sum(grad(div[:, i])[:, i] for i in range(2)).detach())


def test_heston_is_marched_in_log_v_on_a_uniform_grid():
    """Weekly Heston visits V below θ/100. The start grid is uniform in log V (a node one step
    below the smallest start is still a variance), and the density read in log V carries the
    Jacobian 1/V₁ back to the data's coordinates."""
    x, dt = _heston_weekly(400, seed=2)
    assert x[:, 1].min() < 0.1 * 0.044  # the data do come close to 0
    td = _heston_density(x, dt)
    assert td.use_grid and td.members == 16 and td.powers == {1: 0.0}
    y = td.starts[:, 1].numpy()
    assert y.min() < np.log(x[:, 1]).min() and y.max() > np.log(x[:, 1]).max()
    np.testing.assert_allclose(np.diff(y), np.diff(y)[0], rtol=1e-10)
    np.testing.assert_allclose(td.jacobian.numpy(), -np.log(x[1:, 1]))


def test_heston_weekly_replayed_steps_suit_nearby_theta():
    """A fit replays the steps frozen at one θ at the next, and chooses them again when a step's
    own error estimate exceeds STALE_ERROR tolerances. Marched in V, the starts near 0 had
    replay errors that jumped up to 100-fold for a 0.5 % change of θ, so the fit kept
    choosing steps again and stalled; in log V they stay near one tolerance (0.57–1.09
    measured over ±2 % in each parameter), the step count barely moves between θ 7 % apart
    in κ (61 and 64 measured), and the gradient is finite."""
    x, dt = _heston_weekly(400, seed=2)
    td = _heston_density(x, dt)
    counts = []
    for rate in (3.1, 3.3):
        values = {k: torch.tensor(v, dtype=F64) for k, v in
                  dict(HESTON_WEEKLY, rate=rate, level=0.047).items()}
        counts.append(td.freeze_steps(values))
    assert max(counts) < 1.2 * min(counts), counts
    td.freeze_steps({k: torch.tensor(v, dtype=F64) for k, v in HESTON_WEEKLY.items()})
    worst = {}
    for name in ("rate", "level", "noise", "rho"):
        for factor in (0.995, 1.005):
            values = {k: torch.tensor(v * (factor if k == name else 1.0), dtype=F64)
                      for k, v in HESTON_WEEKLY.items()}
            with torch.no_grad():
                history = td._run(values, False).history
            worst[(name, factor)] = max(h["step_error"] for h in history)
    assert max(worst.values()) < 0.3 * STALE_ERROR, worst
    values = {k: torch.tensor(v, dtype=F64, requires_grad=True) for k, v in HESTON_WEEKLY.items()}
    grads = torch.autograd.grad(td.log_density(values).sum(), list(values.values()))
    assert all(bool(torch.isfinite(g)) for g in grads)


def test_heston_predictive_variance_density_matches_the_exact_cir_law():
    """The density of V₁ a fit plots is read in log V and divided by V₁: against CIR's exact
    non-central χ² law from three starts, on the whole grid where it is plotted (measured: L1
    distance 9.4e-3, mass 1 to 1e-5)."""
    from neuralpde_cli.references.transitions import cir_log_density
    x, dt = _heston_weekly(3, seed=5)
    td = _heston_density(x, dt)
    values = {k: torch.tensor(v, dtype=F64) for k, v in HESTON_WEEKLY.items()}
    starts = np.array([[0.0, 0.01], [0.0, 0.044], [0.0, 0.1]])
    grid = np.linspace(1e-4, 0.25, 400)
    fit = td.predictive_density(values, starts, 0.0192, grid, axis=1)
    exact = np.mean([np.exp(cir_log_density(np.full_like(grid, v0), grid, np.full_like(grid, 0.0192),
                                            3.8, 0.044, 0.43)) for v0 in starts[:, 1]], axis=0)
    h = grid[1] - grid[0]
    assert abs(fit.sum() * h - 1) < 1e-2, fit.sum() * h
    assert np.abs(fit - exact).sum() * h < 2e-2, np.abs(fit - exact).sum() * h


@pytest.mark.slow  # about 20 s: 200 starts marched each
def test_heston_weekly_variance_marginal_matches_the_exact_cir_law():
    """The V-marginal of Heston's transition is CIR's non-central χ² law: each transition's own
    march against it (starts down to θ/7), and the start grid's joint log-density against each
    transition's own march. Measured in log V: 3.7e-3 per point on average (in V it was 1.2e-2;
    a Gaussian with the exact mean and variance is off by 8.8e-2); the grid 1.4e-4 from the
    march per start (2.1e-3 in V)."""
    from neuralpde_cli.references.transitions import cir_log_density
    x, dt = _heston_weekly(200, seed=3)
    values = {k: torch.tensor(v, dtype=F64) for k, v in HESTON_WEEKLY.items()}
    own = _heston_density(x, dt, per_start=True)
    own.freeze_steps(values)
    with torch.no_grad():
        logits, means, entries = own.layout.unpack(own.states(values, False))
        sd = torch.sqrt((own.layout.chol(entries)[..., 1, :] ** 2).sum(-1))
        v1 = torch.as_tensor(x[1:, 1:2], dtype=F64)  # marched in log V: p(V₁) = p(log V₁)/V₁
        comp = torch.distributions.Normal(means[..., 1], sd).log_prob(torch.log(v1))
        lp = (torch.logsumexp(torch.log_softmax(logits, -1) + comp, -1) - torch.log(v1[:, 0])).numpy()
        joint_own = own.log_density(values, False).numpy()
    exact = cir_log_density(x[:-1, 1], x[1:, 1], dt, 3.8, 0.044, 0.43)
    err = np.abs(lp - exact)
    assert err.mean() < 1e-2, (err.mean(), err.max())
    grid = _heston_density(x, dt)
    grid.step_times = own.step_times
    with torch.no_grad():
        gap = np.abs(grid.log_density(values, False).numpy() - joint_own)
    assert gap.mean() < 1e-3, (gap.mean(), gap.max())


HESTON_DAILY = dict(mu=0.05, rate=3.0, level=0.2, noise=0.25, rho=-0.8)


def test_heston_log_likelihood_is_smooth_in_theta(tmp_path: Path):
    """Standard errors come from the curvature of log L, so log L must be a smooth function of
    θ. Along μ it is exactly quadratic for the true law (μ only shifts log S), with curvature
    Σ Δ/((1 − ρ²)V₀) to O(Δ) (Euler's, exact in μ). The data: the daily benchmark's second set
    (issue 15), at the point its fit reached, with the steps frozen at its Euler start. There,
    at the march's own ridge 1e-3, one start's three components took visibly different paths
    for μ 0.001 apart: log L wobbled by 1e-3 and its curvature came out 6,345 or −338 by the
    step (an SE of μ of 0.013, or none, where it is 0.19); and a spline through neighbouring
    starts' mixture parameters read a law 0.02 off between them."""
    truth = [f"equation.sde.{k}={v!r}" for k, v in HESTON_DAILY.items()]
    done = run_cli(["simulate", "equation.dim=2", "equation.sde.kind=heston",
                    "equation.initial_mean=[0.0,0.2]", "simulate.observations=500",
                    "simulate.dt=0.003968", *truth, "seed=101", "hydra.run.dir=sim"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    from neuralpde_cli.data import read_observations
    tr = read_observations(str(tmp_path / "sim" / "data.csv"), dim=2).transitions()
    x, dt = np.r_[tr.x0[:1], tr.x1], np.asarray(tr.dt)
    assert np.allclose(x[1:-1], tr.x0[1:])  # one path
    names = list(HESTON_DAILY)
    start = dict(zip(names, (-0.2078, 4.6086, 0.2203, 0.2576, -0.8225)))  # the Euler estimate
    reached = dict(zip(names, (-0.2016, 4.3239, 0.2216, 0.2600, -0.8225)))
    td = _heston_density(x, dt, start)
    td.freeze_steps({k: torch.tensor(v, dtype=F64) for k, v in start.items()})
    shifts = np.linspace(-4e-3, 4e-3, 9)
    loglik = []
    for s in shifts:
        values = {k: torch.tensor(v + (s if k == "mu" else 0.0), dtype=F64)
                  for k, v in reached.items()}
        with torch.no_grad():
            loglik.append(float(td.log_density(values, False).sum()))
    quadratic = np.polyfit(shifts, loglik, 2)
    wobble = np.abs(np.asarray(loglik) - np.polyval(quadratic, shifts)).max()
    euler = float(np.sum(dt / ((1 - reached["rho"] ** 2) * x[:-1, 1])))
    assert wobble < 1e-6, wobble
    assert abs(-2 * quadratic[0] / euler - 1) < 0.03, (-2 * quadratic[0], euler)
