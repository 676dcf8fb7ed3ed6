"""Jump diffusions (Merton, Bates): the exact law, the sampler, the mixture's closed-form
convolution, the march's transition density against Merton's exact law, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from neuralpde_cli.ansatz.gmm import MixtureLayout, convolve_jumps
from neuralpde_cli.errors import UserError
from neuralpde_cli.references.transitions import merton_cdf, merton_log_density
from neuralpde_cli.sdes import SDEConfig, build_sde, build_sde_with
from tests.conftest import run_cli

F64 = torch.float64
CPU = torch.device("cpu")
MERTON = dict(mu=0.05, noise=0.15, jump_rate=5.0, jump_mean=-0.03, jump_std=0.05)


def _merton(**over) -> SDEConfig:
    return SDEConfig(kind="merton", **{**MERTON, **over})


def test_merton_exact_law_is_a_density_with_the_closed_form_moments():
    dt = 0.25
    x = np.linspace(-3.0, 3.0, 200001)
    p = np.exp(merton_log_density(0.0, x, dt, *MERTON.values()))
    h = x[1] - x[0]
    lam = MERTON["jump_rate"] * dt
    mean = MERTON["mu"] * dt + lam * MERTON["jump_mean"]
    var = MERTON["noise"] ** 2 * dt + lam * (MERTON["jump_mean"] ** 2 + MERTON["jump_std"] ** 2)
    assert abs(p.sum() * h - 1.0) < 1e-9
    assert abs((x * p).sum() * h - mean) < 1e-9
    assert abs(((x - mean) ** 2 * p).sum() * h - var) < 1e-9
    # the CDF is the density's integral, and its upper tail is 1 − F without cancellation
    assert abs(merton_cdf(0.0, 0.1, dt, *MERTON.values()) - p[x <= 0.1].sum() * h) < 1e-4
    assert abs(merton_cdf(0.0, 0.1, dt, *MERTON.values(), upper=True)
               + merton_cdf(0.0, 0.1, dt, *MERTON.values()) - 1.0) < 1e-12


def test_merton_sampler_draws_the_exact_law():
    sde = build_sde(_merton(), 1, F64, CPU)
    n, dt = 20000, 0.1
    gen = torch.Generator().manual_seed(3)
    x = sde.sample_transition(torch.zeros(n, 1, dtype=F64), torch.zeros(n, dtype=F64),
                              torch.full((n,), dt, dtype=F64), gen)[:, 0].numpy()
    ks = scipy.stats.kstest(x, lambda v: merton_cdf(0.0, v, dt, *MERTON.values()))
    assert ks.pvalue > 0.01
    # a jump-free sampler of the same variance is rejected: the test has power
    var = MERTON["noise"] ** 2 * dt + 5 * dt * (0.03 ** 2 + 0.05 ** 2)
    gauss = np.random.default_rng(0).normal(MERTON["mu"] * dt - 0.015, math.sqrt(var), n)
    assert scipy.stats.kstest(gauss, lambda v: merton_cdf(0.0, v, dt, *MERTON.values())).pvalue < 0.01


def test_convolving_a_mixture_with_jumps_matches_numerical_convolution():
    layout = MixtureLayout(2, 2)
    means = torch.tensor([[[0.1, -0.2], [0.4, 0.3]]], dtype=F64)
    chol = torch.tensor([[[[0.3, 0.0], [0.1, 0.2]], [[0.2, 0.0], [-0.05, 0.25]]]], dtype=F64)
    state = layout.pack(torch.tensor([[0.3, -0.3]], dtype=F64), means, layout.entries(chol))
    rate_dt, jm, js = 1.3, torch.tensor([-0.5, 0.0], dtype=F64), 0.35
    jc = torch.diag(torch.tensor([js ** 2, 0.0], dtype=F64))
    n_terms = 25
    n = torch.arange(n_terms + 1, dtype=F64)
    log_w = (n * math.log(rate_dt) - rate_dt - torch.lgamma(n + 1)).unsqueeze(0)
    big = MixtureLayout(2, 2 * (n_terms + 1))
    conv = convolve_jumps(layout, state, log_w, jm, jc)
    pts = torch.tensor([[[0.0, 0.0], [-1.2, 0.3], [0.5, -0.4], [-3.0, 0.1]]], dtype=F64)
    got = big.evaluate(conv, pts).log_p[0]
    # brute force: Σₙ P(n) ∫ p(x − j) N(j; n m, n s²) dj on a fine grid in the jump coordinate
    j = torch.linspace(-12.0, 4.0, 40001, dtype=F64)
    h = float(j[1] - j[0])
    want = []
    for x in pts[0]:
        shifted = torch.stack([x[0] - j, x[1].expand_as(j)], -1).unsqueeze(0)
        p = torch.exp(layout.evaluate(state, shifted).log_p[0])
        total = torch.exp(log_w[0, 0]) * torch.exp(layout.evaluate(state, x.view(1, 1, 2)).log_p[0, 0])
        for k in range(1, n_terms + 1):
            dens = torch.exp(-0.5 * (j - k * jm[0]) ** 2 / (k * js ** 2)) / math.sqrt(2 * math.pi * k * js ** 2)
            total = total + torch.exp(log_w[0, k]) * (p * dens).sum() * h
        want.append(torch.log(total))
    assert torch.allclose(got, torch.stack(want), atol=1e-7)


def test_the_marched_transition_density_of_merton_is_the_exact_law():
    from neuralpde_cli.ansatz.gmm import GMMConfig
    from neuralpde_cli.likelihood.pde import PDELikelihoodConfig, TransitionDensity, TransitionSet
    from neuralpde_cli.solvers.time_march import TimeMarchConfig

    rng = np.random.default_rng(1)
    x0 = rng.normal(0.0, 0.3, 400)
    dt = rng.choice([1 / 252, 3 / 252], 400)
    x1 = x0 + rng.standard_t(3, 400) * 0.03
    tset = TransitionSet.from_arrays(x0, x1, np.zeros(400), dt, F64, CPU)
    cfg = _merton()
    density = TransitionDensity(lambda v: build_sde_with(cfg, 1, v, F64, CPU), tset,
                                GMMConfig(components=3), TimeMarchConfig(), PDELikelihoodConfig())
    values = {k: torch.tensor(v, dtype=F64) for k, v in MERTON.items()}
    density.freeze_steps(values)
    got = density.log_density(values, False).numpy()
    want = merton_log_density(x0, x1, dt, *MERTON.values())
    assert density.mixture.components == 1  # the diffusion part is Gaussian: one component
    # the march's error control is relative (rtol 1e-5 on the log-Cholesky factor), so a log
    # density errs by about rtol·(1 + z²): here z reaches 10 at the t₃ draws' far tails
    assert np.abs(got - want).max() < 5e-4
    assert np.abs(got - want).mean() < 5e-5
    # differentiable in the jump parameters
    grad_values = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    density.log_density(grad_values).sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad) for v in grad_values.values())


def test_jumps_need_positive_rate_and_size_and_the_right_dimension():
    with pytest.raises(UserError, match="jump_rate=0.0 must be > 0.*brownian"):
        build_sde(_merton(jump_rate=0.0), 1, F64, CPU)
    with pytest.raises(UserError, match="jump_std"):
        build_sde(_merton(jump_std=-0.1), 1, F64, CPU)
    with pytest.raises(UserError, match="equation.dim=1"):
        build_sde(_merton(), 2, F64, CPU)
    with pytest.raises(UserError, match="equation.dim=2"):
        build_sde(SDEConfig(kind="bates"), 1, F64, CPU)


def test_calibrate_merton_matches_the_exact_mle(tmp_path):
    """simulate then calibrate through the CLI, with the defaults: the PDE fit within 0.1 SE
    of the exact Merton MLE, and the exact law's per-transition densities in fit.json."""
    sim = run_cli(["simulate", "equation.sde.kind=merton", *[f"equation.sde.{k}={v}" for k, v in
                                                             MERTON.items()],
                   "simulate.observations=600", f"simulate.dt={1 / 252}", "hydra.run.dir=sim"],
                  tmp_path)
    assert sim.returncode == 0, sim.stderr
    cal = run_cli(["calibrate", "data=sim/data.csv", "equation.sde.kind=merton",
                   "fit.profile_points=0", "fit.density_bins=2", "hydra.run.dir=cal"], tmp_path)
    assert cal.returncode == 0, cal.stderr
    fit = json.loads((tmp_path / "cal" / "fit.json").read_text())
    exact = fit["baselines"]["exact"]
    for name in MERTON:
        assert abs(fit["estimates"][name] - exact["estimates"][name]) < 0.1 * exact["se"][name]
    assert abs(fit["loglik"] - exact["loglik"]) < 1e-3


def test_solve_marches_merton_and_adds_the_jumps(tmp_path):
    """`solve` with kind=merton: the marched diffusion convolved with the jumps, against the
    exact law (the Poisson mixture of Gaussians from the Gaussian start); a jump size that
    dominates the diffusion, so that a law without its jumps would be far off."""
    args = ["solve", "equation=fokker_planck", "equation.dim=1", "equation.sde.kind=merton",
            "equation.sde.noise=0.2", "equation.sde.jump_rate=2", "equation.sde.jump_mean=-0.5",
            "equation.sde.jump_std=0.3", "equation.initial_mean=[0.0]", "equation.t_final=1",
            "equation.eval_times=[0.25,1.0]"]
    out = run_cli([*args, "hydra.run.dir=run"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert metrics["l1_error"] < 1e-3
    with np.load(tmp_path / "run" / "solution.npz") as sol:  # bimodal: the jumps are there
        x, u = sol["x"][:, 0], sol["u"][-1]
        # the initial law N(0, 0.05²) adds 0.05² to every component's variance
        exact = np.exp(merton_log_density(0.0, x, 1.0, 0.05, math.sqrt(0.2 ** 2 + 0.05 ** 2),
                                          2.0, -0.5, 0.3))
        torch.testing.assert_close(torch.tensor(sol["u_exact"][-1]), torch.tensor(exact))
        assert np.abs(u - exact).max() < 1e-3 * exact.max()
    refused = run_cli([*args, "ansatz=mlp", "optimizer=adam", "hydra.run.dir=run2"], tmp_path)
    assert refused.returncode != 0 and "optimizer=time_march" in refused.stderr
    assert "Traceback" not in refused.stderr
