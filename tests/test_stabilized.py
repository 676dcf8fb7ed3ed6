"""RKC2 and RKL2 (neuralpde_cli/solvers/stabilized.py) against exact facts: their stability
polynomials stay bounded on [−β(s), 0] and not beyond, they are second order on linear
diffusion with a closed-form solution, gradients through them match the exact derivative, and
the stage count is the smallest that is stable (or a clear error at the cap)."""

from __future__ import annotations

import math

import pytest
import torch

from neuralpde_cli.errors import UserError
from neuralpde_cli.solvers.stabilized import (Integrator, IntegratorConfig, power_iteration,
                                              rk4_step, stabilized_step, stage_count, stages)

F64 = torch.float64


def _step_scalar(method: str, s: int, z: torch.Tensor) -> torch.Tensor:
    """R(z): one step of y' = λy from y = 1 with h = 1 and λ = z, for every z at once."""
    return stabilized_step(lambda y: z * y, torch.ones_like(z), 1.0, stages(method, s))


@pytest.mark.parametrize("method", ["rkl2", "rkc2"])
@pytest.mark.parametrize("s", [2, 5, 16, 40])
def test_stability_interval_is_beta(method: str, s: int) -> None:
    st = stages(method, s)
    z = torch.linspace(-st.beta, 0.0, 4001, dtype=F64)
    r = _step_scalar(method, s, z)
    assert float(r.abs().max()) <= 1.0 + 1e-10
    # second order at the origin: R(z) = 1 + z + z²/2 + O(z³)
    small = torch.tensor([1e-3], dtype=F64)
    assert abs(float(_step_scalar(method, s, small)) - (1 + 1e-3 + 0.5e-6)) < 1e-8
    beyond = torch.linspace(-1.25 * st.beta, -1.1 * st.beta, 50, dtype=F64)
    assert float(_step_scalar(method, s, beyond).abs().max()) > 1.0
    if method == "rkl2":
        assert st.beta == (s * s + s - 2) / 2
    elif s >= 16:
        assert abs(st.beta / s ** 2 - 0.653) < 0.005


def _dirichlet_laplacian(n: int) -> tuple[torch.Tensor, float]:
    dx = 1.0 / (n + 1)
    main = torch.full((n,), -2.0, dtype=F64)
    off = torch.ones(n - 1, dtype=F64)
    return (torch.diag(main) + torch.diag(off, 1) + torch.diag(off, -1)) / dx ** 2, dx


@pytest.mark.parametrize("method", ["rkl2", "rkc2"])
def test_second_order_on_linear_diffusion(method: str) -> None:
    """u_t = u_xx on (0, 1), Dirichlet, 64 interior nodes, u₀ = sin(πx): an eigenvector of the
    discrete Laplacian, so u(T) = e^{λT}u₀ with λ = −4 sin²(πdx/2)/dx² exactly."""
    n, T = 64, 0.02
    lap, dx = _dirichlet_laplacian(n)
    x = torch.arange(1, n + 1, dtype=F64) * dx
    u0 = torch.sin(math.pi * x)
    lam = -4.0 * math.sin(math.pi * dx / 2) ** 2 / dx ** 2
    exact = math.exp(lam * T) * u0
    rho = 4.0 / dx ** 2
    s = stage_count(method, rho * T / 4, 200)  # stable for the largest step, kept for all
    errors = []
    for m in (4, 8, 16, 32):
        u, h = u0, T / m
        for _ in range(m):
            u = stabilized_step(lambda y: lap @ y, u, h, stages(method, s))
        errors.append(float((u - exact).norm() / exact.norm()))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(1.85 < p < 2.3 for p in orders), (errors, orders)
    assert errors[-1] < 1e-5


def test_gradient_through_the_stages_is_the_exact_derivative() -> None:
    """d/dD Σu(T) for u_t = D u_xx from the same eigenvector: Σu₀·λT·e^{DλT}."""
    n, T = 32, 0.01
    lap, dx = _dirichlet_laplacian(n)
    u0 = torch.sin(math.pi * torch.arange(1, n + 1, dtype=F64) * dx)
    lam = -4.0 * math.sin(math.pi * dx / 2) ** 2 / dx ** 2
    d = torch.tensor(0.7, dtype=F64, requires_grad=True)
    cfg = IntegratorConfig(method="rkl2", step=T / 64)
    sol = Integrator(cfg).integrate(lambda y: d * (lap @ y), u0, torch.tensor([0.0, T], dtype=F64),
                                    rho=0.7 * 4.0 / dx ** 2)
    sol.states[-1].sum().backward()
    exact = float(u0.sum()) * lam * T * math.exp(0.7 * lam * T)
    assert abs(float(d.grad) - exact) / abs(exact) < 1e-4


def test_stage_count_is_the_fewest_stable_and_the_cap_is_enforced() -> None:
    for method in ("rkl2", "rkc2"):
        for h_rho in (1.0, 37.5, 401.5, 2000.0):
            s = stage_count(method, h_rho, 500)
            assert stages(method, s).beta >= h_rho
            assert s == 2 or stages(method, s - 1).beta < h_rho
    assert stage_count("rkl2", 0.5 * 803, 200) == 28  # the research note's count
    with pytest.raises(UserError, match=r"needs more than model.integrator.max_stages=10 stages"):
        Integrator(IntegratorConfig(method="rkl2", step=1.0, max_stages=10)).plan(800.0)


def test_rk4_refuses_an_unstable_step_and_the_adaptive_baseline_counts() -> None:
    with pytest.raises(UserError, match=r"method=rk4 with model.integrator.step=0.5 is unstable"):
        Integrator(IntegratorConfig(method="rk4", step=0.5)).plan(800.0)
    lap, dx = _dirichlet_laplacian(16)
    u0 = torch.sin(math.pi * torch.arange(1, 17, dtype=F64) * dx)
    lam = -4.0 * math.sin(math.pi * dx / 2) ** 2 / dx ** 2
    times = torch.tensor([0.0, 0.05, 0.1], dtype=F64)
    for method in ("dopri5", "bosh3"):
        cfg = IntegratorConfig(method=method, rtol=1e-8, atol=1e-10)
        sol = Integrator(cfg).integrate(lambda y: lap @ y, u0, times, rho=4 / dx ** 2)
        assert sol.evals > 10
        exact = math.exp(lam * 0.1) * u0  # the library's global error follows its rtol loosely
        assert float((sol.states[-1] - exact).norm() / exact.norm()) < 1e-5
    one = rk4_step(lambda y: -y, torch.ones(1, dtype=F64), 0.1)
    assert abs(float(one) - math.exp(-0.1)) < 1e-7


def test_power_iteration_approaches_the_spectral_radius_from_below() -> None:
    lap, dx = _dirichlet_laplacian(24)
    rho = float(torch.linalg.eigvalsh(lap).abs().max())
    est = power_iteration(lambda y: lap @ y, torch.zeros(24, dtype=F64), iterations=60)
    assert 0.9 * rho < est <= rho * (1 + 1e-12)
