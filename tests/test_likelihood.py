"""The Fokker–Planck transition density and the fitter, against exact transition laws.

OU: Gaussian transition (references.transitions.ou_log_density). CIR: non-central χ²
(cir_log_density). Neither reference shares code with the time-march it checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralpde_cli.ansatz.gmm import GMMConfig
from neuralpde_cli.errors import UserError
from neuralpde_cli.likelihood import fit as fitting
from neuralpde_cli.likelihood.pde import (PDELikelihoodConfig, TransitionDensity, TransitionSet,
                                          spline_weights)
from neuralpde_cli.references.transitions import cir_log_density, exact_mle, ou_log_density
from neuralpde_cli.sdes import SDEConfig, build_sde_with
from neuralpde_cli.solvers.time_march import TimeMarchConfig

F64, CPU = torch.float64, torch.device("cpu")


def ou_path(n: int, dt: np.ndarray | float, theta: float, mean: float, sigma: float,
            seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dts = np.broadcast_to(np.asarray(dt, float), (n,))
    x = np.empty(n + 1)
    x[0] = mean
    for i, h in enumerate(dts):
        a = math.exp(-theta * h)
        x[i + 1] = mean + (x[i] - mean) * a + sigma * math.sqrt((1 - a * a) / (2 * theta)) * \
            rng.standard_normal()
    return x


def density(kind: str, x0, x1, dt, components: int = 1, grid: int = 16,
            coordinates: str = "auto", **pde: object) -> TransitionDensity:
    cfg = SDEConfig(kind=kind, theta=[[1.0]], mean=[0.0], sigma=[[1.0]])
    ts = TransitionSet.from_arrays(x0, x1, np.zeros(len(x0)), dt, F64, CPU)
    return TransitionDensity(lambda v: build_sde_with(cfg, 1, v, F64, CPU), ts,
                             GMMConfig(components=components, split=0.3),
                             TimeMarchConfig(rtol=1e-5),
                             PDELikelihoodConfig(grid=grid, coordinates=coordinates, **pde))


def tensors(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=F64, requires_grad=True) for k, v in values.items()}


def test_spline_reproduces_lines_inside_and_is_natural():
    nodes = torch.linspace(0.0, 1.0, 9, dtype=F64)
    x = torch.tensor([0.05, 0.33, 0.5, 0.97], dtype=F64)
    w = spline_weights(nodes, x)
    assert torch.allclose(w @ (3 * nodes - 1), 3 * x - 1, atol=1e-13)  # linear: exact
    assert float((w @ nodes ** 2 - x ** 2).abs().max()) < 2e-3  # natural end conditions: O(h²)
    # a cubic inside, away from the natural ends: fourth-order accurate
    fine = torch.linspace(0.0, 1.0, 65, dtype=F64)
    mid = torch.tensor([0.4, 0.52], dtype=F64)
    assert float((spline_weights(fine, mid) @ fine ** 3 - mid ** 3).abs().max()) < 1e-6


def test_ou_log_density_matches_exact_with_irregular_dt_and_gradient_is_exact():
    rng = np.random.default_rng(3)
    dt = rng.choice([0.25, 0.5, 1.0], size=400)
    x = ou_path(400, dt, 1.2, 0.4, 0.6, seed=1)
    td = density("ou", x[:-1], x[1:], dt)
    values = tensors(theta=1.2, mean=0.4, sigma=0.6)
    td.freeze_steps(values)
    lp = td.log_density(values)
    exact = ou_log_density(x[:-1], x[1:], dt, 1.2, 0.4, 0.6)
    assert np.abs(lp.detach().numpy() - exact).max() < 2e-4
    # gradient by autograd against the exact log-likelihood's gradient (central differences)
    lp.sum().backward()
    for name, i in (("theta", 0), ("mean", 1), ("sigma", 2)):
        p = np.array([1.2, 0.4, 0.6])
        h = 1e-6
        up, down = p.copy(), p.copy()
        up[i] += h
        down[i] -= h
        g = (ou_log_density(x[:-1], x[1:], dt, *up).sum()
             - ou_log_density(x[:-1], x[1:], dt, *down).sum()) / (2 * h)
        assert abs(float(values[name].grad) - g) < 2e-3 * max(1.0, abs(g)), name


def test_a_slow_march_is_compiled_and_gives_the_same_log_density_and_gradient(caplog):
    """``fit.pde.compile=auto`` with a threshold of 0 s: two differentiable marches run eagerly
    and turn compiling on (the first alone does not: it carries one-time costs); the compiled
    replay gives the eager log-densities and gradient to rounding, and both the exact OU law to
    the march's accuracy."""
    x = ou_path(60, 0.5, 1.2, 0.4, 0.6, seed=2)
    td = density("ou", x[:-1], x[1:], np.full(60, 0.5), grid=6, compile_above_s=0.0)
    td.freeze_steps(tensors(theta=1.2, mean=0.4, sigma=0.6))
    runs = []
    with caplog.at_level("INFO", logger="neuralpde_cli.likelihood.pde"):
        for _ in range(3):
            values = tensors(theta=1.2, mean=0.4, sigma=0.6)
            lp = td.log_density(values)
            lp.sum().backward()
            runs.append((lp.detach().numpy(), np.array([float(v.grad) for v in values.values()]),
                         td.compiled))
    (eager, g_eager, first), (_, _, second), (compiled, g_compiled, _) = runs
    assert not first and second and "compiling the march" in caplog.text
    assert np.abs(compiled - eager).max() < 1e-10
    assert np.abs(g_compiled - g_eager).max() < 1e-8 * max(1.0, np.abs(g_eager).max())
    exact = ou_log_density(x[:-1], x[1:], np.full(60, 0.5), 1.2, 0.4, 0.6)
    assert np.abs(compiled - exact).max() < 2e-4


def test_a_compiler_that_fails_leaves_the_march_eager(monkeypatch, caplog):
    """No C++ toolchain (or an operator inductor cannot lower): one warning, the same march."""
    from torch._inductor.exc import InductorError

    from neuralpde_cli.solvers import time_march

    def failing(fn, **kwargs):
        def call(*args):
            raise InductorError(RuntimeError("no C++ compiler"), None)
        return call

    monkeypatch.setattr(time_march.torch, "compile", failing)
    x = ou_path(60, 0.5, 1.2, 0.4, 0.6, seed=2)
    eager = density("ou", x[:-1], x[1:], np.full(60, 0.5), grid=6, compile="false")
    wanted = density("ou", x[:-1], x[1:], np.full(60, 0.5), grid=6, compile="true")
    values = tensors(theta=1.2, mean=0.4, sigma=0.6)
    with caplog.at_level("WARNING"):
        got = [td.log_density(values).detach().numpy() for td in (eager, wanted, wanted)]
    # said once: the density marches eagerly from then on
    assert caplog.text.count("torch.compile failed") == 1 and "no C++ compiler" in caplog.text
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2])


@pytest.mark.parametrize("key, value", [("compile", "sometimes"), ("compile_above_s", -1.0)])
def test_a_bad_compile_setting_is_named(key, value):
    with pytest.raises(UserError, match=f"fit.pde.{key}"):
        density("ou", np.zeros(3), np.ones(3), np.ones(3), **{key: value})


def test_steps_frozen_far_away_are_chosen_again_and_the_density_stays_exact():
    """Steps frozen at a slow OU (θ = 0.1) are far too long for θ = 8: the replay's own error
    estimate says so, the steps are chosen again there, and the log-density is the exact one
    to 2e-4 (the stale replay alone is off by 1.2e-3 here; on the double well it breaks down)."""
    x = ou_path(300, 0.5, 8.0, 0.0, 1.0, seed=4)
    td = density("ou", x[:-1], x[1:], np.full(300, 0.5))
    td.freeze_steps(tensors(theta=0.1, mean=0.0, sigma=1.0))
    slow_steps = list(td.step_times)
    fast = tensors(theta=8.0, mean=0.0, sigma=1.0)
    lp = td.log_density(fast)
    exact = ou_log_density(x[:-1], x[1:], np.full(300, 0.5), 8.0, 0.0, 1.0)
    assert td.refreezes == 1 and len(td.step_times) > len(slow_steps)
    assert np.abs(lp.detach().numpy() - exact).max() < 2e-4
    lp.sum().backward()  # the re-chosen march is differentiable as the replay was
    assert all(torch.isfinite(v.grad) for v in fast.values())
    # near the freeze point the frozen steps are kept: the likelihood stays one smooth function
    td.log_density(tensors(theta=8.05, mean=0.0, sigma=1.0))
    assert td.refreezes == 1


def test_a_trial_that_needs_far_more_steps_is_refused_and_the_old_steps_stay():
    """Re-chosen steps are capped (1.5× those they replace, at least 64): θ = 2,000 needs far
    more than the 14 frozen at θ = 0.1, so the evaluation fails as a numerical failure (the
    fitter's line search reads it as +∞ and backs off), and the frozen steps are kept."""
    from neuralpde_cli.likelihood import pde

    x = ou_path(100, 0.5, 1.0, 0.0, 1.0, seed=5)
    td = density("ou", x[:-1], x[1:], np.full(100, 0.5))
    td.freeze_steps(tensors(theta=0.1, mean=0.0, sigma=1.0))
    slow_steps = list(td.step_times)
    assert len(slow_steps) * pde.REFREEZE_GROWTH < pde.MIN_STEP_CAP
    with pytest.raises(ArithmeticError):
        td.log_density(tensors(theta=2000.0, mean=0.0, sigma=1.0))
    assert td.step_times == slow_steps and td.refreezes == 0
    nll = fitting._safe(fitting.autograd_objective(td.log_density, lambda th, g: tensors(
        **dict(zip(("theta", "mean", "sigma"), th)))))
    assert nll(np.array([2000.0, 0.0, 1.0]))[0] == math.inf


def test_cir_monthly_is_near_gaussian_in_its_lamperti_coordinate():
    """CIR at Δt = 1/12 (κΔ = 0.25) is skewed in x: one Gaussian marched there is off by 4e-2
    per point on average. In Lamperti's coordinate 2√x (where the noise is constant) one
    Gaussian is within 3e-3. Its march residual (measured 0.024) is above
    fit.pde.gaussian_residual, so the first march keeps the 3 components asked for, with the
    one-dimensional ridge: 1.6e-4 per point (against the non-central χ²)."""
    rng = np.random.default_rng(0)
    k, m, s, dt, n = 3.0, 0.3, 0.2, 1 / 12, 300
    c = s * s * (1 - math.exp(-k * dt)) / (4 * k)
    x = np.empty(n + 1)
    x[0] = m
    for i in range(n):
        x[i + 1] = c * rng.noncentral_chisquare(4 * k * m / s ** 2, x[i] * math.exp(-k * dt) / c)
    exact = cir_log_density(x[:-1], x[1:], dt, k, m, s)
    values = tensors(rate=k, level=m, noise=s)
    errors = {}
    for coordinates, comps in (("natural", 1), ("auto", 1), ("auto", 3)):
        td = density("cir", x[:-1], x[1:], np.full(n, dt), components=comps, grid=12,
                     coordinates=coordinates)
        td.freeze_steps(values)
        with torch.no_grad():
            errors[coordinates, comps] = float(np.abs(td.log_density(values, False).numpy()
                                                      - exact).mean())
        if comps == 3:  # asked for at most 3: the one-Gaussian march's residual keeps them
            assert td.gaussian_residual > td.cfg.gaussian_residual
            assert td.mixture.components == 3 and td.march_cfg.ridge == td.cfg.ridge_1d
    assert td.powers == {0: 0.5}
    assert errors["natural", 1] > 1e-2
    assert errors["auto", 1] < 3e-3 and errors["auto", 3] < 5e-4


def test_a_mixture_that_loses_on_the_data_is_dropped():
    """VIX-like CIR (κ 17, level 15, σ 6) over 1–4 calendar days, with the far-tail moves real
    data have (three spikes of +130 %): one Gaussian's march residual asks for K = 3, whose
    thinner tails score the spikes lower (measured: 6.6 lower, −8.0 in total against the exact
    law where one Gaussian errs −1.4). Whichever is kept is the one closer to the exact law."""
    rng = np.random.default_rng(5)
    k, m, s, n = 17.0, 15.0, 6.0, 400
    dt = rng.choice([1, 1, 1, 1, 3, 4], size=n) / 365.25
    x = np.empty(n + 1)
    x[0] = m
    for i in range(n):
        c = s * s * (1 - math.exp(-k * dt[i])) / (4 * k)
        x[i + 1] = c * rng.noncentral_chisquare(4 * k * m / s ** 2, x[i] * math.exp(-k * dt[i]) / c)
    x0, x1 = x[:-1].copy(), x[1:].copy()
    for i in (50, 200, 330):
        x1[i] = 2.3 * x0[i]
    exact = cir_log_density(x0, x1, dt, k, m, s)
    values = tensors(rate=k, level=m, noise=s)
    total = {}
    for comps in (1, 3):
        td = density("cir", x0, x1, dt, components=comps, grid=16)
        td.use_components(comps)
        with torch.no_grad():
            total[comps] = float((td.log_density(values, False).numpy() - exact).sum())
    chooser = density("cir", x0, x1, dt, components=3, grid=16)
    chosen = chooser.choose_components(values, 3)
    assert chooser.gaussian_residual > chooser.cfg.gaussian_residual  # the residual asked for 3
    scores = chooser.component_logliks
    assert chosen == (1 if scores["3"] < scores["1"] - 1e-4 * n else 3)
    other = 4 - chosen
    assert abs(total[chosen]) < abs(total[other]), (total, scores)


def test_pde_fit_lands_on_the_exact_mle_with_the_same_standard_errors():
    """OU, 800 transitions at Δt = 1: the PDE likelihood's estimates within 0.02 exact SEs of
    the exact MLE and its SEs within 1%."""
    x = ou_path(800, 1.0, 1.0, 0.5, 0.7, seed=5)
    names, kinds = ["theta", "mean", "sigma"], ["positive", "real", "positive"]
    exact = exact_mle("ou", x[:-1], x[1:], np.ones(800), dict(theta=1.0, mean=0.0, sigma=1.0))
    td = density("ou", x[:-1], x[1:], np.ones(800))

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        values = tensors(**dict(zip(names, theta)))
        total = -td.log_density(values).sum()
        total.backward()
        return float(total.detach()), np.array([float(values[n].grad) for n in names])

    start = np.array([0.8, 0.3, 0.9])
    td.freeze_steps(tensors(**dict(zip(names, start))))
    state = fitting.minimize(nll, start, kinds)
    result = fitting.summarize(names, nll, state, kinds)
    assert result.converged
    for i, n in enumerate(names):
        assert abs(result.estimates[i] - exact["estimates"][n]) < 0.02 * exact["se"][n], n
        assert abs(result.se[i] / exact["se"][n] - 1) < 0.01, n


def test_fitter_resumes_to_the_same_end_point_bit_for_bit():
    x = ou_path(300, 0.5, 1.0, 0.0, 1.0, seed=2)

    def nll(p: np.ndarray) -> tuple[float, None]:
        return float(-ou_log_density(x[:-1], x[1:], 0.5, *p).sum()), None

    objective = fitting.numeric_gradient(nll)
    kinds = ["positive", "real", "positive"]
    full = fitting.minimize(objective, np.array([2.0, 1.0, 2.0]), kinds, tol=1e-12)
    saved: list[fitting.FitState] = []
    fitting.minimize(objective, np.array([2.0, 1.0, 2.0]), kinds, tol=1e-12, max_iter=3,
                     callback=lambda s, _: saved.append(fitting.FitState.from_arrays(s.arrays())))
    resumed = fitting.minimize(objective, np.zeros(3), kinds, tol=1e-12, state=saved[-1])
    assert full.iteration > 3 and resumed.iteration == full.iteration
    assert np.array_equal(full.u, resumed.u)


@pytest.mark.parametrize("kind,value", [("positive", 0.0), ("positive", -1.0),
                                        ("correlation", 1.0), ("real", math.inf)])
def test_start_outside_the_domain_is_named(kind, value):
    with pytest.raises(Exception, match="must be"):
        fitting.check_start(["equation.sde.p"], np.array([value]), [kind])


def test_custom_callables_take_named_parameters_and_are_differentiable(tmp_path, monkeypatch):
    (tmp_path / "seasonal.py").write_text(
        "import math, torch\n"
        "def drift(t, x, a, b, c):\n"
        "    return a * (b + c * torch.sin(math.pi * t / 4)[:, None] - x)\n"
        "def diffusion(t, x, s):\n"
        "    return (s * torch.sqrt(torch.clamp(x, min=1e-12)))[:, :, None]\n")
    monkeypatch.chdir(tmp_path)
    cfg = SDEConfig(kind="custom", drift="./seasonal.py:drift", diffusion="./seasonal.py:diffusion",
                    params={"a": 2.0, "b": 5.0, "c": 3.0, "s": 0.5}, positive_params=["a", "s"])
    from neuralpde_cli.sdes import parameter_constraint, parameter_names
    assert parameter_names(cfg, 1) == ["a", "b", "c", "s"]
    assert [parameter_constraint("custom", n, 1, cfg) for n in "abcs"] == \
        ["positive", "real", "real", "positive"]
    values = tensors(a=2.0, c=3.0)
    sde = build_sde_with(cfg, 1, values, F64, CPU)
    t, x = torch.tensor([2.0], dtype=F64), torch.tensor([[4.0]], dtype=F64)
    mu = sde.drift(t, x)
    assert torch.allclose(mu, torch.tensor([[2.0 * (5.0 + 3.0 - 4.0)]], dtype=F64))
    mu.sum().backward()
    assert abs(float(values["c"].grad) - 2.0) < 1e-12  # ∂μ/∂c = a·sin(π/2)
    bad = SDEConfig(kind="custom", drift="./seasonal.py:drift", diffusion="./seasonal.py:diffusion",
                    params={"a": 2.0, "b": 5.0, "c": 3.0, "s": 0.5, "k": 1.0})
    with pytest.raises(Exception, match="'k'"):
        build_sde_with(bad, 1, {}, F64, CPU)


def _quadratic_in_log(centre: float, seen: list[float], refuse_below: float = 0.0):
    """−log L = 50·(log σ − log centre)², a UserError for σ < refuse_below (as a march refuses
    a diffusion singular at a start point), recording every σ it is asked about."""
    from neuralpde_cli.errors import UserError

    def objective(theta: np.ndarray):
        sigma = float(theta[0])
        seen.append(sigma)
        if sigma < refuse_below:
            raise UserError(f"the diffusion matrix is singular at σ = {sigma}")
        r = math.log(sigma) - math.log(centre)
        return 50.0 * r * r, np.array([100.0 * r / sigma])
    return objective


def test_a_wild_start_curvature_moves_a_positive_parameter_by_at_most_e_squared():
    """A starting inverse Hessian 10⁶ too large (Kessler's where it fits badly) must not send
    the first trial to an absurd θ: one line search moves log σ by at most 2."""
    seen: list[float] = []
    state = fitting.minimize(_quadratic_in_log(1.0, seen), np.array([0.5]), ["positive"],
                             hinv0=np.array([[1e6]]))
    assert max(seen) <= 0.5 * math.exp(2.0) * (1 + 1e-12)
    assert state.converged and abs(fitting.to_natural(state.u, ["positive"])[0][0] - 1.0) < 1e-4


def test_a_refused_trial_point_is_backed_off_but_a_refused_start_is_reported():
    from neuralpde_cli.errors import UserError
    seen: list[float] = []
    # the first trial lands below 0.3, which the objective refuses: the line search backs off
    state = fitting.minimize(_quadratic_in_log(0.35, seen, refuse_below=0.3), np.array([2.0]),
                             ["positive"], hinv0=np.array([[10.0]]))
    assert min(seen) < 0.3 and state.converged
    assert abs(fitting.to_natural(state.u, ["positive"])[0][0] - 0.35) < 1e-4
    with pytest.raises(UserError, match="singular"):
        fitting.minimize(_quadratic_in_log(1.0, [], refuse_below=0.3), np.array([0.2]), ["positive"])


def test_a_trial_point_the_march_cannot_cross_costs_one_evaluation():
    """A trial θ whose march diverges is +∞ with no gradient. It used to be followed by a
    central-difference gradient there, 2P more marches that fail too: a weekly Heston fit spent
    eight minutes on its first line search. Each refused trial is asked about once; the line
    search's next trial is half as far, never a finite-difference neighbour."""
    seen: list[float] = []
    quadratic = _quadratic_in_log(0.35, seen)

    def objective(theta: np.ndarray):
        if float(theta[0]) < 0.3:
            seen.append(float(theta[0]))
            raise ArithmeticError("time-march used optimizer.max_steps")  # as Diverged does
        return quadratic(theta)
    state = fitting.minimize(objective, np.array([2.0]), ["positive"], hinv0=np.array([[10.0]]))
    refused = [s for s in seen if s < 0.3]
    assert refused and state.converged
    assert all(abs(a / b - 1) > 1e-3 for a, b in zip(refused, refused[1:])), refused


def test_information_that_cannot_be_computed_gives_no_standard_error_not_a_crash():
    """An objective that fails beside the optimum (a march that cannot be factored there):
    the SEs are NaN and the sandwich too, no exception."""
    def objective(theta: np.ndarray):
        if theta[0] > 1.0:
            raise np.linalg.LinAlgError("Cholesky: not positive definite")
        return float((theta[0] - 1.0) ** 2), np.array([2.0 * (theta[0] - 1.0)])
    state = fitting.FitState(np.array([1.0]), 0.0, np.array([0.0]), np.eye(1), converged=True)
    result = fitting.summarize(["x"], objective, state, ["free"])
    assert np.isnan(result.se).all()
    cov, se = fitting.sandwich(np.array([[0.0]]), np.ones((5, 1)))
    assert np.isnan(se).all()


@pytest.mark.parametrize("kind,extra,power", [("cir", {}, 0.5), ("cev", {"gamma": 0.8}, 0.2),
                                              ("gbm", {}, 0.0)])
def test_power_coordinates_are_ito_of_the_natural_ones(kind, extra, power):
    """The march coordinate y = (xᵃ − 1)/a (a = 0: log x): Lamperti's where the noise is a
    power of x (CIR: 2√x − 2, constant noise; CEV: a = 1 − γ, following γ). Its drift and D are
    Itô's lemma applied to the natural ones, its closed-form divergences match autograd, and
    below the floor the coefficients are held."""
    sde = build_sde_with(SDEConfig(kind=kind, rate=0.7, level=2.0, noise=0.5, **extra), 1, {},
                         F64, CPU)
    assert {i: float(a) for i, a in sde.march_coordinates().items()} == {0: pytest.approx(power)}
    marched = sde.in_march_coordinates(floor=0.05)
    assert marched.constant_diffusion == (kind != "cev")
    x = torch.tensor([[0.3], [1.0], [4.0]], dtype=F64)
    a = power
    y = torch.log(x) if a == 0 else (x ** a - 1) / a
    s = sde.diffusion_sqrt(None, x)
    d = (s @ s.transpose(-1, -2))[:, 0, 0]
    slope, curve = x[:, 0] ** (a - 1), (a - 1) * x[:, 0] ** (a - 2)  # y'(x), y''(x)
    torch.testing.assert_close(marched.drift(None, y)[:, 0], slope * sde.drift(None, x)[:, 0] + curve * d)
    sy = marched.diffusion_sqrt(None, y)
    sy = sy.expand(3, 1, 1) if sy.dim() == 2 else sy
    torch.testing.assert_close((sy @ sy.transpose(-1, -2))[:, 0, 0], slope ** 2 * d)
    yr = y.clone().requires_grad_(True)
    grad = lambda f: torch.autograd.grad(f.sum(), yr, create_graph=True)[0][:, 0]  # noqa: E731
    torch.testing.assert_close(marched.drift_divergence(None, y),
                               grad(marched.drift(None, yr)[:, 0]).detach())
    if not marched.constant_diffusion:
        sr = marched.diffusion_sqrt(None, yr)
        first = grad((sr @ sr.transpose(-1, -2))[:, 0, 0])
        div, divdiv = marched.diffusion_divergences(None, y)
        torch.testing.assert_close(div[:, 0], first.detach())
        torch.testing.assert_close(divdiv, grad(first).detach())
    if a > 0:  # held below the floor (x = 0.05): the values there, no slope; past the
        # boundary (1 + a·y ≤ 0) too
        below = torch.tensor([[(0.01 ** a - 1) / a], [-1.5 / a]], dtype=F64)
        at = torch.full_like(below, (0.05 ** a - 1) / a)
        torch.testing.assert_close(marched.drift(None, below), marched.drift(None, at))
        assert bool((marched.drift_divergence(None, below) == 0).all())


def test_a_fit_that_stops_gaining_is_stalled_not_converged():
    """A log-likelihood that moves by less than the tolerance per iteration while its gradient
    promises more (a march that is not smooth at that scale): the fit stops after
    STALL_ITERATIONS, and is not called converged."""
    calls = [0]

    def ratchet(theta: np.ndarray) -> tuple[float, np.ndarray]:
        calls[0] += 1
        return 1.0 - 2e-11 * calls[0], np.array([1.0])

    state = fitting.minimize(ratchet, np.array([3.0]), ["real"], max_iter=100)
    assert state.stalled and not state.converged and state.iteration == fitting.STALL_ITERATIONS
    result = fitting.summarize(["a"], ratchet, state, ["real"])
    assert not result.converged and result.notes == {"stalled": True}


def test_ar1_start_finds_the_datas_scale():
    """The baselines' start from the data: on OU far from the config's defaults (mean 40,
    θ = 3, σ = 5), the AR(1) moments land within 10 % of the truth; a random walk gives none or
    a rate near 0."""
    from neuralpde_cli.likelihood.gaussian import ar1_start

    x = ou_path(4000, 0.1, 3.0, 40.0, 5.0, seed=3)
    start = ar1_start("ou", x[:-1], x[1:], np.full(4000, 0.1))
    assert start is not None
    for name, truth in (("theta", 3.0), ("mean", 40.0), ("sigma", 5.0)):
        assert abs(start[name] / truth - 1) < 0.1, (name, start[name])
    walk = np.cumsum(np.random.default_rng(1).standard_normal(500)) + 100
    drifting = ar1_start("cir", walk[:-1], walk[1:], np.ones(499))
    assert drifting is None or drifting["rate"] < 0.1  # no mean reversion to speak of
