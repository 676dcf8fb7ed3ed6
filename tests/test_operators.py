"""Second-derivative paths of the MLP against each other and against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from neuralpde_cli.ansatz.mlp import MLP, MLPConfig
from neuralpde_cli.equations.base import LogDensityFields, gaussian_log_density
from neuralpde_cli.equations.heat import HeatConfig, HeatEquation

DT = torch.float64


def _mlp(d: int, **kw) -> MLP:
    torch.manual_seed(0)
    cfg = MLPConfig(width=24, depth=3, **kw)
    return MLP(cfg, torch.zeros(d + 1, dtype=DT), torch.ones(d + 1, dtype=DT), True)


def _hessian_trace(model: MLP, t: torch.Tensor, x: torch.Tensor, dmat: torch.Tensor) -> torch.Tensor:
    """tr(D ∇²ₓℓ) per sample by torch.func (vmap of forward-over-reverse): the reference."""
    def f(ti, xi):
        return model.log_density(ti[None], xi[None])[0]
    hess = torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(f, argnums=1), argnums=1))(t, x)
    return torch.einsum("ij,nji->n", dmat, hess)


@pytest.mark.parametrize("activation", ["tanh", "silu", "softplus", "sin"])
@pytest.mark.parametrize("output", ["log", "softplus"])
def test_taylor_trace_matches_torch_func_hessian(activation: str, output: str) -> None:
    d = 3
    model = _mlp(d, activation=activation, output=output)
    gen = torch.Generator().manual_seed(1)
    t, x = torch.rand(16, generator=gen, dtype=DT), torch.randn(16, d, generator=gen, dtype=DT)
    a = torch.randn(d, d, generator=gen, dtype=DT)
    s = a  # D = S Sᵀ, a general SPD matrix
    f = model.log_density_fields(t, x, s)
    expected = _hessian_trace(model, t, x, s @ s.T)
    torch.testing.assert_close(f.trace_dh, expected, rtol=1e-10, atol=1e-10)
    grad = torch.func.vmap(torch.func.grad(lambda ti, xi: model.log_density(ti[None], xi[None])[0],
                                           argnums=(0, 1)))(t, x)
    torch.testing.assert_close(f.dt_log_p, grad[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.grad, grad[1], rtol=1e-10, atol=1e-12)


def test_taylor_trace_per_sample_diffusion_matches_reference() -> None:
    d = 2
    model = _mlp(d)
    gen = torch.Generator().manual_seed(2)
    t, x = torch.rand(8, generator=gen, dtype=DT), torch.randn(8, d, generator=gen, dtype=DT)
    s = torch.randn(8, d, d, generator=gen, dtype=DT)
    f = model.log_density_fields(t, x, s)
    for i in range(8):
        expected = _hessian_trace(model, t[i:i + 1], x[i:i + 1], s[i] @ s[i].T)
        torch.testing.assert_close(f.trace_dh[i:i + 1], expected, rtol=1e-10, atol=1e-10)


def test_taylor_laplacian_of_a_known_function() -> None:
    """One tanh unit: f = w₂ tanh(w₁·x + b), ∇²f = w₂ tanh''(a) |w₁|² in closed form."""
    d = 4
    cfg = MLPConfig(width=1, depth=1)
    model = MLP(cfg, torch.zeros(d + 1, dtype=DT), torch.ones(d + 1, dtype=DT), True)
    w1 = torch.tensor([[0.0, 0.3, -0.7, 1.1, 0.2]], dtype=DT)
    with torch.no_grad():
        model.layers[0].weight.copy_(w1)
        model.layers[0].bias.fill_(0.1)
        model.layers[1].weight.fill_(1.7)
        model.layers[1].bias.zero_()
    x = torch.randn(10, d, dtype=DT)
    t = torch.zeros(10, dtype=DT)
    a = x @ w1[0, 1:] + 0.1
    h = torch.tanh(a)
    expected = model.output_scale * 1.7 * (-2 * h * (1 - h * h)) * (w1[0, 1:] ** 2).sum()
    f = model.log_density_fields(t, x, torch.eye(d, dtype=DT))
    torch.testing.assert_close(f.trace_dh, expected, rtol=1e-12, atol=1e-12)


def test_hutchinson_is_unbiased_and_converges() -> None:
    d = 20
    model = _mlp(d)
    t, x = torch.rand(4, dtype=DT), torch.randn(4, d, dtype=DT)
    s = torch.eye(d, dtype=DT) * 0.7
    exact = model.log_density_fields(t, x, s).trace_dh
    gen = torch.Generator().manual_seed(3)
    est = model.log_density_fields(t, x, s, probes=4000, generator=gen).trace_dh
    scale = exact.abs().max()
    assert (est - exact).abs().max() < 0.05 * scale, (est, exact)
    assert not torch.allclose(est, exact, rtol=1e-9), "a 4000-probe estimate cannot be exact"


def test_hard_initial_condition_is_exact_at_t0() -> None:
    heat = HeatEquation(HeatConfig(dim=3, initial_correlation=0.3), DT, torch.device("cpu"))
    model = MLP.for_equation(MLPConfig(hard_ic=True), heat)
    x = torch.randn(50, 3, dtype=DT)
    t0 = torch.zeros(50, dtype=DT)
    torch.testing.assert_close(model.log_density(t0, x), heat.initial_log_density(x))
    f = model.log_density_fields(t0 + 0.3, x, heat.diffusion_sqrt(t0, x))
    expected = _hessian_trace(model, t0 + 0.3, x, heat.diffusion_matrix(t0, x))
    torch.testing.assert_close(f.trace_dh, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim,rho", [(1, 0.0), (3, 0.4), (10, -0.05)])
def test_exact_heat_solution_has_zero_residual(dim: int, rho: float) -> None:
    """The operator on log p of N(m₀, Σ₀ + 2κt I), derivatives by autograd: residual ≈ 0."""
    heat = HeatEquation(HeatConfig(dim=dim, diffusivity=0.3, initial_correlation=rho,
                                   initial_mean=[0.5] * dim), DT, torch.device("cpu"))
    t = torch.rand(32, dtype=DT) * 5
    x = torch.randn(32, dim, dtype=DT)

    def log_p(ti, xi):
        mean, cov = heat.exact_moments(ti[None])
        return gaussian_log_density(xi[None], mean[0], cov[0])[0]

    dt, grad = torch.func.vmap(torch.func.grad(log_p, argnums=(0, 1)))(t, x)
    hess = torch.func.vmap(torch.func.hessian(log_p, argnums=1))(t, x)
    fields = LogDensityFields(torch.func.vmap(log_p)(t, x), dt, grad,
                              0.3 * torch.diagonal(hess, dim1=-2, dim2=-1).sum(-1))
    residual = heat.log_residual(t, x, fields)
    assert residual.abs().max() < 1e-12
    # and a wrong diffusivity is caught: the same fields against κ = 0.31 do not vanish
    other = HeatEquation(HeatConfig(dim=dim, diffusivity=0.31, initial_correlation=rho,
                                    initial_mean=[0.5] * dim), DT, torch.device("cpu"))
    wrong = LogDensityFields(fields.log_p, dt, grad, fields.trace_dh * 0.31 / 0.3)
    assert other.log_residual(t, x, wrong).abs().max() > 1e-4


def test_relative_error_from_logs_survives_underflow() -> None:
    from neuralpde_cli.equations.base import relative_l2_from_logs
    log_true = torch.full((100,), -900.0, dtype=DT) + torch.randn(100, dtype=DT)
    log_pred = log_true + math.log1p(0.01)
    assert abs(relative_l2_from_logs(log_pred, log_true) - 0.01) < 1e-12
