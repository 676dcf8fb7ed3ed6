"""Gaussian mixture, Fokker–Planck equation, SDEs, time-marching and the density references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from neuralpde_cli.ansatz.gmm import GaussianMixtureAnsatz, GMMConfig, MixtureLayout
from neuralpde_cli.equations.base import gaussian_log_density, relative_l2_from_logs
from neuralpde_cli.equations.fokker_planck import FokkerPlanck, FokkerPlanckConfig
from neuralpde_cli.equations.heat import HeatConfig, HeatEquation
from neuralpde_cli.errors import UserError
from neuralpde_cli.references.fd_density import solve_fp_fd
from neuralpde_cli.references.monte_carlo import histogram_density
from neuralpde_cli.sdes import SDEConfig, build_sde
from neuralpde_cli.solvers.time_march import TimeMarchConfig, TimeMarcher, base_points

DT = torch.float64
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are small: on a shared machine extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _custom_drift(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 - x  # OU: θ = I, m = 0.5


def _custom_sigma(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.6 * torch.eye(x.shape[1], dtype=x.dtype)


def _bad_drift(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x[:, :1]


def _random_state(layout: MixtureLayout, p: int, gen: torch.Generator) -> torch.Tensor:
    return 0.5 * torch.randn(p, layout.size, generator=gen, dtype=DT)


def _mixture_log_p(layout: MixtureLayout, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mixture density by torch.distributions: an independent reference."""
    logits, means, entries = layout.unpack(state)
    comp = torch.distributions.MultivariateNormal(means.unsqueeze(2),
                                                  scale_tril=layout.chol(entries).unsqueeze(2))
    return torch.logsumexp(torch.log_softmax(logits, -1).unsqueeze(-1) + comp.log_prob(x.unsqueeze(1)), 1)


def _fp(**kw) -> FokkerPlanck:
    sde = kw.pop("sde", None)
    cfg = FokkerPlanckConfig(**kw) if sde is None else FokkerPlanckConfig(sde=SDEConfig(**sde), **kw)
    return FokkerPlanck(cfg, DT, CPU)


def _double_well() -> FokkerPlanck:
    return _fp(dim=1, sde={"kind": "double_well", "noise": 0.5}, initial_mean=[0.2],
               initial_std=0.05, eval_times=[1.0, 2.0, 5.0])


def _march(eq, components: int = 1, **kw):
    ansatz = GaussianMixtureAnsatz(GMMConfig(components=components), eq, DT, CPU)
    return TimeMarcher(TimeMarchConfig(**kw)).run(eq, ansatz)


# --- closed forms ---------------------------------------------------------------------------
@pytest.mark.parametrize("per_point", [False, True])
def test_mixture_closed_forms_match_autograd(per_point: bool) -> None:
    """log p, ∇ℓ, tr(D∇²ℓ) with a general SPD D, the parameter Jacobian, K = 3, d = 3."""
    d, k, p, n = 3, 3, 2, 5
    lay = MixtureLayout(d, k)
    gen = torch.Generator().manual_seed(0)
    state, x = _random_state(lay, p, gen), torch.randn(p, n, d, generator=gen, dtype=DT)
    shape = (p * n, d, 2) if per_point else (d, d)
    s = torch.randn(*shape, generator=gen, dtype=DT)
    ev = lay.evaluate(state, x)
    torch.testing.assert_close(ev.log_p, _mixture_log_p(lay, state, x), rtol=1e-12, atol=1e-12)
    f = lay.fields(ev, s)
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(_mixture_log_p(lay, state, xr).sum(), xr, create_graph=True)[0]
    hess = torch.stack([torch.autograd.grad(g[..., i].sum(), xr, retain_graph=True)[0]
                        for i in range(d)], -1)
    dmat = (s @ s.transpose(-1, -2)).reshape(p, n, d, d) if per_point else (s @ s.T).expand(p, n, d, d)
    torch.testing.assert_close(f.grad, g.detach().reshape(-1, d), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.trace_dh, torch.einsum("pnij,pnji->pn", dmat, hess).reshape(-1),
                               rtol=1e-10, atol=1e-10)
    # ∂ℓ/∂θ · θ̇ (autograd over the packed state) = closed-form Jacobian in relative coordinates
    jac = torch.autograd.functional.jacobian(lambda st: _mixture_log_p(lay, st, x), state)
    jac = torch.stack([jac[i, :, i] for i in range(p)])
    eta = torch.randn(p, lay.size, generator=gen, dtype=DT)
    rate = lay.from_relative(eta, state)
    dense = lay.jacobian(ev)
    expected = torch.einsum("pnk,pk->pn", jac, rate)
    torch.testing.assert_close(torch.einsum("pnk,pk->pn", dense, eta), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lay.jvp(ev, eta), expected, rtol=1e-10, atol=1e-12)
    y, w = torch.randn(p, n, generator=gen, dtype=DT), torch.rand(p, n, generator=gen, dtype=DT)
    torch.testing.assert_close(lay.vjp(ev, y), torch.einsum("pnk,pn->pk", dense, y))
    torch.testing.assert_close(lay.jacobian_sq(ev, w), torch.einsum("pnk,pn->pk", dense ** 2, w))
    torch.testing.assert_close(lay.to_relative(rate, state), eta)


@pytest.mark.parametrize("conditioned", [False, True])
def test_network_mixture_fields_match_autograd(conditioned: bool) -> None:
    """∂ₜℓ (forward tangent through the networks), ∇ℓ and tr(D∇²ℓ) of the network-of-t GMM."""
    torch.manual_seed(0)
    eq = _fp(initial="point")
    ansatz = GaussianMixtureAnsatz(GMMConfig(components=3, condition_on_x0=conditioned), eq, DT, CPU)
    for prm in ansatz.parameters():
        torch.nn.init.normal_(prm, std=0.2)
    gen = torch.Generator().manual_seed(1)
    t = 5.0 * torch.rand(6, generator=gen, dtype=DT)
    x = torch.randn(6, 2, generator=gen, dtype=DT)
    cond = 0.3 * torch.randn(6, 2, generator=gen, dtype=DT) if conditioned else None
    s = torch.randn(2, 2, generator=gen, dtype=DT)
    f = ansatz.log_density_fields(t, x, s, cond=cond)

    def logp(ti, xi, ci):
        return ansatz.log_density(ti[None], xi[None], None if ci is None else ci[None])[0]

    args = (t, x) if cond is None else (t, x, cond)
    fn = (lambda ti, xi: logp(ti, xi, None)) if cond is None else logp
    dt, dx = torch.func.vmap(torch.func.grad(fn, argnums=(0, 1)))(*args)
    hess = torch.func.vmap(torch.func.hessian(fn, argnums=1))(*args)
    torch.testing.assert_close(f.log_p, torch.func.vmap(fn)(*args), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.dt_log_p, dt, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(f.grad, dx, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(f.trace_dh, torch.einsum("ij,nji->n", s @ s.T, hess), rtol=1e-8, atol=1e-8)


def test_mixture_mass_moments_and_samples() -> None:
    """Mass 1 by quadrature in 2-D; closed-form moments agree with reparameterized samples."""
    lay = MixtureLayout(2, 3)
    gen = torch.Generator().manual_seed(3)
    state = _random_state(lay, 1, gen)
    h = 0.02
    axis = torch.arange(-12.0, 12.0, h, dtype=DT) + h / 2
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(1, -1, 2)
    mass = float(torch.exp(lay.evaluate(state, grid).log_p).sum() * h * h)
    assert abs(mass - 1.0) < 1e-10
    n = 200_000
    u, z = torch.rand(n, generator=gen, dtype=DT), torch.randn(n, 2, generator=gen, dtype=DT)
    x = lay.sample(state.expand(n, -1), u, z)
    mean, cov = lay.moments(state)
    torch.testing.assert_close(x.mean(0), mean[0], atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov[0], atol=0.02, rtol=0)


def test_marginal_is_the_full_density_integrated_over_the_rest() -> None:
    """The closed-form (x1, x3) marginal of a 3-D, K = 3 mixture at t = 0.7 against quadrature of
    the full density over x2 (midpoint rule, spectrally accurate for a Gaussian tail)."""
    eq = HeatEquation(HeatConfig(dim=3, initial_correlation=0.4, t_final=2.0), DT, CPU)
    torch.manual_seed(0)
    ansatz = GaussianMixtureAnsatz(GMMConfig(components=3, split=0.3), eq, DT, CPU)
    with torch.no_grad():
        for p in ansatz.parameters():
            p.add_(0.2 * torch.randn_like(p))  # a mixture away from the initial one
    gen = torch.Generator().manual_seed(5)
    pts = 1.5 * torch.randn(40, 2, generator=gen, dtype=DT)
    h = 0.01
    axis = torch.arange(-40.0, 40.0, h, dtype=DT) + h / 2
    full = torch.stack([pts[:, 0].repeat_interleave(axis.numel()), axis.repeat(pts.shape[0]),
                        pts[:, 1].repeat_interleave(axis.numel())], -1)
    with torch.no_grad():
        log_full = ansatz.log_density(torch.full((full.shape[0],), 0.7, dtype=DT), full)
        marginal = ansatz.marginal_log_density(0.7, pts, (0, 2))
    integrated = torch.exp(log_full).reshape(pts.shape[0], -1).sum(-1) * h
    torch.testing.assert_close(torch.exp(marginal), integrated, rtol=1e-9, atol=0)


def test_split_keeps_initial_moments() -> None:
    """K identical components would make the march singular; the split keeps p₀'s moments."""
    eq = _fp()
    ansatz = GaussianMixtureAnsatz(GMMConfig(components=5, split=0.2), eq, DT, CPU)
    mean, cov = ansatz.moments(torch.zeros(1, dtype=DT))
    torch.testing.assert_close(mean[0], eq.initial_mean)
    torch.testing.assert_close(cov[0], eq.initial_cov)


# --- SDEs and the exact OU density ----------------------------------------------------------
def test_sde_closed_form_divergences_match_autograd() -> None:
    gen = torch.Generator().manual_seed(4)
    for kind, dim in (("double_well", 1), ("double_well_2d", 2), ("cir", 2), ("gbm", 2), ("ou", 2)):
        eq = _fp(dim=dim, sde={"kind": kind, "theta": [[1.0, 0.6], [-0.4, 0.8]], "mean": [1.0, -0.5]},
                 initial_mean=[0.7] * dim)
        x = 0.5 + torch.rand(7, dim, generator=gen, dtype=DT)
        t = torch.zeros(7, dtype=DT)
        base = super(FokkerPlanck, eq)
        torch.testing.assert_close(eq.drift_divergence(t, x), base.drift_divergence(t, x))
        div, divdiv = eq.diffusion_divergences(t, x)
        div_ref, divdiv_ref = base.diffusion_divergences(t, x)
        torch.testing.assert_close(div, div_ref)
        torch.testing.assert_close(divdiv, divdiv_ref)


def test_ou_exact_moments_match_euler_maruyama_and_lyapunov() -> None:
    eq = _fp(initial_std=0.2)
    times = torch.tensor([0.5, 1.0], dtype=DT)
    mean, cov = eq.exact_moments(times)
    gen = torch.Generator().manual_seed(5)
    n = 100_000
    x0 = eq.initial_mean + 0.2 * torch.randn(n, 2, generator=gen, dtype=DT)
    paths = eq.sde.euler_maruyama(x0, times, n, gen, dt=2e-3)
    for i in range(2):
        torch.testing.assert_close(paths[i].mean(0), mean[i], atol=0.01, rtol=0)
        torch.testing.assert_close(torch.cov(paths[i].T), cov[i], atol=0.01, rtol=0.03)
    # t → ∞: the Lyapunov equation θΣ + Σθᵀ = σσᵀ
    _, c_inf = eq.exact_moments(torch.tensor([60.0], dtype=DT))
    theta, sigma = -eq.sde.a, eq.sde.sigma
    torch.testing.assert_close(theta @ c_inf[0] + c_inf[0] @ theta.T, sigma @ sigma.T)


def test_brownian_with_drift_moments() -> None:
    eq = _fp(sde={"kind": "brownian", "drift_vector": [0.3, -0.1]}, initial_std=0.2)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    mean, cov = eq.exact_moments(t)
    sigma = eq.sde.sigma
    torch.testing.assert_close(mean[1], torch.tensor([0.6, -0.2], dtype=DT))
    torch.testing.assert_close(cov[1], eq.initial_cov + 2.0 * sigma @ sigma.T)
    torch.testing.assert_close(cov[0], eq.initial_cov)


def test_ou_moments_are_differentiable_in_coefficients() -> None:
    eq = _fp()
    eq.sde.sigma.requires_grad_(True)
    _, cov = eq.exact_moments(torch.tensor([1.0], dtype=DT))
    (grad,) = torch.autograd.grad(cov.sum(), eq.sde.sigma)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --- references ------------------------------------------------------------------------------
def test_fd_reference_converges_at_second_order_and_conserves_mass() -> None:
    sde = build_sde(SDEConfig(kind="ou", theta=[[1.0]], mean=[0.5], sigma=[[0.6]]), 1, DT, CPU)
    m0, c0 = np.array([-0.5]), np.array([[0.04]])
    times = [0.5, 1.0]
    mean, cov = sde.exact_moments(torch.tensor(times, dtype=DT), torch.tensor(m0), torch.tensor(c0))
    errors = []
    for cells in (60, 120, 240):
        sol = solve_fp_fd(sde, m0, c0, times, np.array([[-3.0, 3.0]]), cells, 1e-3)
        assert np.abs(sol.mass() - 1.0).max() < 1e-10
        exact = torch.exp(gaussian_log_density(torch.tensor(sol.points()), mean[1], cov[1])).numpy()
        errors.append(np.abs(sol.density[1].ravel() - exact).sum() * sol.cell_volume)
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.3 < r < 4.7 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-3


def test_fd_reference_2d_correlated_ou() -> None:
    """The cross-diffusion terms: correlated noise and a non-symmetric drift against the exact law."""
    eq = _fp(initial_std=0.3)
    mean, cov = eq.exact_moments(torch.tensor([1.0], dtype=DT))
    errors = []
    for cells in (32, 64):
        sol = solve_fp_fd(eq.sde, np.zeros(2), 0.09 * np.eye(2), [1.0],
                          np.array([[-2.5, 3.5], [-3.0, 2.0]]), cells, 1e-2)
        exact = torch.exp(gaussian_log_density(torch.tensor(sol.points()), mean[0], cov[0])).numpy()
        assert abs(sol.mass()[0] - 1.0) < 1e-10
        errors.append(np.abs(sol.density[0].ravel() - exact).sum() * sol.cell_volume)
    assert 3.0 < errors[0] / errors[1] < 5.0 and errors[1] < 1e-2, errors


def test_fd_reference_agrees_with_monte_carlo_double_well() -> None:
    eq = _double_well()
    sol = eq.fd_reference([1.0, 2.0])
    mc = histogram_density(eq.sde, eq.initial_mean, eq.initial_cov, [1.0, 2.0], eq.reference_box(),
                           60, 40_000, torch.Generator().manual_seed(6), dt=2e-3)
    for i in range(2):
        l1 = np.abs(sol.interpolate(i, mc.points()) - mc.density[i].ravel()).sum() * mc.cell_volume
        assert l1 < 0.05, l1


# --- time-marching ---------------------------------------------------------------------------
def test_time_march_heat_is_exact_to_1e4() -> None:
    """Heat as the μ = 0 case: the GMM marched from N(0, I) to t = 10."""
    eq = HeatEquation(HeatConfig(), DT, CPU)
    metrics = eq.evaluate(_march(eq).ansatz)
    assert metrics["rel_l2_error"] <= 1e-4, metrics


def test_time_march_ou_narrow_start() -> None:
    """2-D OU, non-symmetric θ, correlated σ, from std 0.05: rel. L2 ≤ 1e-3 at every eval time
    on points drawn from the exact density; mass 1 by quadrature; the history is reported."""
    eq = _fp()
    calls = []
    ansatz = GaussianMixtureAnsatz(GMMConfig(), eq, DT, CPU)
    result = TimeMarcher(TimeMarchConfig()).run(eq, ansatz, lambda t, info: calls.append((t, info)))
    solution = result.ansatz
    gen = torch.Generator().manual_seed(7)
    times = torch.tensor(eq.eval_times, dtype=DT)
    means, covs = eq.exact_moments(times)
    for i, t in enumerate(eq.eval_times):
        x = means[i] + torch.randn(4000, 2, generator=gen, dtype=DT) @ torch.linalg.cholesky(covs[i]).T
        log_pred = solution.log_density(torch.full((4000,), t, dtype=DT), x)
        assert relative_l2_from_logs(log_pred, gaussian_log_density(x, means[i], covs[i])) <= 1e-3
    assert eq.evaluate_extra(solution)["quadrature_mass_error"] < 1e-6
    assert len(calls) == len(result.history) > 5
    assert set(calls[0][1]) == {"dt", "step_error", "lstsq_residual", "elapsed_s"}
    assert all(0 <= info["step_error"] <= 1 for _, info in calls)  # every accepted step
    assert result.history[-1]["t"] == pytest.approx(eq.t_final)


def test_marched_solution_is_smooth_and_differentiable() -> None:
    """Dense output is C¹ across steps; fields agree with autograd in t and x."""
    eq = _fp()
    sol = _march(eq, components=2, method="rk4", steps=60).ansatz
    c, h = sol.coeffs[0], sol.times[1:] - sol.times[:-1]
    powers = torch.arange(c.shape[1], dtype=DT)
    end_value = c.sum(1)  # θ = 1 on each step
    end_rate = (powers[:, None] * c).sum(1) / h[:, None]
    torch.testing.assert_close(end_value[:-1], c[1:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(end_rate[:-1], c[1:, 1] / h[1:, None], rtol=1e-9, atol=1e-9)
    t = torch.tensor([0.3, 1.7], dtype=DT, requires_grad=True)
    x = torch.tensor([[0.1, 0.0], [0.8, -0.4]], dtype=DT, requires_grad=True)
    f = sol.log_density_fields(t.detach(), x.detach(), eq.diffusion_sqrt(t, x))
    gt, gx = torch.autograd.grad(sol.log_density(t, x).sum(), (t, x))
    torch.testing.assert_close(f.dt_log_p, gt)
    torch.testing.assert_close(f.grad, gx)


def test_time_march_batched_start_points() -> None:
    """p(t, x | x₀) for three start points in one march (one batched solve per stage)."""
    eq = _fp(initial="point", point_width=0.05, t_final=2.0, eval_times=[0.5, 2.0])
    ansatz = GaussianMixtureAnsatz(GMMConfig(condition_on_x0=True), eq, DT, CPU)
    starts = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=DT)
    sol = TimeMarcher(TimeMarchConfig()).run(eq, ansatz, x0_batch=starts).ansatz
    t = torch.tensor([2.0], dtype=DT)
    for b in range(3):
        mean, cov = eq.sde.exact_moments(t, starts[b], eq.initial_cov)
        m_hat, c_hat = sol.moments(t, cond=starts[b])
        torch.testing.assert_close(m_hat, mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(c_hat, cov, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="marched start points"):
        sol.log_density(t, starts[:1], cond=torch.tensor([[5.0, 5.0]], dtype=DT))


def test_time_march_batched_over_equation_parameters() -> None:
    """One march over four (x₀, θ, σ) members: each matches the exact OU density of its own
    parameters, built as a separate equation."""
    eq = _fp(t_final=2.0, eval_times=[0.5, 2.0])
    ansatz = GaussianMixtureAnsatz(GMMConfig(condition_on_x0=True), eq, DT, CPU)
    thetas = torch.tensor([[[1.0, 0.6], [-0.4, 0.8]], [[0.5, 0.0], [0.0, 2.0]],
                           [[1.5, -0.3], [0.2, 1.0]], [[1.0, 0.6], [-0.4, 0.8]]], dtype=DT)
    sigmas = torch.tensor([[[0.8, 0.0], [0.4, 0.6]], [[0.3, 0.0], [0.0, 0.3]],
                           [[1.0, 0.0], [-0.5, 0.7]], [[0.5, 0.0], [0.0, 0.5]]], dtype=DT)
    level = torch.tensor([1.0, -0.5], dtype=DT)
    starts = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5], [0.0, 0.0]], dtype=DT)
    params = {"sde.a": -thetas, "sde.c": thetas @ level, "sde.sigma": sigmas}
    sol = TimeMarcher(TimeMarchConfig()).run(eq, ansatz, x0_batch=starts, param_batch=params).ansatz
    assert sol.conditions.shape == (4, 2 + 4 + 2 + 4)
    t = torch.tensor([0.5, 2.0], dtype=DT)
    for b in range(4):
        own = _fp(t_final=2.0, initial_mean=starts[b].tolist(),
                  sde={"theta": thetas[b].tolist(), "mean": level.tolist(),
                       "sigma": sigmas[b].tolist()})
        mean, cov = own.exact_moments(t)
        m_hat, c_hat = sol.moments(t, cond=sol.conditions[b])
        torch.testing.assert_close(m_hat, mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(c_hat, cov, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="not a parameter of this equation"):
        TimeMarcher(TimeMarchConfig()).run(eq, ansatz, param_batch={"sde.theta": thetas})
    with pytest.raises(UserError, match="the same number"):
        TimeMarcher(TimeMarchConfig()).run(eq, ansatz, x0_batch=starts[:3], param_batch=params)
    with pytest.raises(UserError, match=r"needs \(4, 2, 2\)"):
        TimeMarcher(TimeMarchConfig()).run(eq, ansatz, param_batch={"sde.sigma": sigmas[:, :1]})


@pytest.mark.parametrize("components", [1, 3])
def test_rowwise_jacobian_matches_the_generic_one(components: int) -> None:
    """Levenberg–Marquardt's shortcut (one backward pass to the per-point state, per-point
    gradients of the networks) gives the same Jacobian as M backward passes."""
    from neuralpde_cli.training.levenberg_marquardt import LevenbergMarquardt, Residual
    from neuralpde_cli.training.objectives import DensityObjective
    from neuralpde_cli.training.samplers import CollocationSampler, SamplerConfig

    eq = _fp()
    ansatz = GaussianMixtureAnsatz(GMMConfig(components=components, hidden=8), eq, DT, CPU)
    torch.nn.init.normal_(ansatz.layers[-1].weight, std=0.1)  # away from the static start
    gen = torch.Generator().manual_seed(3)
    objective = DensityObjective(eq, ansatz, CollocationSampler(SamplerConfig(batch_size=16),
                                                                eq, ansatz, gen))
    objective.freeze()
    res = objective.residual_terms("pde")["pde"]
    assert res.pullback is not None
    params = list(ansatz.parameters())
    fast = LevenbergMarquardt.jacobian(res, params)
    slow = LevenbergMarquardt.jacobian(Residual(objective.residual_terms("pde")["pde"].values), params)
    assert fast.shape == (64, sum(p.numel() for p in params))
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9 * float(slow.abs().max()))


def test_levenberg_marquardt_solves_a_small_least_squares_fit() -> None:
    """Rosenbrock as residuals (10(y − x²), 1 − x): the minimum (1, 1) from (−1.2, 1)."""
    from neuralpde_cli.training.levenberg_marquardt import LevenbergMarquardt, Residual

    xy = torch.nn.Parameter(torch.tensor([-1.2, 1.0], dtype=DT))
    opt = LevenbergMarquardt([xy])
    closure = lambda: Residual(torch.stack([10 * (xy[1] - xy[0] ** 2), 1 - xy[0]]))  # noqa: E731
    for _ in range(100):
        opt.step(closure)
    torch.testing.assert_close(xy.detach(), torch.ones(2, dtype=DT), rtol=0, atol=1e-10)


def test_double_well_k8_against_fd_reference() -> None:
    eq = _double_well()
    metrics = eq.evaluate_extra(_march(eq, components=8).ansatz)
    assert metrics["l1_error"] <= 3e-3, metrics
    assert set(metrics) >= {"l1_error_t1", "l1_error_t2", "l1_error_t5"}


def test_custom_callables_reproduce_ou() -> None:
    """A user drift/diffusion (autograd divergences) marches to the exact OU law."""
    eq = _fp(sde={"kind": "custom", "drift": f"{__name__}:_custom_drift",
                  "diffusion": f"{__name__}:_custom_sigma"}, initial_std=0.3, t_final=1.0,
             eval_times=[1.0])
    sol = _march(eq).ansatz
    ou = build_sde(SDEConfig(kind="ou", theta=[[1.0, 0.0], [0.0, 1.0]], mean=[0.5, 0.5],
                             sigma=[[0.6, 0.0], [0.0, 0.6]]), 2, DT, CPU)
    t = torch.tensor([1.0], dtype=DT)
    mean, cov = ou.exact_moments(t, eq.initial_mean, eq.initial_cov)
    m_hat, c_hat = sol.moments(t)
    torch.testing.assert_close(m_hat, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_hat, cov, atol=1e-5, rtol=0)


def test_matrix_free_solver_matches_dense() -> None:
    """CG (the high-d path) and the dense solve give the same march; Stroud's rule is exact
    for the moments up to degree 5."""
    z, w = base_points(0, 4, "stroud5", DT, CPU)
    assert z.shape[0] == 2 * 4 ** 2 + 1
    torch.testing.assert_close((w[:, None] * z ** 4).sum(0), torch.full((4,), 3.0, dtype=DT))
    torch.testing.assert_close((w * z[:, 0] ** 2 * z[:, 1] ** 2).sum(), torch.tensor(1.0, dtype=DT))
    eq = HeatEquation(HeatConfig(dim=3, initial_correlation=0.3, t_final=2.0, eval_times=[2.0]), DT, CPU)
    dense = _march(eq, quadrature="sobol", linear_solver="dense").ansatz
    cg = _march(eq, quadrature="sobol", linear_solver="cg").ansatz
    t = torch.tensor([2.0], dtype=DT)
    torch.testing.assert_close(cg.moments(t)[1], dense.moments(t)[1], atol=1e-7, rtol=0)
    assert eq.evaluate(_march(eq, linear_solver="cg").ansatz)["cov_rel_error"] < 1e-4


# --- configuration and bad input ---------------------------------------------------------------
def test_structured_configs_compose() -> None:
    for schema in (FokkerPlanckConfig, GMMConfig, TimeMarchConfig):
        obj = OmegaConf.to_object(OmegaConf.structured(schema))
        assert isinstance(obj, schema)
    cfg = OmegaConf.merge(OmegaConf.structured(FokkerPlanckConfig), {"sde": {"kind": "cir"}})
    assert OmegaConf.to_object(cfg).sde.kind == "cir"


@pytest.mark.parametrize("build, message", [
    (lambda: GaussianMixtureAnsatz(GMMConfig(components=0), _fp(), DT, CPU), "components=0"),
    (lambda: GaussianMixtureAnsatz(GMMConfig(split=1.0), _fp(), DT, CPU), "split"),
    (lambda: _fp(sde={"sigma": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]}), r"sigma has shape \(2, 3\).*2×2"),
    (lambda: _fp(sde={"theta": [[1.0]]}), "theta has shape"),
    (lambda: _fp(sde={"kind": "nope"}), "sde.kind='nope'"),
    (lambda: _fp(sde={"kind": "custom", "drift": "no_colon"}), "package.module:function"),
    (lambda: _fp(sde={"kind": "custom", "drift": "no_such_pkg_xyz.mod:f"}), "cannot import"),
    (lambda: _fp(sde={"kind": "custom", "drift": "math:no_such_function"}), "no callable"),
    (lambda: _fp(sde={"kind": "custom", "drift": f"{__name__}:_bad_drift"}), r"returned shape \(3, 1\)"),
    (lambda: _fp(sde={"kind": "custom"}), "needs equation.sde.drift"),
    (lambda: _fp(sde={"kind": "double_well_2d"}, dim=1, initial_mean=[0.0]), "dim=2"),
    (lambda: _fp(sde={"kind": "cir"}, dim=1, initial_mean=[-1.0]), "above 0"),
    (lambda: _fp(initial="delta"), "initial='delta'"),
    (lambda: TimeMarcher(TimeMarchConfig(method="euler")), "method='euler'"),
    (lambda: TimeMarcher(TimeMarchConfig(ridge=0.0)), "ridge=0.0"),
    (lambda: _march(HeatEquation(HeatConfig(dim=10), DT, CPU), base_points=20), "base_points=20"),
])
def test_bad_inputs_raise_user_error(build, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build()
