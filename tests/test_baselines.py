"""The pieces calibration is judged by: SDE parameters, exact transition sampling, the exact
OU/CIR transition densities, and the Euler and Kessler Gaussian approximations.

Every accuracy check is against an exact law computed independently (scipy's non-central χ²,
closed-form conditional moments, numerical integration), never against earlier output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes import (SDEConfig, build_sde, build_sde_with, parameter_constraint,
                                parameter_names, parameter_values, standard_gamma)

DT = torch.float64
CPU = torch.device("cpu")
OU1 = dict(kind="ou", theta=[[1.0]], mean=[0.5], sigma=[[0.3]])
CIR = dict(kind="cir", rate=3.0, level=0.3, noise=0.2)
CEV = dict(kind="cev", rate=3.0, level=2.0, noise=0.2, gamma=0.5)
PROBE = np.random.default_rng(0).uniform(0.3, 1.5, size=(4, 2))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sde(dim: int = 1, **kw) -> torch.nn.Module:
    return build_sde(SDEConfig(**kw), dim, DT, CPU)


# --- parameters -----------------------------------------------------------------------------
def test_parameter_names_values_and_constraints() -> None:
    assert parameter_names(SDEConfig(**OU1), 1) == ["theta", "mean", "sigma"]
    assert parameter_values(SDEConfig(**OU1), 1) == {"theta": 1.0, "mean": 0.5, "sigma": 0.3}
    assert parameter_names(SDEConfig(**CEV), 1) == ["rate", "level", "noise", "gamma"]
    assert parameter_names(SDEConfig(kind="double_well"), 1) == ["linear", "cubic", "noise"]
    assert parameter_names(SDEConfig(kind="brownian", drift_vector=[0.1]), 1) == ["drift_vector", "sigma"]
    two = parameter_names(SDEConfig(), 2)  # 2-D OU: θ in full, σ's lower triangle
    assert two == ["theta[0][0]", "theta[0][1]", "theta[1][0]", "theta[1][1]", "mean[0]",
                   "mean[1]", "sigma[0][0]", "sigma[1][0]", "sigma[1][1]"]
    assert parameter_values(SDEConfig(), 2)["theta[1][0]"] == -0.4
    constraints = {n: parameter_constraint("ou", n, 2) for n in two}
    assert [n for n, c in constraints.items() if c == "positive"] == ["sigma[0][0]", "sigma[1][1]"]
    assert parameter_constraint("ou", "theta", 1) == "positive"
    assert parameter_constraint("gbm", "rate", 1) == "real"
    assert parameter_constraint("cir", "rate", 1) == "positive"
    assert parameter_constraint("double_well", "linear", 1) == "real"
    with pytest.raises(UserError, match=r"'kappa' is not a parameter of equation.sde.kind=cir.*'rate'"):
        parameter_constraint("cir", "kappa", 1)
    with pytest.raises(UserError, match=r"'theta\[2\]\[0\]' is not a parameter"):
        build_sde_with(SDEConfig(), 2, {"theta[2][0]": torch.tensor(1.0)}, DT, CPU)


def test_sigma_is_named_by_its_cholesky_factor() -> None:
    """A non-triangular σ is named by the lower factor of σσᵀ, which gives the same law."""
    cfg = SDEConfig(sigma=[[0.6, 0.3], [0.2, -0.5]])
    values = parameter_values(cfg, 2)
    rebuilt = build_sde_with(cfg, 2, {k: torch.tensor(v, dtype=DT) for k, v in values.items()}, DT, CPU)
    original = build_sde(cfg, 2, DT, CPU)
    torch.testing.assert_close(rebuilt.sigma @ rebuilt.sigma.T, original.sigma @ original.sigma.T)
    assert rebuilt.sigma[0, 1] == 0 and rebuilt.sigma[1, 1] > 0
    torch.testing.assert_close(rebuilt.a, original.a)
    torch.testing.assert_close(rebuilt.c, original.c)


@pytest.mark.parametrize("kind, dim, cfg", [
    ("ou", 2, {}), ("cir", 1, CIR), ("cev", 1, CEV), ("double_well", 1, {"linear": 0.8, "cubic": 1.3}),
    ("double_well_2d", 2, {}), ("gbm", 1, {}), ("brownian", 2, {"drift_vector": [0.1, -0.2]}),
])
def test_build_sde_with_is_differentiable(kind: str, dim: int, cfg: dict) -> None:
    """gradcheck (autograd against central differences) of drift, diffusion and, for linear
    SDEs, the exact transition moments, in every calibratable parameter at once."""
    config = SDEConfig(**{**cfg, "kind": kind})
    names = parameter_names(config, dim)
    start = parameter_values(config, dim)
    x = torch.tensor(PROBE[:, :dim], dtype=DT)
    t = torch.zeros(x.shape[0], dtype=DT)

    def coefficients(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sde = build_sde_with(config, dim, dict(zip(names, values)), DT, CPU)
        out = (sde.drift(t, x), sde.diffusion_sqrt(t, x))
        if hasattr(sde, "transition_moments"):
            out += sde.transition_moments(torch.tensor([0.3, 1.0], dtype=DT))
        return out

    values = tuple(torch.tensor(start[n], dtype=DT, requires_grad=True) for n in names)
    assert torch.autograd.gradcheck(coefficients, values)
    # with no values given it is build_sde: the same coefficients
    plain = build_sde(config, dim, DT, CPU)
    torch.testing.assert_close(coefficients(*[v.detach() for v in values])[0], plain.drift(t, x))


def test_cev_and_double_well_coefficients() -> None:
    x = torch.tensor(PROBE[:, :1], dtype=DT)
    t = torch.zeros(4, dtype=DT)
    dw = _sde(kind="double_well", linear=0.7, cubic=1.9, noise=0.4)
    torch.testing.assert_close(dw.drift(t, x), 0.7 * x - 1.9 * x ** 3)
    cev = _sde(**{**CEV, "gamma": 0.8})
    torch.testing.assert_close(cev.drift(t, x), 3.0 * (2.0 - x))
    torch.testing.assert_close(cev.diffusion_sqrt(t, x)[:, 0, 0], 0.2 * x[:, 0] ** 0.8 / math.sqrt(2))
    # closed-form divergences of D = ½σ² x^{2γ} against autograd (the equation's fallback)
    from neuralpde_cli.equations.fokker_planck import FokkerPlanck, FokkerPlanckConfig
    for gamma in (0.5, 0.8, 1.3):
        eq = FokkerPlanck(FokkerPlanckConfig(dim=1, initial_mean=[1.0], sde=SDEConfig(
            **{**CEV, "gamma": gamma})), DT, CPU)
        base = super(FokkerPlanck, eq)
        for got, want in zip(eq.diffusion_divergences(t, x), base.diffusion_divergences(t, x)):
            torch.testing.assert_close(got, want)


def test_bad_sde_values() -> None:
    with pytest.raises(UserError, match="equation.sde.gamma=-0.5 must be > 0"):
        _sde(**{**CEV, "gamma": -0.5})
    with pytest.raises(UserError, match="equation.sde.level=0.0 must be > 0"):
        _sde(**{**CIR, "level": 0.0})
    # a replaced value is not checked against the config's
    sde = build_sde_with(SDEConfig(**{**CIR, "noise": -1.0}), 1, {"noise": torch.tensor(0.3)}, DT, CPU)
    assert float(sde.noise) == pytest.approx(0.3)


# --- exact and Euler sampling ---------------------------------------------------------------
def test_standard_gamma_matches_scipy_and_is_seeded() -> None:
    for alpha in (0.3, 1.0, 7.5):
        a = torch.full((20_000,), alpha, dtype=DT)
        draws = standard_gamma(a, torch.Generator().manual_seed(1)).numpy()
        assert scipy.stats.kstest(draws, scipy.stats.gamma(alpha).cdf).pvalue > 1e-3
        again = standard_gamma(a, torch.Generator().manual_seed(1)).numpy()
        np.testing.assert_array_equal(draws, again)


def _rows(n: int, x0: float, dts: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    dt = torch.tensor(dts, dtype=DT).repeat(n // len(dts))
    return torch.full((dt.shape[0], 1), x0, dtype=DT), torch.zeros_like(dt), dt


def test_ou_exact_sampling_has_the_exact_law_per_row() -> None:
    """Mixed Δt in one call: each draw standardized by its own exact mean and std is N(0, 1)."""
    sde = _sde(**OU1)
    x0, t0, dt = _rows(60_000, 2.0, (0.05, 0.5, 3.0))
    x1 = sde.sample_transition(x0, t0, dt, torch.Generator().manual_seed(2))[:, 0].numpy()
    h = dt.numpy()
    mean = 0.5 + 1.5 * np.exp(-h)
    std = 0.3 * np.sqrt((1 - np.exp(-2 * h)) / 2)
    z = (x1 - mean) / std
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.025  # ≈ 4.5 and 4.3 standard errors
    assert sde.has_exact_transition


def test_cir_exact_sampling_is_the_noncentral_chi2() -> None:
    for params in (CIR, dict(kind="cir", rate=1.0, level=0.75, noise=1.0)):  # df = 90 and 3
        sde = _sde(**params)
        k, m, s = params["rate"], params["level"], params["noise"]
        x0, t0, dt = _rows(30_000, 0.4, (1 / 250, 1 / 12, 1.0))
        x1 = sde.sample_transition(x0, t0, dt, torch.Generator().manual_seed(3))[:, 0].numpy()
        h = dt.numpy()
        c = 2 * k / (s ** 2 * (1 - np.exp(-k * h)))
        u = scipy.stats.ncx2.cdf(2 * c * x1, 4 * k * m / s ** 2, 2 * c * 0.4 * np.exp(-k * h))
        assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3, params


def test_gbm_exact_and_euler_kinds() -> None:
    sde = _sde(kind="gbm", rate=0.3, noise=0.4)
    x0, t0, dt = _rows(20_000, 1.5, (0.1, 1.0))
    x1 = sde.sample_transition(x0, t0, dt, torch.Generator().manual_seed(4))[:, 0].numpy()
    h = dt.numpy()
    z = (np.log(x1 / 1.5) - (0.3 - 0.08) * h) / (0.4 * np.sqrt(h))
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # CEV with γ = ½ is CIR: its Euler sub-steps must reproduce the exact χ² law
    cev = _sde(kind="cev", rate=1.0, level=0.75, noise=1.0, gamma=0.5)
    assert not cev.has_exact_transition
    x0, t0, dt = _rows(20_000, 0.4, (0.5,))
    x1 = cev.sample_transition(x0, t0, dt, torch.Generator().manual_seed(5), substep=2e-3)
    c = 2 / (1 - np.exp(-0.5))
    u = scipy.stats.ncx2.cdf(2 * c * x1[:, 0].numpy(), 3.0, 2 * c * 0.4 * np.exp(-0.5))
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3


def test_euler_substeps_are_per_row_and_seeded() -> None:
    """Rows with Δt = 0 stay put, the others move; the same seed gives the same draws."""
    sde = _sde(kind="double_well", noise=0.5)
    x0 = torch.tensor([[0.3], [0.3], [-0.2]], dtype=DT)
    dt = torch.tensor([0.0, 0.25, 0.1], dtype=DT)
    a = sde.sample_transition(x0, torch.zeros(3, dtype=DT), dt, torch.Generator().manual_seed(6), 0.01)
    b = sde.sample_transition(x0, torch.zeros(3, dtype=DT), dt, torch.Generator().manual_seed(6), 0.01)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a[0, 0] == 0.3 and a[1, 0] != 0.3
    with pytest.raises(UserError, match="sub-step must be > 0"):
        sde.sample_transition(x0, torch.zeros(3, dtype=DT), dt, None, 0.0)


def test_custom_callables_from_a_file_or_the_current_folder(tmp_path, monkeypatch) -> None:
    """`drift=./file.py:mu` and `drift=module:mu` with module.py in the current folder (which the
    console script does not put on sys.path), as README documents."""
    (tmp_path / "np_user_drift.py").write_text(
        "import torch\n\ndef mu(t, x):\n    return 0.5 - 2.0 * x\n\n"
        "def sigma(t, x):\n    return 0.3 * torch.eye(x.shape[1], dtype=x.dtype)\n")
    (tmp_path / "np_broken.py").write_text("def mu(t, x)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    x = torch.tensor([[0.1], [1.0]], dtype=DT)
    t = torch.zeros(2, dtype=DT)
    for drift in ("np_user_drift:mu", "./np_user_drift.py:mu", f"{tmp_path}/np_user_drift.py:mu"):
        sde = _sde(kind="custom", drift=drift, diffusion=drift.replace(":mu", ":sigma"))
        assert parameter_names(SDEConfig(kind="custom", drift=drift, diffusion="m:s"), 1) == []
        torch.testing.assert_close(sde.drift(t, x), 0.5 - 2.0 * x)
        torch.testing.assert_close(sde.diffusion_sqrt(t, x), torch.tensor([[0.3 / math.sqrt(2)]], dtype=DT))
    with pytest.raises(UserError, match="no such file"):
        _sde(kind="custom", drift="./nope.py:mu")
    with pytest.raises(UserError, match="cannot import 'np_broken'.*SyntaxError"):
        _sde(kind="custom", drift="np_broken:mu")
    with pytest.raises(UserError, match="no callable 'nu'"):
        _sde(kind="custom", drift="./np_user_drift.py:nu")


# --- exact transition densities (references/transitions.py) ---------------------------------
def _quad(f, lo: float, hi: float) -> float:
    return scipy.integrate.quad(f, lo, hi, limit=200, epsabs=1e-12, epsrel=1e-10)[0]


def test_ou_density_integrates_to_one_and_matches_exact_sampling() -> None:
    from neuralpde_cli.references.transitions import ou_log_density
    sde = _sde(**OU1)
    for x0, dt in ((2.0, 0.05), (-1.0, 0.5), (0.3, 3.0)):
        p = lambda x: float(np.exp(ou_log_density(x0, x, dt, 1.0, 0.5, 0.3)))  # noqa: E731
        mean = _quad(lambda x: x * p(x), -10, 10)
        assert _quad(p, -10, 10) == pytest.approx(1.0, abs=1e-9)
        # the CDF by integrating the density, at draws of the exact sampler: uniform
        draws = sde.sample_transition(torch.full((4000, 1), x0, dtype=DT), torch.zeros(4000, dtype=DT),
                                      torch.full((4000,), dt, dtype=DT),
                                      torch.Generator().manual_seed(7))[:, 0].numpy()
        grid = np.linspace(mean - 12 * draws.std(), mean + 12 * draws.std(), 20_001)
        cdf = scipy.integrate.cumulative_trapezoid(np.exp(ou_log_density(x0, grid, dt, 1.0, 0.5, 0.3)),
                                                   grid, initial=0.0)
        assert scipy.stats.kstest(np.interp(draws, grid, cdf), "uniform").pvalue > 1e-3
        assert abs(draws.mean() - mean) < 4 * draws.std() / math.sqrt(4000)


def test_ou_density_2d_against_sampling() -> None:
    """d-D (Van Loan by scipy): mass 1 on a grid; its mean and covariance by quadrature match
    the exact sampler's (torch's matrix exponential, a separate code path) to sampling error."""
    from neuralpde_cli.references.transitions import ou_log_density
    cfg = SDEConfig()
    theta, mean, sigma = np.array(cfg.theta), np.array(cfg.mean), np.array(cfg.sigma)
    x0, dt = np.array([0.5, 1.0]), 0.7
    g = np.linspace(-4, 5, 301)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], 1)
    p = np.exp(ou_log_density(np.tile(x0, (len(pts), 1)), pts, dt, theta, mean, sigma))
    w = p * (g[1] - g[0]) ** 2
    assert w.sum() == pytest.approx(1.0, abs=1e-8)
    m = w @ pts
    c = (pts - m).T @ ((pts - m) * w[:, None])
    n = 40_000
    draws = _sde(2).sample_transition(torch.tensor(x0).expand(n, 2), torch.zeros(n, dtype=DT),
                                      torch.full((n,), dt, dtype=DT),
                                      torch.Generator().manual_seed(8)).numpy()
    np.testing.assert_allclose(draws.mean(0), m, atol=4 * np.sqrt(np.diag(c) / n).max())
    np.testing.assert_allclose(np.cov(draws.T), c, atol=0.02 * np.abs(c).max())
    # 1-D and d = 1 matrix forms agree
    one = ou_log_density(np.array([[0.2]]), np.array([[0.9]]), 0.5, np.array([[1.0]]), [0.5], [[0.3]])
    assert one[0] == pytest.approx(float(ou_log_density(0.2, 0.9, 0.5, 1.0, 0.5, 0.3)), rel=1e-12)


@pytest.mark.parametrize("rate, level, noise, x0, dt", [
    (3.0, 0.3, 0.2, 0.25, 1 / 250), (3.0, 0.3, 0.2, 0.4, 1 / 12),   # the daily and monthly
    (1.0, 0.75, 1.0, 0.4, 0.5),                                      # df = 3: skewed
])
def test_cir_density_has_the_known_conditional_moments(rate, level, noise, x0, dt) -> None:
    from neuralpde_cli.references.transitions import cir_log_density
    p = lambda x: float(np.exp(cir_log_density(x0, x, dt, rate, level, noise)))  # noqa: E731
    decay = math.exp(-rate * dt)
    mean = level + (x0 - level) * decay
    var = x0 * noise ** 2 / rate * (decay - decay ** 2) + level * noise ** 2 / (2 * rate) * (1 - decay) ** 2
    hi = mean + 40 * math.sqrt(var)
    points = [mean - 3 * math.sqrt(var), mean, mean + 3 * math.sqrt(var)]
    integrate = lambda f: sum(_quad(f, a, b) for a, b in zip([0.0, *points], [*points, hi]) if b > a)  # noqa: E731
    assert integrate(p) == pytest.approx(1.0, abs=1e-8)
    assert integrate(lambda x: x * p(x)) == pytest.approx(mean, rel=1e-8)
    assert integrate(lambda x: (x - mean) ** 2 * p(x)) == pytest.approx(var, rel=1e-6)
    assert cir_log_density(x0, -0.1, dt, rate, level, noise) == -np.inf
    # from x0 = 0 the law is a scaled central χ²: still a density
    assert integrate(lambda x: float(np.exp(cir_log_density(0.0, x, dt, rate, level, noise)))) == \
        pytest.approx(1.0, abs=1e-6)


def test_exact_mle_recovers_ou_with_the_asymptotic_standard_error() -> None:
    """On exact OU data the MLE's SE of θ is the delta-method one of the AR(1) coefficient
    φ = e^{−θΔ}: √((1 − φ²)/n)/(φΔ); the estimate lies within 4 of them of the truth."""
    from neuralpde_cli.references.transitions import exact_mle
    n, dt = 3000, 0.5
    sde = _sde(kind="ou", theta=[[1.0]], mean=[0.0], sigma=[[0.5]])
    x = torch.zeros(n + 1, 1, dtype=DT)
    gen = torch.Generator().manual_seed(9)
    for k in range(n):
        x[k + 1] = sde.sample_transition(x[k:k + 1], torch.zeros(1, dtype=DT), torch.full((1,), dt, dtype=DT), gen)
    x = x[:, 0].numpy()
    fit = exact_mle("ou", x[:-1], x[1:], np.full(n, dt), {"theta": 0.5, "mean": 0.3, "sigma": 1.0})
    phi = math.exp(-dt)
    se_theta = math.sqrt((1 - phi ** 2) / n) / (phi * dt)
    assert fit["se"]["theta"] == pytest.approx(se_theta, rel=0.1)
    for name, truth in (("theta", 1.0), ("mean", 0.0), ("sigma", 0.5)):
        assert abs(fit["estimates"][name] - truth) < 4 * fit["se"][name], (name, fit)


# --- Gaussian approximations (likelihood/gaussian.py) ---------------------------------------
def _log_density_errors(approx, sde, x0: np.ndarray, dt: float, exact) -> float:
    """Worst |log p̃ − log p| at x1 = exact mean ± 0, 1, 2 exact std (per start point)."""
    n, d = x0.shape
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    x0r = np.repeat(x0, len(z), axis=0)
    x1 = x0r + 0.0
    x1[:, 0] = exact["mean"](x0r[:, 0], dt) + z[np.tile(np.arange(len(z)), n)] * np.sqrt(exact["var"](x0r[:, 0], dt))
    t = lambda a: torch.tensor(a, dtype=DT)  # noqa: E731
    got = approx(sde, t(x0r), t(x1), t(np.zeros(len(x1))), t(np.full(len(x1), dt))).detach().numpy()
    return float(np.abs(got - exact["log_density"](x0r, x1, dt)).max())


def _ou1_exact():
    from neuralpde_cli.references.transitions import ou_log_density
    return {"mean": lambda x, h: 0.5 + (x - 0.5) * np.exp(-h),
            "var": lambda x, h: 0.09 * (1 - np.exp(-2 * h)) / 2,
            "log_density": lambda x0, x1, h: ou_log_density(x0[:, 0], x1[:, 0], h, 1.0, 0.5, 0.3)}


def test_euler_and_kessler_are_exact_as_dt_goes_to_zero_on_ou() -> None:
    """Log-density error of order Δ (Euler: the variance is first order) and Δ² (Kessler)."""
    from neuralpde_cli.likelihood.gaussian import euler_log_density, kessler_log_density
    sde, exact, x0 = _sde(**OU1), _ou1_exact(), np.array([[-0.5], [0.5], [2.0]])
    for approx, order in ((euler_log_density, 1), (kessler_log_density, 2)):
        errors = [_log_density_errors(approx, sde, x0, h, exact) for h in (0.01, 0.005, 0.0025)]
        rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.15 for r in rates), (approx.__name__, errors, rates)
        assert errors[-1] < (5e-3 if order == 1 else 3e-4)


@pytest.mark.parametrize("params, mean, var", [
    (OU1, lambda x, h: 0.5 + (x - 0.5) * math.exp(-h), lambda x, h: 0.09 * (1 - math.exp(-2 * h)) / 2),
    (CIR, lambda x, h: 0.3 + (x - 0.3) * math.exp(-3 * h),   # the brief's CIR formulas (v′ ≠ 0)
     lambda x, h: x * 0.04 / 3 * (math.exp(-3 * h) - math.exp(-6 * h)) + 0.3 * 0.04 / 6 * (1 - math.exp(-3 * h)) ** 2),
    (dict(kind="gbm", rate=0.4, noise=0.5), lambda x, h: x * math.exp(0.4 * h),   # v″ ≠ 0
     lambda x, h: x * x * math.exp(0.8 * h) * (math.exp(0.25 * h) - 1)),
])
def test_kessler_moments_are_exact_to_third_order(params, mean, var) -> None:
    from neuralpde_cli.likelihood.gaussian import kessler_moments
    sde, x = _sde(**params), 0.8
    errors = []
    for h in (0.08, 0.04, 0.02):
        m, v = (a.detach() for a in kessler_moments(sde, torch.tensor([[x]], dtype=DT), torch.zeros(1, dtype=DT),
                               torch.tensor([h], dtype=DT)))
        errors.append((abs(m.item() - mean(x, h)), abs(v.item() - var(x, h))))
    for k in range(2):  # each error shrinks 8-fold when Δ halves
        ratios = [errors[0][k] / errors[1][k], errors[1][k] / errors[2][k]]
        assert all(6.5 < r < 9.5 for r in ratios), (params, k, errors)


def test_euler_2d_tends_to_the_exact_ou_density() -> None:
    from neuralpde_cli.likelihood.gaussian import euler_log_density
    from neuralpde_cli.references.transitions import ou_log_density
    cfg, sde = SDEConfig(), _sde(2)
    x0 = np.array([[0.5, 1.0], [-1.0, 0.2]])
    errors = []
    for h in (0.02, 0.01):
        x1 = x0 + np.sqrt(h) * np.array([[0.7, -0.4], [-1.1, 0.9]])
        t = lambda a: torch.tensor(a, dtype=DT)  # noqa: E731
        got = euler_log_density(sde, t(x0), t(x1), t(np.zeros(2)), t(np.full(2, h))).numpy()
        want = ou_log_density(x0, x1, h, np.array(cfg.theta), np.array(cfg.mean), np.array(cfg.sigma))
        errors.append(np.abs(got - want).max())
    assert 1.7 < errors[0] / errors[1] < 2.3 and errors[1] < 0.05, errors


def test_gaussian_densities_are_differentiable_in_the_parameters() -> None:
    from neuralpde_cli.likelihood.gaussian import euler_log_density, kessler_log_density
    cfg = SDEConfig(**{**CEV, "gamma": 0.7})
    names = parameter_names(cfg, 1)
    x0 = torch.tensor([[1.8], [2.3], [1.5]], dtype=DT)
    x1 = torch.tensor([[1.9], [2.1], [1.6]], dtype=DT)
    t0, dt = torch.zeros(3, dtype=DT), torch.tensor([0.1, 0.25, 0.5], dtype=DT)
    start = tuple(torch.tensor(v, dtype=DT, requires_grad=True) for v in parameter_values(cfg, 1).values())
    for density in (euler_log_density, kessler_log_density):
        f = lambda *v: density(build_sde_with(cfg, 1, dict(zip(names, v)), DT, CPU), x0, x1, t0, dt)  # noqa: E731
        assert torch.autograd.gradcheck(f, start)
    with pytest.raises(UserError, match="Kessler's approximation is one-dimensional"):
        kessler_log_density(_sde(2), torch.zeros(1, 2, dtype=DT), torch.zeros(1, 2, dtype=DT),
                            torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))


def test_euler_pseudo_mle_on_ou_estimates_the_discretized_rate() -> None:
    """At Δt = 0.5 the Euler pseudo-MLE of θ is (1 − e^{−θΔ})/Δ = 0.787, not θ = 1 (21% low):
    the closed-form regression on exact OU data, and euler_log_density's gradient vanishing there."""
    from neuralpde_cli.likelihood.gaussian import euler_log_density
    theta, m, s, h, paths, steps = 1.0, 0.5, 0.3, 0.5, 50, 100
    sde = _sde(kind="ou", theta=[[theta]], mean=[m], sigma=[[s]])
    gen = torch.Generator().manual_seed(10)
    x = m + s / math.sqrt(2 * theta) * torch.randn(paths, 1, generator=gen, dtype=DT)  # stationary
    starts, ends = [], []
    for _ in range(steps):
        y = sde.sample_transition(x, torch.zeros(paths, dtype=DT), torch.full((paths,), h, dtype=DT), gen)
        starts.append(x)
        ends.append(y)
        x = y
    x0, x1 = torch.cat(starts), torch.cat(ends)
    n = x0.shape[0]
    a, b = np.polyfit(x0[:, 0].numpy(), x1[:, 0].numpy(), 1)[::-1]  # x1 = a + b·x0
    rss = float(((x1[:, 0] - a - b * x0[:, 0]) ** 2).sum())
    est = {"theta": (1 - b) / h, "mean": a / (1 - b), "sigma": math.sqrt(rss / (n * h))}
    target = (1 - math.exp(-theta * h)) / h
    se = math.sqrt((1 - math.exp(-2 * theta * h)) / n) / h   # of (1 − b)/Δ
    assert abs(est["theta"] - target) < 4 * se and abs(est["theta"] - theta) > 8 * se, (est, target, se)
    values = {k: torch.tensor(v, dtype=DT, requires_grad=True) for k, v in est.items()}
    loglik = euler_log_density(build_sde_with(SDEConfig(kind="ou"), 1, values, DT, CPU), x0, x1,
                               torch.zeros(n, dtype=DT), torch.full((n,), h, dtype=DT)).sum()
    grads = torch.autograd.grad(loglik, list(values.values()))
    assert max(abs(float(g)) for g in grads) < 1e-6, grads
